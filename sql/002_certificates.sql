-- 002_certificates.sql — TLS certificates (self-signed, imported, ACME).
--
-- The active one is settings.active_certificate_id; it cannot be deleted
-- while active (ON DELETE RESTRICT).

CREATE TABLE certificates (
    id                     bigserial PRIMARY KEY,
    host_name              text NOT NULL,
    alternative_host_names text[] NOT NULL DEFAULT '{}',
    organization           text NOT NULL DEFAULT '',
    country                text NOT NULL DEFAULT '',
    key_type               text NOT NULL CHECK (key_type IN ('rsa', 'ecdsa')),
    certificate_pem        text NOT NULL,
    private_key_pem        text NOT NULL,
    source                 text NOT NULL
                           CHECK (source IN ('self-signed', 'import', 'acme')),
    not_before             timestamptz NOT NULL,
    not_after              timestamptz NOT NULL,
    fingerprint_sha256     text NOT NULL,
    created_at             timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE certificates IS
    'TLS certificates with their private keys, served by the SMTP and admin listeners.';
COMMENT ON COLUMN certificates.id IS
    'Certificate id (API: /api/v1/certificates/{id}).';
COMMENT ON COLUMN certificates.host_name IS
    'Main host name (subject CN and first SAN).';
COMMENT ON COLUMN certificates.alternative_host_names IS
    'Further subject alternative names (DNS names or IP addresses).';
COMMENT ON COLUMN certificates.organization IS
    'Subject organization (O), empty when none.';
COMMENT ON COLUMN certificates.country IS
    'Subject country (C, two letters), empty when none.';
COMMENT ON COLUMN certificates.key_type IS
    'Key algorithm: rsa or ecdsa.';
COMMENT ON COLUMN certificates.certificate_pem IS
    'PEM chain: the leaf certificate first, then the intermediates.';
COMMENT ON COLUMN certificates.private_key_pem IS
    'PEM private key of the leaf, unencrypted (an import passphrase is removed on import).';
COMMENT ON COLUMN certificates.source IS
    'How the certificate was obtained: self-signed (generated), import (uploaded), acme (issued via ACME).';
COMMENT ON COLUMN certificates.not_before IS
    'Start of validity of the leaf certificate.';
COMMENT ON COLUMN certificates.not_after IS
    'End of validity of the leaf certificate.';
COMMENT ON COLUMN certificates.fingerprint_sha256 IS
    'SHA-256 of the leaf certificate DER, lowercase hex without colons.';
COMMENT ON COLUMN certificates.created_at IS
    'When the row was inserted.';

ALTER TABLE settings
    ADD CONSTRAINT settings_active_certificate_id_fkey
    FOREIGN KEY (active_certificate_id) REFERENCES certificates (id)
    ON DELETE RESTRICT;
