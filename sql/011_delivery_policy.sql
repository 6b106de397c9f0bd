-- The policy behind each delivery attempt, for SMTP TLS reports (RFC 8460)
-- and for the queue entry: which MTA-STS policy applied, what of it failed,
-- and, for REQUIRETLS messages (RFC 8689, 4.1), each requirement's outcome.

ALTER TABLE delivery_attempts
    ADD COLUMN policy_type text
        CHECK (policy_type IN ('sts', 'tlsa', 'no-policy-found')),
    ADD COLUMN policy_domain text,
    ADD COLUMN policy_id text,
    ADD COLUMN policy_mode text CHECK (policy_mode IN ('enforce', 'testing')),
    ADD COLUMN policy_text text,
    ADD COLUMN policy_result_type text,
    ADD COLUMN policy_reason text,
    ADD COLUMN requirements jsonb;

COMMENT ON COLUMN delivery_attempts.policy_type IS
    'RFC 8460, 4.4 policy-type of the attempt: sts, tlsa or no-policy-found.';
COMMENT ON COLUMN delivery_attempts.policy_domain IS
    'The policy domain: the recipient domain, or the relay host of a route.';
COMMENT ON COLUMN delivery_attempts.policy_id IS
    'The MTA-STS policy id (the TXT record''s id) that applied.';
COMMENT ON COLUMN delivery_attempts.policy_mode IS
    'The MTA-STS policy''s mode: enforce or testing.';
COMMENT ON COLUMN delivery_attempts.policy_text IS
    'The MTA-STS policy as fetched (RFC 8460 policy-string source).';
COMMENT ON COLUMN delivery_attempts.policy_result_type IS
    'RFC 8460, 4.3 result type of the policy: sts-policy-fetch-error, '
    'sts-policy-invalid, sts-webpki-invalid, or validation-failure when the '
    'MX host does not match the policy; NULL when nothing failed.';
COMMENT ON COLUMN delivery_attempts.policy_reason IS
    'Why the policy failed (RFC 8460 failure-reason-code), e.g. '
    '"mx-mismatch: ..." or the fetch error; NULL when nothing failed.';
COMMENT ON COLUMN delivery_attempts.requirements IS
    'REQUIRETLS messages only: mx_validated, starttls, certificate and '
    'requiretls_offered, each "ok", "failed" or "not reached" (with why).';
