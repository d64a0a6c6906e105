-- Statements of attachments (services/ingest/attachments.py), run as
-- mailbus_ingest. Tables and the expiry rule: mailbus/migrations/0017_attachments.sql.

-- name: store_blob
-- Bytes are stored once: a file already here (sent by this key or any other)
-- is left as it is. The answer is the same either way, so an upload tells a key
-- nothing about what others sent. The content placeholder ends in b: the bytes
-- travel in binary, not as hex text (twice the bytes, and a copy on each side).
INSERT INTO attachment_blobs (sha256, size, content)
VALUES (%(sha256)s, %(size)s, %(content)b)
ON CONFLICT (sha256) DO NOTHING;

-- name: reference
-- This key may now name the file until expires_at; a later expiry never moves
-- back. The foreign key's check locks the blob (KEY SHARE) until the commit,
-- so the pruner (FOR UPDATE SKIP LOCKED) passes over it.
INSERT INTO attachment_refs (key_id, sha256, expires_at)
VALUES (%(key_id)s, %(sha256)s, %(expires_at)s)
ON CONFLICT (key_id, sha256)
DO UPDATE SET expires_at = GREATEST(attachment_refs.expires_at, EXCLUDED.expires_at);

-- name: extend_references
-- Files a message names by id: only those this key sent itself and that have
-- not expired (an expired reference counts as gone before the pruner reaches
-- it, so the answer never depends on when pruning ran). Extended in the same
-- statement, which row-locks them against a pruner deleting them meanwhile.
UPDATE attachment_refs r
SET expires_at = GREATEST(r.expires_at, x.expires_at)
FROM unnest(%(sha256s)s::text[], %(expires)s::timestamptz[]) AS x (sha256, expires_at),
     attachment_blobs b
WHERE r.key_id = %(key_id)s AND r.sha256 = x.sha256 AND r.expires_at > now()
  AND b.sha256 = r.sha256
RETURNING r.sha256, b.size;

-- name: prune_references
-- Oldest first through attachment_refs_expires, a bounded batch at a time.
-- A reference being extended holds its row lock: SKIP LOCKED leaves it, and
-- a row extended since the subquery read it fails the re-check of FOR UPDATE.
DELETE FROM attachment_refs
WHERE (key_id, sha256) IN (
    SELECT key_id, sha256 FROM attachment_refs
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED);

-- name: prune_blobs
-- Bytes no reference names any more. No row lock is taken to find them (a
-- locking clause would need an UPDATE grant the API has no other use for):
-- the foreign key decides instead. A request inserting a reference holds a
-- KEY SHARE lock on the blob, so this DELETE waits for it, and if that
-- reference committed, the foreign key's check at the end of the statement
-- refuses the delete (ForeignKeyViolation): the round ends, nothing is lost,
-- the next round tries again. A reference inserted after this delete fails
-- its own check, and the request stores the bytes anew (attachments.py).
DELETE FROM attachment_blobs
WHERE sha256 IN (
    SELECT b.sha256 FROM attachment_blobs b
    WHERE NOT EXISTS (SELECT 1 FROM attachment_refs r WHERE r.sha256 = b.sha256)
    LIMIT %(batch)s);
