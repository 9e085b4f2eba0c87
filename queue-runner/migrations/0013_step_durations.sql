-- Learned durations: how long the steps of each package took on each system, which the
-- scheduler orders runnable steps by (their critical path in predicted time) and estimates the
-- end of builds from. Row retention never prunes it: it is the farm's memory of its work.

CREATE TABLE step_durations (
    package     text NOT NULL,
    system      text NOT NULL,
    samples     integer NOT NULL CHECK (samples > 0),
    mean_ms     bigint NOT NULL CHECK (mean_ms >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (package, system)
);
COMMENT ON TABLE step_durations IS 'How long the steps of each package take, learned from every success: read by the scheduler at start, updated with each success. Written by the runner; to make it learn a package afresh, delete the row and restart the runner, which keeps the history in memory.';
COMMENT ON COLUMN step_durations.package IS 'The derivation''s name without its version, as Nix''s parseDrvName splits it (hello-2.12.1 is hello).';
COMMENT ON COLUMN step_durations.system IS 'The system its steps build on, such as x86_64-linux.';
COMMENT ON COLUMN step_durations.samples IS 'Successes learned from.';
COMMENT ON COLUMN step_durations.mean_ms IS 'The estimate, in milliseconds from dispatch to result on a builder of speed factor 1: the mean of the first five samples, then moved a fifth of the way to each new one.';
COMMENT ON COLUMN step_durations.updated_at IS 'When a success last moved it.';
