-- Statements of the ingest API. Each runs as mailbus_ingest.

-- name: key_by_id
-- One lookup per request, by primary key: revocation takes effect at once,
-- which a cache would delay.
SELECT id, secret_sha256, scopes, accounts, default_pool, revoked_at, rate_limit
FROM api_keys WHERE id = %(key_id)s;

-- name: forget_expired_idempotency
-- A record past its retention is gone for the client even when the pruner
-- has not reached it yet: the answer must not depend on when pruning ran.
DELETE FROM idempotency_keys
WHERE key_id = %(key_id)s AND idempotency_key = %(idempotency_key)s
  AND created_at < now() - make_interval(secs => %(retention)s);

-- name: claim_idempotency
-- Committed on its own, before any message is produced: the generation it
-- draws names this use of the key, and a retry after a failed attempt (one
-- that may have reached Kafka) finds the same row and so the same message
-- ids. A concurrent duplicate waits here on the unique index until the
-- first claim commits, then gets no row back and reads it.
INSERT INTO idempotency_keys (key_id, idempotency_key, request_sha256, status_code, response)
VALUES (%(key_id)s, %(idempotency_key)s, %(request_sha256)s, 0, '{}')
ON CONFLICT (key_id, idempotency_key) DO NOTHING
RETURNING generation;

-- name: idempotency_generation
-- A separate statement, so its snapshot sees a row a concurrent claim
-- committed while the INSERT above waited on it.
SELECT generation FROM idempotency_keys
WHERE key_id = %(key_id)s AND idempotency_key = %(idempotency_key)s;

-- name: lock_idempotency
-- The row lock serialises duplicates while the first one produces: the
-- second reads the stored answer once the first committed.
SELECT generation, request_sha256, status_code, response
FROM idempotency_keys WHERE key_id = %(key_id)s AND idempotency_key = %(idempotency_key)s
FOR UPDATE;

-- name: finish_idempotency
-- status_code 0 marks a claim not answered yet; the digest is the body
-- that was finally accepted (a claim whose attempt failed may be retried
-- with another body, as if it had never been made).
UPDATE idempotency_keys
SET status_code = %(status_code)s, response = %(response)s, request_sha256 = %(request_sha256)s
WHERE key_id = %(key_id)s AND idempotency_key = %(idempotency_key)s;

-- name: prune_idempotency
-- Oldest first through idempotency_keys_created, a bounded batch per
-- statement so a backlog never makes one long transaction. SKIP LOCKED
-- passes over a record a request holds right now (and avoids two ingest
-- processes pruning the same rows); the next round takes it.
DELETE FROM idempotency_keys
WHERE (key_id, idempotency_key) IN (
    SELECT key_id, idempotency_key FROM idempotency_keys
    WHERE created_at < now() - make_interval(secs => %(retention)s)
    ORDER BY created_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED);

-- name: insert_message
-- ON CONFLICT: a retried batch item with a deterministic id inserts once.
INSERT INTO messages (id, key_id, account_id, pool, subject, recipients, tags,
                      idempotency_key, send_at, requested_at)
VALUES (%(id)s, %(key_id)s, %(account_id)s, %(pool)s, %(subject)s, %(recipients)s, %(tags)s,
        %(idempotency_key)s, %(send_at)s, %(requested_at)s)
ON CONFLICT (id) DO NOTHING;
