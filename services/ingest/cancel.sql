-- Cancelling and rescheduling (services/ingest/cancel.py). Run as mailbus_ingest.

-- name: message
-- The message's account, for the event; only the asking key's own message
-- (%(key_id)s NULL: an admin key, any message). No row: 404, whether the
-- message does not exist or is another key's.
SELECT account_id FROM messages
WHERE id = %(id)s AND (%(key_id)s::text IS NULL OR key_id = %(key_id)s);

-- name: change
-- The sender's ledger row changes only through this function (migration
-- 0018): the role has no right on send_ledger or sender_outbox. It locks the
-- row against the sender's claim and answers what happened.
SELECT outcome, state, due_at
FROM change_schedule(%(namespace)s, %(id)s, %(key_id)s, %(due_at)s, %(event)s);

-- name: keep_files
-- A moved message keeps the files it names until its new time plus what an
-- accepted message's files get (attachments.py, MESSAGE_RETENTION): the
-- references of the message's key move later, never earlier. Run in the
-- transaction of the change, so a reschedule never outlives its files.
UPDATE attachment_refs AS r
SET expires_at = GREATEST(r.expires_at, %(expires_at)s)
FROM messages AS m
WHERE m.id = %(id)s AND r.key_id = m.key_id AND r.sha256 = ANY (m.attachments);
