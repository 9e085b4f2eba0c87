-- The client certificates the runner has seen, recorded at each TLS handshake, and the ones an
-- admin revoked (drover admin revoke SERIAL). The runner refuses every call made with a revoked
-- certificate, on connections already open too, and ends a revoked builder's tunnel at once.

CREATE TABLE certificates (
    serial         text PRIMARY KEY,
    role           text NOT NULL,
    name           text NOT NULL,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    revoked_by     text,
    CHECK ((revoked_at IS NULL) = (revoked_by IS NULL))
);
CREATE INDEX certificates_by_identity ON certificates (role, name);
COMMENT ON TABLE certificates IS 'Client certificates (builders, clients, admins) seen at a TLS handshake with the runner, and which are revoked. A certificate revoked before it was ever seen is recorded with role and name unknown (empty) until it shows up.';
COMMENT ON COLUMN certificates.serial IS 'Its serial number in lowercase hex without leading zeros (openssl x509 -noout -serial prints it in capitals, padded).';
COMMENT ON COLUMN certificates.role IS 'The role it names: builder, client or admin.';
COMMENT ON COLUMN certificates.name IS 'The name it names (a builder''s name, a user).';
COMMENT ON COLUMN certificates.first_seen_at IS 'Its first handshake with the runner.';
COMMENT ON COLUMN certificates.last_seen_at IS 'Its latest handshake with the runner (recorded at most once a minute per certificate).';
COMMENT ON COLUMN certificates.revoked_at IS 'When an admin revoked it; NULL: valid. Revocation cannot be undone: issue a new certificate.';
COMMENT ON COLUMN certificates.revoked_by IS 'The admin who revoked it (role/name).';
