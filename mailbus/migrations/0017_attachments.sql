-- Attachments: the bytes of each file stored once, under their SHA-256, and
-- per API key the references that let that key name them in a message.
--
-- A Kafka record is capped near 1 MB, so files never ride in email.requested:
-- the event carries (sha256, size, filename, content_type, content_id) and the
-- sender reads the bytes here. Content addressing stores a file sent by a
-- thousand messages (or by two keys) once.
--
-- A key may name only a file it sent itself: the API looks the hash up in
-- attachment_refs under the key's own id, so learning or guessing another
-- key's hash gives nothing (the answer for a hash the key never sent is the
-- same whether or not the bytes exist).
--
-- Expiry (services/ingest/attachments.sql, prune_*): a reference lives until
-- `expires_at`, pushed later (never earlier) by every upload (24 h) and by
-- every accepted message that carries the file (its send_at, or the time it
-- was accepted, plus 8 days: the ledger's retention of a request). A blob
-- with no reference left is deleted by the ingest's pruning rounds.
CREATE TABLE attachment_blobs (
    sha256     text PRIMARY KEY,
    size       bigint NOT NULL,
    content    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT attachment_blobs_sha256 CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    CONSTRAINT attachment_blobs_size CHECK (size = octet_length(content))
);
-- Most attachments (PDF, PNG, JPEG, ZIP, Office files) are compressed
-- already: EXTERNAL keeps them out of line (TOAST) without pglz trying, and
-- failing, to compress megabytes on every insert.
ALTER TABLE attachment_blobs ALTER COLUMN content SET STORAGE EXTERNAL;

-- The foreign key makes a reference being inserted hold a KEY SHARE lock on
-- its blob until it commits, and refuses to delete a blob still referenced:
-- a blob cannot be deleted under a request that is about to reference it.
CREATE TABLE attachment_refs (
    key_id     text NOT NULL REFERENCES api_keys (id),
    sha256     text NOT NULL REFERENCES attachment_blobs (sha256),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (key_id, sha256)
);
-- The pruner's two questions: which references expired, which blobs have none.
CREATE INDEX attachment_refs_expires ON attachment_refs (expires_at);
CREATE INDEX attachment_refs_sha256 ON attachment_refs (sha256);

-- The ingest API stores and references files and prunes what expired; the
-- sender reads the bytes it sends and nothing else.
GRANT SELECT, INSERT, DELETE ON attachment_blobs TO mailbus_ingest;
GRANT SELECT, INSERT, DELETE ON attachment_refs TO mailbus_ingest;
GRANT UPDATE (expires_at) ON attachment_refs TO mailbus_ingest;
GRANT SELECT ON attachment_blobs TO mailbus_sender;
