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
