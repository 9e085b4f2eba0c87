-- A derivation is verified once: what planning needs of it, and its hash modulo, are stored
-- when the runner first verifies it (while it is staged, at Submit or at ingest), so a job set
-- sharing it, and a restarted runner, read this row instead of parsing and hashing its text again.

CREATE TABLE verified_derivations (
    path               text PRIMARY KEY REFERENCES derivations (path) ON DELETE CASCADE,
    system             text NOT NULL,
    required_features  text[] NOT NULL,
    output_names       text[] NOT NULL,
    output_paths       text[] NOT NULL,
    input_derivations  text[] NOT NULL,
    input_sources      text[] NOT NULL,
    input_outputs      text[] NOT NULL,
    fixed_output       text,
    hash_modulo        bytea NOT NULL CHECK (length(hash_modulo) = 32),
    verified_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (cardinality(output_names) = cardinality(output_paths))
);
COMMENT ON TABLE verified_derivations IS 'Derivations the runner verified (the text hashes to its path, every output path is the one its inputs determine), with what planning needs of them. Written by the runner only: a row is trusted as it is, and a derivation whose closure has a row missing is verified from its text.';
COMMENT ON COLUMN verified_derivations.path IS 'Store path of the .drv file.';
COMMENT ON COLUMN verified_derivations.system IS 'The system it builds on, such as x86_64-linux.';
COMMENT ON COLUMN verified_derivations.required_features IS 'Its requiredSystemFeatures.';
COMMENT ON COLUMN verified_derivations.output_names IS 'Its output names, in the order of output_paths.';
COMMENT ON COLUMN verified_derivations.output_paths IS 'The store path of each output.';
COMMENT ON COLUMN verified_derivations.input_derivations IS 'The .drv paths whose outputs it needs.';
COMMENT ON COLUMN verified_derivations.input_sources IS 'The store paths it needs as they are (sources, builtins.toFile results).';
COMMENT ON COLUMN verified_derivations.input_outputs IS 'The outputs of its input derivations it reads.';
COMMENT ON COLUMN verified_derivations.fixed_output IS 'For a fixed-output derivation, its content address as a narinfo writes it (fixed:[r:]algorithm:hash); NULL otherwise.';
COMMENT ON COLUMN verified_derivations.hash_modulo IS 'Nix''s hashDerivationModulo of it (SHA-256): what its dependents'' output paths are computed from.';
COMMENT ON COLUMN verified_derivations.verified_at IS 'When the runner verified it.';
