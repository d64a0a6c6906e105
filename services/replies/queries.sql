-- The mailbox readers' marks and the inbound messages they hand over
-- (tables in mailbus/migrations/0005_replies.sql).

-- name: load_mark
SELECT uidvalidity, last_uid, history_id, last_received_at, resets, reset_at, reset_reason
FROM mailbox_state
WHERE namespace = %(namespace)s AND account_id = %(account_id)s AND mailbox = %(mailbox)s;

-- name: save_imap_mark
-- GREATEST: two readers of one mailbox (a restart overlapping the old
-- process) must never move the mark backwards; under the same UIDVALIDITY
-- only. A different UIDVALIDITY replaces the mark (reset_imap_mark records why).
INSERT INTO mailbox_state (namespace, account_id, mailbox, uidvalidity, last_uid)
VALUES (%(namespace)s, %(account_id)s, %(mailbox)s, %(uidvalidity)s, %(last_uid)s)
ON CONFLICT (namespace, account_id, mailbox) DO UPDATE
SET last_uid = CASE WHEN mailbox_state.uidvalidity = EXCLUDED.uidvalidity
                    THEN GREATEST(mailbox_state.last_uid, EXCLUDED.last_uid)
                    ELSE EXCLUDED.last_uid END,
    uidvalidity = EXCLUDED.uidvalidity,
    updated_at = now();

-- name: reset_imap_mark
INSERT INTO mailbox_state (namespace, account_id, mailbox, uidvalidity, last_uid, resets,
                           reset_at, reset_reason)
VALUES (%(namespace)s, %(account_id)s, %(mailbox)s, %(uidvalidity)s, 0, 1, now(), %(reason)s)
ON CONFLICT (namespace, account_id, mailbox) DO UPDATE
SET uidvalidity = EXCLUDED.uidvalidity, last_uid = 0, resets = mailbox_state.resets + 1,
    reset_at = now(), reset_reason = EXCLUDED.reset_reason, updated_at = now();

-- name: save_gmail_mark
-- history_id NULL keeps the stored one (a message handed over during a
-- full sync moves last_received_at, not the history position);
-- last_received_at only ever grows.
INSERT INTO mailbox_state (namespace, account_id, mailbox, history_id, last_received_at)
VALUES (%(namespace)s, %(account_id)s, %(mailbox)s, %(history_id)s, %(received_at)s)
ON CONFLICT (namespace, account_id, mailbox) DO UPDATE
SET history_id = COALESCE(EXCLUDED.history_id, mailbox_state.history_id),
    last_received_at = GREATEST(mailbox_state.last_received_at, EXCLUDED.last_received_at),
    updated_at = now();

-- name: reset_gmail_mark
INSERT INTO mailbox_state (namespace, account_id, mailbox, history_id, resets, reset_at,
                           reset_reason)
VALUES (%(namespace)s, %(account_id)s, %(mailbox)s, %(history_id)s, 1, now(), %(reason)s)
ON CONFLICT (namespace, account_id, mailbox) DO UPDATE
SET history_id = EXCLUDED.history_id, resets = mailbox_state.resets + 1, reset_at = now(),
    reset_reason = EXCLUDED.reset_reason, updated_at = now();

-- name: record_inbound
-- A message handed over again (at least once) is recorded once.
INSERT INTO inbound_messages (namespace, account_id, source_ref, header_message_id,
                              received_at, kind, message_id, sender, subject, text, detail)
VALUES (%(namespace)s, %(account_id)s, %(source_ref)s, %(header_message_id)s,
        %(received_at)s, %(kind)s, %(message_id)s, %(sender)s, %(subject)s, %(text)s,
        %(detail)s)
ON CONFLICT (namespace, account_id, source_ref) DO NOTHING
RETURNING source_ref;

-- name: known_refs
SELECT source_ref FROM inbound_messages
WHERE namespace = %(namespace)s AND account_id = %(account_id)s
  AND source_ref = ANY(%(refs)s);

-- name: known_message_ids
SELECT DISTINCT header_message_id FROM inbound_messages
WHERE namespace = %(namespace)s AND account_id = %(account_id)s
  AND header_message_id = ANY(%(ids)s);

-- name: sent_to
-- Which of the addresses a report names the message it names was sent to
-- (replies_sent_to(), mailbus/migrations/0007_report_recipients.sql): the
-- replies role may not read the projection or the ledger themselves.
SELECT projected, recipients, handed_over_at
FROM replies_sent_to(%(namespace)s, %(message_id)s, %(addresses)s);
