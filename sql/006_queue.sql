-- 006_queue.sql — the durable queue.
--
-- A message and all its recipients are inserted by one statement, before
-- the SMTP server answers 250 with messages.id: a message is either wholly
-- queued or not at all. Each insert NOTIFYs sg_queue so that delivery wakes.

CREATE TABLE messages (
    id                   text PRIMARY KEY CHECK (id ~ '^[0-9A-F]{16}$'),
    received_at          timestamptz NOT NULL DEFAULT now(),
    sender               text NOT NULL,
    size                 bigint NOT NULL CHECK (size >= 0),
    body                 bytea NOT NULL,
    body_type            text NOT NULL DEFAULT '7BIT'
                         CHECK (body_type IN ('7BIT', '8BITMIME')),
    smtputf8             boolean NOT NULL DEFAULT false,
    dsn_ret              text CHECK (dsn_ret IN ('FULL', 'HDRS')),
    dsn_envid            text,
    requiretls           boolean NOT NULL DEFAULT false,
    requiretls_sources   text[] NOT NULL DEFAULT '{}',
    content_filter_rule_id bigint,
    tls_required_no      boolean NOT NULL DEFAULT false,
    client_ip            inet NOT NULL,
    client_port          integer,
    client_name          text,
    helo                 text NOT NULL,
    esmtp                boolean NOT NULL,
    tls_protocol         text,
    tls_cipher           text,
    listener             text
);
CREATE INDEX messages_received_at ON messages (received_at);
CREATE INDEX messages_sender ON messages (sender);

COMMENT ON TABLE messages IS
    'One row per accepted message; its recipients are in recipients.';
COMMENT ON COLUMN messages.id IS
    'Queue id: 16 upper-case hex digits, random; given in the 250 reply.';
COMMENT ON COLUMN messages.received_at IS 'When DATA was accepted.';
COMMENT ON COLUMN messages.sender IS
    'Envelope sender (MAIL FROM), '''' for the null sender <>.';
COMMENT ON COLUMN messages.size IS
    'Octets of body (the message as received, without dot-stuffing, with '
    'CRLF line ends, including the Received: header sg added).';
COMMENT ON COLUMN messages.body IS 'The message.';
COMMENT ON COLUMN messages.body_type IS 'MAIL BODY= parameter (RFC 6152).';
COMMENT ON COLUMN messages.smtputf8 IS 'MAIL SMTPUTF8 parameter (RFC 6531).';
COMMENT ON COLUMN messages.dsn_ret IS 'MAIL RET= (RFC 3461, 4.3), NULL if not given.';
COMMENT ON COLUMN messages.dsn_envid IS
    'MAIL ENVID= (RFC 3461, 4.4), xtext-decoded, NULL if not given.';
COMMENT ON COLUMN messages.requiretls IS
    'The message must be delivered with REQUIRETLS (RFC 8689).';
COMMENT ON COLUMN messages.requiretls_sources IS
    'Why it is flagged: ''parameter'' (MAIL ... REQUIRETLS), '
    '''rule:<id>'' (content filter rule), ''address:<original rcpt>'' '
    '(a +requiretls recipient).';
COMMENT ON COLUMN messages.content_filter_rule_id IS
    'The content filter rule that matched, if any.';
COMMENT ON COLUMN messages.tls_required_no IS
    'The message has a "TLS-Required: No" header (RFC 8689, 5) and is not '
    'flagged for REQUIRETLS.';
COMMENT ON COLUMN messages.client_ip IS
    'The SMTP client (the real one behind a PROXY protocol load balancer).';
COMMENT ON COLUMN messages.client_port IS 'The client''s TCP port.';
COMMENT ON COLUMN messages.client_name IS 'The client''s reverse DNS name, if known.';
COMMENT ON COLUMN messages.helo IS 'The HELO/EHLO argument.';
COMMENT ON COLUMN messages.esmtp IS 'The client said EHLO (not HELO).';
COMMENT ON COLUMN messages.tls_protocol IS 'TLS version of the session, NULL in clear.';
COMMENT ON COLUMN messages.tls_cipher IS 'TLS cipher of the session, NULL in clear.';
COMMENT ON COLUMN messages.listener IS 'The local address:port that received it.';

CREATE TABLE recipients (
    id                   bigserial PRIMARY KEY,
    message_id           text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    address              text NOT NULL,
    original_address     text NOT NULL,
    domain               text NOT NULL,
    local_domain         boolean NOT NULL,
    dsn_notify           text,
    dsn_orcpt            text,
    state                text NOT NULL DEFAULT 'queued'
                         CHECK (state IN ('queued', 'delivering', 'deferred',
                                          'delivered', 'bounced', 'deleted')),
    next_attempt_at      timestamptz NOT NULL DEFAULT now(),
    attempts             integer NOT NULL DEFAULT 0,
    last_reply           text
);
CREATE INDEX recipients_message ON recipients (message_id);
CREATE INDEX recipients_due ON recipients (next_attempt_at)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX recipients_domain ON recipients (domain);

COMMENT ON TABLE recipients IS 'The recipients of each queued message.';
COMMENT ON COLUMN recipients.message_id IS 'The message (messages.id).';
COMMENT ON COLUMN recipients.address IS
    'The address to deliver to (a +requiretls tag removed).';
COMMENT ON COLUMN recipients.original_address IS
    'The address as given in RCPT TO.';
COMMENT ON COLUMN recipients.domain IS
    'Domain of address, lower case: the routing key.';
COMMENT ON COLUMN recipients.local_domain IS
    'The domain is one of sg''s local domains (delivered to its internal server).';
COMMENT ON COLUMN recipients.dsn_notify IS
    'RCPT NOTIFY= (RFC 3461, 4.1): NEVER or a comma list of SUCCESS, '
    'FAILURE, DELAY; NULL if not given.';
COMMENT ON COLUMN recipients.dsn_orcpt IS
    'RCPT ORCPT= (RFC 3461, 4.2) as given (addr-type;xtext).';
COMMENT ON COLUMN recipients.state IS 'Delivery state of this recipient.';
COMMENT ON COLUMN recipients.next_attempt_at IS 'When delivery is due.';
COMMENT ON COLUMN recipients.attempts IS 'Delivery attempts so far.';
COMMENT ON COLUMN recipients.last_reply IS 'The last delivery result, for people.';

CREATE FUNCTION sg_queue_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sg_queue', '');
    RETURN NULL;
END $$;
COMMENT ON FUNCTION sg_queue_notify() IS
    'Statement trigger: NOTIFY sg_queue when recipients are queued.';

CREATE TRIGGER recipients_notify AFTER INSERT ON recipients
    FOR EACH STATEMENT EXECUTE FUNCTION sg_queue_notify();
