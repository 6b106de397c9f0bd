-- 005_relay_and_lists.sql — who may send through sg, and to whom.
--
-- Local domains receive from anyone and go to their internal server; other
-- domains are relayed only for clients in relay_networks. The STARTTLS
-- whitelist lists peers that never get STARTTLS (inbound: not advertised;
-- outbound: not used). Content filter rules may flag a message for
-- REQUIRETLS. Every change NOTIFYs sg_lists (payload: the table name) so
-- every worker reloads its copy.

CREATE FUNCTION sg_lists_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sg_lists', TG_TABLE_NAME);
    RETURN NULL;
END $$;
COMMENT ON FUNCTION sg_lists_notify() IS
    'Statement trigger: NOTIFY sg_lists with the changed table''s name.';

CREATE TABLE domains (
    id                  bigserial PRIMARY KEY,
    name                text NOT NULL UNIQUE
                        CHECK (name = lower(name) AND name !~ '\.$'),
    internal_server     text NOT NULL,
    requiretls_trusted  boolean NOT NULL DEFAULT false,
    mta_sts_mode        text NOT NULL DEFAULT 'none'
                        CHECK (mta_sts_mode IN ('none', 'testing', 'enforce')),
    mta_sts_mx          text[] NOT NULL DEFAULT '{}',
    mta_sts_max_age     integer NOT NULL DEFAULT 604800
                        CHECK (mta_sts_max_age BETWEEN 0 AND 31557600),
    tlsrpt_rua          text NOT NULL DEFAULT '',
    comment             text NOT NULL DEFAULT '',
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE domains IS
    'Local domains: accepted from anyone, delivered to internal_server.';
COMMENT ON COLUMN domains.name IS
    'The domain, lower case, A-labels, no trailing dot.';
COMMENT ON COLUMN domains.internal_server IS
    'Where mail for the domain goes: host:port (host name, IPv4, or [IPv6]).';
COMMENT ON COLUMN domains.requiretls_trusted IS
    'The internal server is trusted for REQUIRETLS: the REQUIRETLS keyword '
    'is not required of it (TLS still is).';
COMMENT ON COLUMN domains.mta_sts_mode IS
    'Mode of the MTA-STS policy sg hosts for this domain.';
COMMENT ON COLUMN domains.mta_sts_mx IS
    'mx: lines of the hosted MTA-STS policy.';
COMMENT ON COLUMN domains.mta_sts_max_age IS
    'max_age of the hosted MTA-STS policy, seconds.';
COMMENT ON COLUMN domains.tlsrpt_rua IS
    'rua= of the domain''s _smtp._tls record, e.g. mailto:tlsrpt@example.com.';
COMMENT ON COLUMN domains.comment IS 'Free text for admins.';
COMMENT ON COLUMN domains.created_at IS 'When the domain was added.';
COMMENT ON COLUMN domains.updated_at IS 'When the domain was last changed.';

CREATE TABLE relay_networks (
    id          bigserial PRIMARY KEY,
    value       cidr NOT NULL UNIQUE,
    comment     text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE relay_networks IS
    'Client networks allowed to relay to any domain.';
COMMENT ON COLUMN relay_networks.value IS
    'An IPv4 or IPv6 network (a single address is a /32 or /128).';
COMMENT ON COLUMN relay_networks.comment IS 'Free text for admins.';
COMMENT ON COLUMN relay_networks.created_at IS 'When the entry was added.';

CREATE TABLE starttls_whitelist (
    id          bigserial PRIMARY KEY,
    value       text NOT NULL UNIQUE,
    kind        text NOT NULL CHECK (kind IN ('ip', 'cidr', 'name')),
    comment     text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE starttls_whitelist IS
    'Peers exempt from STARTTLS: never advertised to them, never used '
    'when sending to them.';
COMMENT ON COLUMN starttls_whitelist.value IS
    'An IP address, a CIDR network, or a host name; a name also matches '
    'every name below it (mx.example.com matches a.mx.example.com).';
COMMENT ON COLUMN starttls_whitelist.kind IS
    'ip, cidr or name: derived from value by the API.';
COMMENT ON COLUMN starttls_whitelist.comment IS 'Free text for admins.';
COMMENT ON COLUMN starttls_whitelist.created_at IS 'When the entry was added.';

CREATE TABLE content_filter_rules (
    id          bigserial PRIMARY KEY,
    position    integer NOT NULL,
    name        text NOT NULL DEFAULT '',
    enabled     boolean NOT NULL DEFAULT true,
    conditions  jsonb NOT NULL,
    action      text NOT NULL CHECK (action IN ('flag_requiretls')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX content_filter_rules_position ON content_filter_rules (position, id);
COMMENT ON TABLE content_filter_rules IS
    'Ordered rules evaluated after DATA; the first enabled rule whose '
    'conditions all match applies its action.';
COMMENT ON COLUMN content_filter_rules.position IS
    'Evaluation order, ascending (ties by id).';
COMMENT ON COLUMN content_filter_rules.name IS 'Free text for admins.';
COMMENT ON COLUMN content_filter_rules.enabled IS 'Disabled rules are skipped.';
COMMENT ON COLUMN content_filter_rules.conditions IS
    'JSON array, all must match: {"field": "sender"|"recipient"|"header", '
    '"header": name (field header only), "match": "contains"|"regex", '
    '"value": text}. contains is case-insensitive; regex is PCRE2 '
    '(ngx_regex), case-sensitive unless written with (?i).';
COMMENT ON COLUMN content_filter_rules.action IS
    'flag_requiretls: "Flag message for REQUIRETLS" (the reference page''s action).';
COMMENT ON COLUMN content_filter_rules.created_at IS 'When the rule was added.';
COMMENT ON COLUMN content_filter_rules.updated_at IS 'When the rule was last changed.';

CREATE TRIGGER domains_notify AFTER INSERT OR UPDATE OR DELETE ON domains
    FOR EACH STATEMENT EXECUTE FUNCTION sg_lists_notify();
CREATE TRIGGER relay_networks_notify AFTER INSERT OR UPDATE OR DELETE ON relay_networks
    FOR EACH STATEMENT EXECUTE FUNCTION sg_lists_notify();
CREATE TRIGGER starttls_whitelist_notify AFTER INSERT OR UPDATE OR DELETE ON starttls_whitelist
    FOR EACH STATEMENT EXECUTE FUNCTION sg_lists_notify();
CREATE TRIGGER content_filter_rules_notify AFTER INSERT OR UPDATE OR DELETE ON content_filter_rules
    FOR EACH STATEMENT EXECUTE FUNCTION sg_lists_notify();
