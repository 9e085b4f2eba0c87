-- API tokens: what HTTP clients without a certificate authenticate with (docs/web.md).
CREATE TABLE api_tokens (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text NOT NULL CHECK (name <> ''),
    role           text NOT NULL CHECK (role IN ('client', 'admin')),
    secret_sha256  bytea NOT NULL UNIQUE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    created_by     text NOT NULL,
    last_used_at   timestamptz,
    revoked_at     timestamptz,
    revoked_by     text
);
CREATE UNIQUE INDEX api_tokens_valid_name ON api_tokens (name) WHERE revoked_at IS NULL;
COMMENT ON TABLE api_tokens IS 'Tokens for the HTTP API, for clients without a certificate (drover token create); the secret itself is never stored.';
COMMENT ON COLUMN api_tokens.id IS 'Token id.';
COMMENT ON COLUMN api_tokens.name IS 'Who or what uses it; requests with it act as role/name, as a certificate of that role and name would. Unique among tokens not revoked.';
COMMENT ON COLUMN api_tokens.role IS 'client (the build API) or admin.';
COMMENT ON COLUMN api_tokens.secret_sha256 IS 'SHA-256 of the secret a request sends (Authorization: Bearer, or the status page''s cookie).';
COMMENT ON COLUMN api_tokens.created_at IS 'When it was created.';
COMMENT ON COLUMN api_tokens.created_by IS 'The admin who created it (role/name).';
COMMENT ON COLUMN api_tokens.last_used_at IS 'Its latest request (recorded at most once a minute); NULL: never used.';
COMMENT ON COLUMN api_tokens.revoked_at IS 'When an admin revoked it (drover token revoke): every later request with it is refused. NULL: valid.';
COMMENT ON COLUMN api_tokens.revoked_by IS 'The admin who revoked it (role/name).';
