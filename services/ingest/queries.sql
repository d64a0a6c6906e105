-- Statements of the ingest API. Each runs as mailbus_ingest.

-- name: key_by_id
-- One lookup per request, by primary key: revocation takes effect at once,
-- which a cache would delay.
SELECT id, secret_sha256, scopes, accounts, default_pool, revoked_at
FROM api_keys WHERE id = %(key_id)s;

-- name: claim_idempotency
-- The insert is the lock. A concurrent duplicate blocks here on the unique
-- index until the first transaction ends, then gets no row back (it
-- committed) or inserts its own (it rolled back after a failed produce).
INSERT INTO idempotency_keys (key_id, idempotency_key, request_sha256, status_code, response)
VALUES (%(key_id)s, %(idempotency_key)s, %(request_sha256)s, 0, '{}')
ON CONFLICT (key_id, idempotency_key) DO NOTHING
RETURNING key_id;

-- name: idempotency_record
SELECT request_sha256, status_code, response
FROM idempotency_keys WHERE key_id = %(key_id)s AND idempotency_key = %(idempotency_key)s;

-- name: finish_idempotency
UPDATE idempotency_keys SET status_code = %(status_code)s, response = %(response)s
WHERE key_id = %(key_id)s AND idempotency_key = %(idempotency_key)s;

-- name: insert_message
-- ON CONFLICT: a retried batch item with a deterministic id inserts once.
INSERT INTO messages (id, key_id, account_id, pool, subject, recipients, tags,
                      idempotency_key, send_at, requested_at)
VALUES (%(id)s, %(key_id)s, %(account_id)s, %(pool)s, %(subject)s, %(recipients)s, %(tags)s,
        %(idempotency_key)s, %(send_at)s, %(requested_at)s)
ON CONFLICT (id) DO NOTHING;
