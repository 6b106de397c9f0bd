-- 008_delivery.sql — delivery: claims with leases, attempts, DSN state,
-- the STARTTLS required list and routes.
--
-- A worker claims due recipients (FOR UPDATE SKIP LOCKED), sets them to
-- 'delivering' with claimed_by and lease_until, and renews the lease while
-- it works; a claim whose lease ran out (the worker died) is released by
-- any worker back to 'deferred'.

ALTER TABLE recipients
    ADD COLUMN claimed_by      text,
    ADD COLUMN lease_until     timestamptz,
    ADD COLUMN final_at        timestamptz,
    ADD COLUMN dsn_status      text,
    ADD COLUMN dsn_action      text
        CHECK (dsn_action IN ('failed', 'delivered', 'relayed')),
    ADD COLUMN dsn_remote_mta  text,
    ADD COLUMN dsn_due         boolean NOT NULL DEFAULT false,
    ADD COLUMN delay_notified  boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN recipients.claimed_by IS
    'The worker delivering it now (host:pid:start), while state is delivering.';
COMMENT ON COLUMN recipients.lease_until IS
    'The claim is valid until then; the worker renews it while it works.';
COMMENT ON COLUMN recipients.final_at IS
    'When it was delivered, bounced or deleted.';
COMMENT ON COLUMN recipients.dsn_status IS
    'RFC 3463 status code of the final outcome (2.0.0, 5.1.1, 4.4.7 ...).';
COMMENT ON COLUMN recipients.dsn_action IS
    'RFC 3464, 2.3.3 action of the final outcome, for the DSN.';
COMMENT ON COLUMN recipients.dsn_remote_mta IS
    'The host that gave the final reply, if any.';
COMMENT ON COLUMN recipients.dsn_due IS
    'A DSN reports this outcome and has not been queued yet; one DSN per '
    'message is queued once no recipient of it is pending.';
COMMENT ON COLUMN recipients.delay_notified IS
    'A delay DSN (NOTIFY=DELAY) was queued for it.';

CREATE INDEX recipients_lease ON recipients (lease_until)
    WHERE state = 'delivering';
CREATE INDEX recipients_dsn_due ON recipients (message_id) WHERE dsn_due;

ALTER TABLE messages
    ADD COLUMN dsn_of          text,
    ADD COLUMN last_attempt_at timestamptz;

COMMENT ON COLUMN messages.dsn_of IS
    'For a DSN sg generated: the queue id of the message it reports on.';
COMMENT ON COLUMN messages.last_attempt_at IS
    'When a delivery attempt for it last ended.';

CREATE TABLE delivery_attempts (
    id               bigserial PRIMARY KEY,
    message_id       text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    recipients       text[] NOT NULL,
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz NOT NULL DEFAULT now(),
    destination      text NOT NULL,
    mx_host          text,
    ip               inet,
    port             integer,
    tls_level        text,
    tls_rule         integer,
    tls_reason       text,
    starttls         boolean NOT NULL DEFAULT false,
    tls_protocol     text,
    tls_cipher       text,
    tls_verify       text,
    tls_host_match   boolean,
    tls_result_type  text,
    result           text NOT NULL
                     CHECK (result IN ('delivered', 'deferred', 'bounced',
                                       'next_mx', 'retry_clear')),
    reply            text,
    worker           text
);
CREATE INDEX delivery_attempts_message ON delivery_attempts (message_id, id);

COMMENT ON TABLE delivery_attempts IS
    'Every delivery attempt: one row per message, MX address and try.';
COMMENT ON COLUMN delivery_attempts.message_id IS 'The message (messages.id).';
COMMENT ON COLUMN delivery_attempts.recipients IS
    'The recipient addresses the attempt was for.';
COMMENT ON COLUMN delivery_attempts.started_at IS 'When the attempt began.';
COMMENT ON COLUMN delivery_attempts.ended_at IS 'When its result was known.';
COMMENT ON COLUMN delivery_attempts.destination IS
    'The routing key: the recipient domain, route:<relay> or local:<domain>.';
