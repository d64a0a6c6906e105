-- Statements of the ingest API. Each runs as mailbus_ingest.

-- name: keys_by_id
-- The keys of the requests that arrived together, by primary key: one round
-- trip for a group of lookups (services/ingest/coalesce.py), each sent after
-- its request arrived. What it reads is kept MAILBUS_KEY_CACHE_SECONDS
-- (keycache.py): a revocation is honoured within that time. A rotated-out
-- secret (migration 0020) comes with how long it stays valid, measured by the
-- database's clock, which set its end; authenticate() checks it on every
-- request, cached or not.
SELECT id, secret_sha256, scopes, accounts, default_pool, revoked_at, rate_limit,
       previous_secret_sha256,
       extract(epoch FROM previous_valid_until - now())::float8 AS previous_valid_seconds
FROM api_keys WHERE id = ANY(%(ids)s);

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

-- name: lock_idempotency_group
-- The records of a group commit's members (services/ingest/groupcommit.py),
-- locked in one order whatever the group: the sort runs below the row
-- locks, so two groups (two processes) waiting on each other's records
-- cannot deadlock. A group never holds one record twice.
SELECT key_id, idempotency_key, generation, request_sha256, status_code, response
FROM idempotency_keys
WHERE (key_id, idempotency_key) IN (
    SELECT * FROM unnest(%(key_ids)s::text[], %(idempotency_keys)s::text[]))
ORDER BY key_id, idempotency_key
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
                      idempotency_key, send_at, requested_at, attachments)
VALUES (%(id)s, %(key_id)s, %(account_id)s, %(pool)s, %(subject)s, %(recipients)s, %(tags)s,
        %(idempotency_key)s, %(send_at)s, %(requested_at)s, %(attachments)s)
ON CONFLICT (id) DO NOTHING;

-- name: insert_messages
-- A group commit's rows in one statement: one JSON array of rows rather than
-- a statement per row (the per-row protocol work was a seventh of the
-- process's time). jsonb_to_recordset turns each JSON array into the text[]
-- of its column. ON CONFLICT as above. A row whose key was deleted (by hand:
-- the API only revokes) since its request was authenticated is left out
-- rather than failing the group: its event travels beside the others and is
-- accepted like them, and with its key gone nobody could read the row.
INSERT INTO messages (id, key_id, account_id, pool, subject, recipients, tags,
                      idempotency_key, send_at, requested_at, attachments)
SELECT id, key_id, account_id, pool, subject, recipients, tags, idempotency_key, send_at,
       requested_at, attachments
FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(
    id uuid, key_id text, account_id text, pool text, subject text, recipients integer,
    tags text[], idempotency_key text, send_at timestamptz, requested_at timestamptz,
    attachments text[])
WHERE EXISTS (SELECT 1 FROM api_keys k WHERE k.id = r.key_id)
ON CONFLICT (id) DO NOTHING;
