-- 007_queue_indexes.sql — the queue API filters by sender case-insensitively;
-- a unix-socket listener has no client IP address.

CREATE INDEX messages_sender_lower ON messages (lower(sender));

ALTER TABLE messages ALTER COLUMN client_ip DROP NOT NULL;
COMMENT ON COLUMN messages.client_ip IS
    'The SMTP client (the real one behind a PROXY protocol load balancer); '
    'NULL on a unix-socket listener.';
