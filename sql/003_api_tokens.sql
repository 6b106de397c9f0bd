-- 003_api_tokens.sql — bearer tokens for the admin API.
--
-- A secret is "sg_" followed by 43 base64url characters (32 random bytes);
-- only its SHA-256 is stored. It is shown once, when it is created.

CREATE TABLE api_tokens (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('admin', 'read-only')),
    token_sha256 text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

COMMENT ON TABLE api_tokens IS
    'Admin API tokens (Authorization: Bearer <secret>).';
COMMENT ON COLUMN api_tokens.id IS
    'Token id (API: /api/v1/tokens/{id}); referenced by audit_log.actor_token_id.';
COMMENT ON COLUMN api_tokens.name IS
    'Human-readable name, shown in the audit log as the actor.';
COMMENT ON COLUMN api_tokens.role IS
    'admin (read and write) or read-only (GET only).';
COMMENT ON COLUMN api_tokens.token_sha256 IS
    'Lowercase hex SHA-256 of the whole secret string (including the sg_ prefix).';
COMMENT ON COLUMN api_tokens.created_at IS
    'When the token was created.';
COMMENT ON COLUMN api_tokens.last_used_at IS
    'Last successful authentication with this token; NULL = never used.';
COMMENT ON COLUMN api_tokens.revoked_at IS
    'When the token was revoked; a revoked token is refused. NULL = active.';