COMMENT ON COLUMN delivery_attempts.mx_host IS
    'The host name connected to (MX, relay host or internal server).';
COMMENT ON COLUMN delivery_attempts.ip IS 'The address connected to.';
COMMENT ON COLUMN delivery_attempts.port IS 'The port connected to.';
COMMENT ON COLUMN delivery_attempts.tls_level IS
    'The outbound TLS decision: none, may, encrypt, dane or verify.';
COMMENT ON COLUMN delivery_attempts.tls_rule IS
    'The row of the decision table that decided (1..7).';
COMMENT ON COLUMN delivery_attempts.tls_reason IS 'The decision''s reason.';
COMMENT ON COLUMN delivery_attempts.starttls IS 'STARTTLS was completed.';
COMMENT ON COLUMN delivery_attempts.tls_protocol IS 'TLS version, NULL in clear.';
COMMENT ON COLUMN delivery_attempts.tls_cipher IS 'TLS cipher, NULL in clear.';
COMMENT ON COLUMN delivery_attempts.tls_verify IS
    'Certificate verification: ok, or OpenSSL''s reason.';
COMMENT ON COLUMN delivery_attempts.tls_host_match IS
    'The certificate names the host connected to.';
COMMENT ON COLUMN delivery_attempts.tls_result_type IS
    'RFC 8460, 4.3 result type of a failed TLS session, NULL on success.';
COMMENT ON COLUMN delivery_attempts.result IS
    'delivered, deferred, bounced; next_mx: this host failed and the next '
    'was tried; retry_clear: the handshake failed and the delivery was '
    'retried at once without STARTTLS.';
COMMENT ON COLUMN delivery_attempts.reply IS
    'The remote reply or sg''s reason, for people.';
COMMENT ON COLUMN delivery_attempts.worker IS 'The worker that made it.';

CREATE TABLE starttls_required (
    id          bigserial PRIMARY KEY,
    value       text NOT NULL UNIQUE,
    kind        text NOT NULL CHECK (kind IN ('ip', 'cidr', 'name')),
    comment     text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE starttls_required IS
    'Hosts sg must use STARTTLS with when sending: a failed or missing '
    'STARTTLS defers, nothing is sent in clear.';
COMMENT ON COLUMN starttls_required.value IS
    'An IP address, a CIDR network, or a host name (which also matches '
    'every name below it).';
COMMENT ON COLUMN starttls_required.kind IS
    'ip, cidr or name: derived from value by the API.';
COMMENT ON COLUMN starttls_required.comment IS 'Free text for admins.';
COMMENT ON COLUMN starttls_required.created_at IS 'When the entry was added.';

CREATE TABLE routes (
    id          bigserial PRIMARY KEY,
    domain      text NOT NULL UNIQUE
                CHECK (domain = '*' OR (domain = lower(domain)
                                        AND domain !~ '\.$')),
    relay       text NOT NULL,
    comment     text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE routes IS
    'Mail for a domain (or for every domain without its own route: *) '
    'goes to a relay host instead of the domain''s MX.';
COMMENT ON COLUMN routes.domain IS
    'The recipient domain, lower case, or * for the default route.';
COMMENT ON COLUMN routes.relay IS
    'host:port (host name, IPv4, or [IPv6]); the TLS rules apply to it.';
COMMENT ON COLUMN routes.comment IS 'Free text for admins.';
COMMENT ON COLUMN routes.created_at IS 'When the route was added.';
COMMENT ON COLUMN routes.updated_at IS 'When the route was last changed.';

CREATE TRIGGER starttls_required_notify
    AFTER INSERT OR UPDATE OR DELETE ON starttls_required
    FOR EACH STATEMENT EXECUTE FUNCTION sg_lists_notify();
CREATE TRIGGER routes_notify AFTER INSERT OR UPDATE OR DELETE ON routes
    FOR EACH STATEMENT EXECUTE FUNCTION sg_lists_notify();

