-- 010_queue_performance.sql — the queue under load (see docs/benchmarks.md).
--
-- 1. A claim belongs to a recipient being delivered, and to nothing else:
--    every statement that moves a recipient out of 'delivering' (results,
--    lease expiry, release at shutdown, the API's delete) clears claimed_by,
--    and now the database holds it to that.  The results statement relies
--    on it: it matches its rows by id and claimed_by only, so that the
--    planner finds them through the primary key and not through the
--    partial index of all recipients being delivered (recipients_lease),
--    which a cached generic plan chose once the queue had grown.

UPDATE recipients SET claimed_by = NULL, lease_until = NULL
    WHERE claimed_by IS NOT NULL AND state <> 'delivering';

ALTER TABLE recipients ADD CONSTRAINT recipients_claim_delivering
    CHECK (claimed_by IS NULL OR state = 'delivering');

COMMENT ON CONSTRAINT recipients_claim_delivering ON recipients IS
    'claimed_by is set only while the recipient is being delivered.';

-- 2. Message bodies are compressed with lz4 instead of pglz (new rows;
--    older rows stay as they are): pglz_compress was the largest single
--    function in PostgreSQL''s profile of the receive INSERT.  Where the
--    server was built without lz4 the column keeps the default.

DO $$
BEGIN
    ALTER TABLE messages ALTER COLUMN body SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available: messages.body stays with pglz';
END $$;
