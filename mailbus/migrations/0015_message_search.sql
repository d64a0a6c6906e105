-- Finding a message: GET /v1/messages by recipient, tag, account, status and
-- time, newest first, keyset-paginated on (requested_at, id) like the plain
-- listing.
--
-- Recipients, tags and accounts are searched through a side table of
-- (field, value, message) rows rather than GIN indexes on messages: a GIN
-- index can say which rows hold a value but not in which order, so a page of
-- a common value (a tag on half a million messages) would fetch and sort
-- every match before returning fifty. A btree on (namespace, field, value,
-- key_id, requested_at, message_id) returns the page in order, scanned
-- backwards from the cursor, at any depth and any selectivity (bench/README.md,
-- "Finding a message", has the plans at 1,000,000 messages).
--
-- The projector writes these rows, not the ingest API: off the request path
-- (written in the request's statement they tripled the time of the batch
-- endpoint's insert), from the events it reads anyway, in the
-- transaction that projects them. So a message is found once projected:
-- recipients and tags when its email.requested is, its account when its
-- email.sent is. Rows are never deleted, like the events they come from.
-- Messages projected before this migration have no rows here: a recipient,
-- tag or account search does not find them.
--
--   namespace  the topic prefix of the installation, as in message_events
--   field      'recipient' (every address of to, cc and bcc, lower-cased
--              whole, as the API normalises a recipient and then folds case),
--              'tag' (exact), or 'account' (the account of each email.sent)
--   key_id     the key that sent the message (email.requested's key_id):
--              the scope of every non-admin search, ahead of the time so
--              that a key's page is one range of the index
CREATE TABLE message_search (
    namespace    text NOT NULL,
    field        text NOT NULL,
    value        text NOT NULL,
    key_id       text NOT NULL,
    requested_at timestamptz NOT NULL,
    message_id   uuid NOT NULL,
    CONSTRAINT message_search_field CHECK (field IN ('recipient', 'tag', 'account')),
    PRIMARY KEY (namespace, field, value, key_id, requested_at, message_id)
);
-- Admin keys search every key's messages.
CREATE INDEX message_search_all
    ON message_search (namespace, field, value, requested_at, message_id);

-- The key and the time of a message, kept with its status: an email.sent
-- names neither, and its account row needs both (its email.requested may
-- have been projected in an earlier batch, or be projected in a later one).
ALTER TABLE message_status ADD COLUMN key_id text, ADD COLUMN requested_at timestamptz;

-- The projector writes the rows (never updates or deletes one); the API reads them.
GRANT SELECT, INSERT ON message_search TO mailbus_projector;
GRANT UPDATE (key_id, requested_at) ON message_status TO mailbus_projector;
GRANT SELECT ON message_search TO mailbus_ingest;
