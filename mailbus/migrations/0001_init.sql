-- The foundation: API keys, accepted messages, idempotency keys.
-- Runs as mailbus_owner; each service role gets only what it uses.

-- API keys. Only a SHA-256 of the secret is kept: the secret is 256 random
-- bits, so a slow password hash would add latency to every request and no
-- protection. `accounts` NULL means every account.
CREATE TABLE api_keys (
    id            text PRIMARY KEY,
    name          text NOT NULL,
    secret_sha256 bytea NOT NULL,
    scopes        text[] NOT NULL,
    accounts      text[],
    default_pool  text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    CONSTRAINT api_keys_scopes_known CHECK (scopes <@ ARRAY['send', 'read', 'admin']::text[])
);

-- What the API accepted, for GET /v1/messages/{id} and per-key scoping.
-- Status grows beyond 'queued' as later services project their events.
CREATE TABLE messages (
    id              uuid PRIMARY KEY,
    key_id          text NOT NULL REFERENCES api_keys (id),
    account_id      text NOT NULL,
    pool            text,
    status          text NOT NULL DEFAULT 'queued',
    subject         text,
    recipients      integer NOT NULL,
    tags            text[] NOT NULL DEFAULT '{}',
    idempotency_key text,
    send_at         timestamptz,
    requested_at    timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- Listing a key's messages newest first.
CREATE INDEX messages_key_requested ON messages (key_id, requested_at DESC);

-- Idempotency-Key records. The primary key is also the lock: a concurrent
-- duplicate's INSERT waits on the first transaction's uncommitted row and
-- then sees it (commit) or takes its place (rollback), so exactly one event
-- is produced. The stored response is replayed to every retry.
CREATE TABLE idempotency_keys (
    key_id          text NOT NULL REFERENCES api_keys (id),
    idempotency_key text NOT NULL,
    request_sha256  bytea NOT NULL,
    status_code     integer NOT NULL,
    response        jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, idempotency_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

GRANT SELECT ON api_keys TO mailbus_ingest;
GRANT SELECT, INSERT ON messages TO mailbus_ingest;
GRANT SELECT, INSERT, UPDATE ON idempotency_keys TO mailbus_ingest;

GRANT SELECT, INSERT, UPDATE ON api_keys TO mailbus_admin;
GRANT SELECT ON messages, idempotency_keys TO mailbus_admin;
GRANT DELETE ON idempotency_keys TO mailbus_admin;
