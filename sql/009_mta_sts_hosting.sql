-- 009_mta_sts_hosting.sql — the id of the MTA-STS policy sg hosts for each
-- local domain.
--
-- sg serves a local domain's policy (mta_sts_mode, mta_sts_mx,
-- mta_sts_max_age) at https://mta-sts.<domain>/.well-known/mta-sts.txt;
-- senders refetch it only when the id in the domain's _mta-sts TXT record
-- changes (RFC 8461, 3.1). So every change of the policy gets a new id
-- here, whoever makes it: the API, or an UPDATE by hand. The id is
-- "<UTC time of the change>Z<counter>", e.g. 20261128T153000Z42: 1 to 32
-- letters and digits (RFC 8461, 3.1), never the same twice, readable.

CREATE SEQUENCE mta_sts_id_seq;
COMMENT ON SEQUENCE mta_sts_id_seq IS
    'Counter part of domains.mta_sts_id: no two policy ids are the same.';

CREATE FUNCTION sg_mta_sts_new_id() RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC',
                   'YYYYMMDD"T"HH24MISS')
           || 'Z' || (nextval('mta_sts_id_seq') % 10000000000000000)::text
$$;
COMMENT ON FUNCTION sg_mta_sts_new_id() IS
    'A new MTA-STS policy id (RFC 8461, 3.1): UTC time, "Z", a counter; '
    'at most 32 letters and digits.';

-- a volatile default: every existing row gets an id of its own
ALTER TABLE domains
    ADD COLUMN mta_sts_id text NOT NULL DEFAULT sg_mta_sts_new_id()
        CHECK (mta_sts_id ~ '^[A-Za-z0-9]{1,32}$');
COMMENT ON COLUMN domains.mta_sts_id IS
    'id= of the domain''s _mta-sts TXT record (RFC 8461, 3.1): changes by '
    'itself whenever mta_sts_mode, mta_sts_mx or mta_sts_max_age change.';

CREATE FUNCTION domains_mta_sts_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.mta_sts_mode IS DISTINCT FROM OLD.mta_sts_mode
       OR NEW.mta_sts_mx IS DISTINCT FROM OLD.mta_sts_mx
       OR NEW.mta_sts_max_age IS DISTINCT FROM OLD.mta_sts_max_age
    THEN
        NEW.mta_sts_id := sg_mta_sts_new_id();
    END IF;
    RETURN NEW;
END $$;
COMMENT ON FUNCTION domains_mta_sts_id() IS
    'Row trigger: a new domains.mta_sts_id when the hosted policy changes.';

CREATE TRIGGER domains_mta_sts_id BEFORE UPDATE ON domains
    FOR EACH ROW EXECUTE FUNCTION domains_mta_sts_id();
