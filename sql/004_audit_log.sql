-- 004_audit_log.sql — who changed what through the admin API.

CREATE TABLE audit_log (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    actor          text NOT NULL,
    actor_token_id bigint REFERENCES api_tokens (id) ON DELETE SET NULL,
    action         text NOT NULL,
    object         text NOT NULL,
    old            jsonb,
    new            jsonb,
    client         text
);

CREATE INDEX audit_log_at_idx ON audit_log (at);

COMMENT ON TABLE audit_log IS
    'Append-only record of every change made through the admin API.';
COMMENT ON COLUMN audit_log.id IS
    'Entry id (increasing; API list cursor).';
COMMENT ON COLUMN audit_log.at IS
    'When the change was made.';
COMMENT ON COLUMN audit_log.actor IS
    'Who made it: token name at the time, or ''bootstrap''/''system''.';
COMMENT ON COLUMN audit_log.actor_token_id IS
    'The api_tokens row used; NULL for system actions or once the token is deleted.';
COMMENT ON COLUMN audit_log.action IS
    'What was done, e.g. create, update, delete, activate, revoke.';
COMMENT ON COLUMN audit_log.object IS
    'What it was done to, e.g. settings, certificate:12, token:3.';
COMMENT ON COLUMN audit_log.old IS
    'The object before the change (secrets removed); NULL on create.';
COMMENT ON COLUMN audit_log.new IS
    'The object after the change (secrets removed); NULL on delete.';
COMMENT ON COLUMN audit_log.client IS
    'Client address of the API request.';
