-- 001_settings.sql — the one row of gateway settings.
--
-- The admin API reads and PATCHes `doc`; every nginx worker LISTENs on the
-- channel `sg_settings` and reloads the row when the version it receives is
-- newer than the one it holds.

CREATE TABLE settings (
    id                    int PRIMARY KEY CHECK (id = 1),
    doc                   jsonb NOT NULL,
    active_certificate_id bigint,
    version               bigint NOT NULL DEFAULT 1,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    updated_by            text
);

COMMENT ON TABLE settings IS
    'Gateway settings: exactly one row (id = 1). Changed only through the admin API.';
COMMENT ON COLUMN settings.id IS
    'Always 1: the table holds a single row.';
COMMENT ON COLUMN settings.doc IS
    'Settings document (JSON object) with the keys of the API settings shape: '
    'tls_enabled, starttls_outbound, tls_failure_fallback, requiretls_enabled, '
    'mta_sts_enabled, tls_reporting {enabled, organization_name, contact_info, '
    'submitter, include_failure_details, copy_to, send_hour_utc, dkim_selector}. '
    'active_certificate_id is kept in its own column, not in doc.';
COMMENT ON COLUMN settings.active_certificate_id IS
    'Certificate served for inbound STARTTLS and admin HTTPS '
    '(certificates.id, see 002); NULL = none, STARTTLS is not offered.';
COMMENT ON COLUMN settings.version IS
    'Incremented by trigger on every UPDATE; sent as the payload of '
    'NOTIFY sg_settings so workers know when to reload.';
COMMENT ON COLUMN settings.updated_at IS
    'Time of the last change (set by trigger).';
COMMENT ON COLUMN settings.updated_by IS
    'Who made the last change: API token name, or ''bootstrap''.';

INSERT INTO settings (id, doc) VALUES (1, '{
    "tls_enabled": false,
    "starttls_outbound": false,
    "tls_failure_fallback": true,
    "requiretls_enabled": true,
    "mta_sts_enabled": true,
    "tls_reporting": {
        "enabled": false,
        "organization_name": "",
        "contact_info": "",
        "submitter": "",
        "include_failure_details": true,
        "copy_to": null,
        "send_hour_utc": 1,
        "dkim_selector": ""
    }
}'::jsonb);

CREATE FUNCTION settings_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

COMMENT ON FUNCTION settings_bump_version() IS
    'BEFORE UPDATE trigger on settings: version = old version + 1, updated_at = now().';

CREATE TRIGGER settings_bump_version
    BEFORE UPDATE ON settings
    FOR EACH ROW EXECUTE FUNCTION settings_bump_version();

CREATE FUNCTION settings_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sg_settings', NEW.version::text);
    RETURN NULL;
END
$$;

COMMENT ON FUNCTION settings_notify() IS
    'AFTER UPDATE trigger on settings: NOTIFY sg_settings with the new version.';

CREATE TRIGGER settings_notify
    AFTER UPDATE ON settings
    FOR EACH ROW EXECUTE FUNCTION settings_notify();
