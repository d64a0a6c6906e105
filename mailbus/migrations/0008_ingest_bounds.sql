-- Bounds at the ingest API: Idempotency-Key records expire, keys may carry
-- their own request rate.

-- Ingest prunes expired Idempotency-Key records itself, oldest first, in
-- small batches; the index idempotency_keys_created (0001) finds them
-- without a scan.
GRANT DELETE ON idempotency_keys TO mailbus_ingest;

-- One use of an Idempotency-Key. Message ids derive from (API key,
-- Idempotency-Key, generation, batch index): a retry of an attempt that
-- reached Kafka but was not answered finds the same record and so the same
-- ids (the sender's ledger sends them once), while the same Idempotency-Key
-- reused after its record expired gets a fresh generation and new messages.
-- Rows written before this migration are all answered already: a replay
-- returns their stored response and never derives ids again.
ALTER TABLE idempotency_keys ADD COLUMN generation uuid NOT NULL DEFAULT gen_random_uuid();

-- A key's own request rate (the `limits` notation, e.g. '100/second' or
-- '6000 per minute'); NULL: the installation's MAILBUS_RATE_LIMIT. The check
-- keeps an unreadable value out, so a typo cannot turn a key's limit off,
-- and the count under 100,000: the moving window keeps a timestamp per
-- request inside it, in each ingest process's memory.
ALTER TABLE api_keys ADD COLUMN rate_limit text
    CONSTRAINT api_keys_rate_limit_form
    CHECK (rate_limit ~ '^[1-9][0-9]{0,4} ?(/|per) ?([1-9][0-9]{0,5} )?(second|minute|hour|day)s?$');
