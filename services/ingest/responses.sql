-- Reading what recipients answered: the 'response' rows of message_events.
-- Each runs as mailbus_ingest. Pages go in the order mailbus recorded the
-- responses, (projected_at, event_id), ascending: a client keeps the last
-- cursor and asks again, and a response that arrives late with an older
-- occurred_at still comes after its cursor. The index
-- message_events_responses serves both.

-- name: feed_all
-- Admin keys: every response of this installation.
SELECT e.event_id, e.message_id, e.occurred_at, e.projected_at, e.account_id, e.detail
FROM message_events e
WHERE e.namespace = %(namespace)s AND e.kind = 'response'
  AND (e.projected_at, e.event_id) > (%(after_at)s::timestamptz, %(after_id)s::uuid)
  AND e.projected_at >= %(since)s::timestamptz
  AND (%(kind)s::text IS NULL OR e.detail->>'response' = %(kind)s)
  AND (%(message_id)s::uuid IS NULL OR e.message_id = %(message_id)s)
ORDER BY e.projected_at, e.event_id
LIMIT %(limit)s;

-- name: feed_for_key
-- Other keys: responses to the messages this key sent.
SELECT e.event_id, e.message_id, e.occurred_at, e.projected_at, e.account_id, e.detail
FROM message_events e
JOIN messages m ON m.id = e.message_id AND m.key_id = %(key_id)s
WHERE e.namespace = %(namespace)s AND e.kind = 'response'
  AND (e.projected_at, e.event_id) > (%(after_at)s::timestamptz, %(after_id)s::uuid)
  AND e.projected_at >= %(since)s::timestamptz
  AND (%(kind)s::text IS NULL OR e.detail->>'response' = %(kind)s)
  AND (%(message_id)s::uuid IS NULL OR e.message_id = %(message_id)s)
ORDER BY e.projected_at, e.event_id
LIMIT %(limit)s;

-- name: owns_message
-- Whether the message is this key's (admin keys pass NULL: any message of
-- the installation, also those written straight to Kafka).
SELECT 1 FROM messages
WHERE id = %(message_id)s AND (%(key_id)s::text IS NULL OR key_id = %(key_id)s)
UNION ALL
SELECT 1 FROM message_status
WHERE %(key_id)s::text IS NULL AND namespace = %(namespace)s AND message_id = %(message_id)s
LIMIT 1;

-- name: suppressions
-- Admin keys: the suppression list, most recently changed first.
SELECT address, address_hash, scope, reason, active, message_id, occurred_at, updated_at
FROM suppressions
WHERE namespace = %(namespace)s
  AND (%(active)s::boolean IS NULL OR active = %(active)s)
  AND (%(address_hash)s::text IS NULL OR address_hash = %(address_hash)s)
  AND (updated_at, address_hash, scope)
      < (%(after_at)s::timestamptz, %(after_hash)s::text, %(after_scope)s::text)
ORDER BY updated_at DESC, address_hash DESC, scope DESC
LIMIT %(limit)s;

-- name: inbound
-- Admin keys: what the mailbox readers read, newest first, matched or not.
SELECT account_id, source_ref, header_message_id, received_at, kind, message_id, sender,
       subject, left(text, 2000) AS text, detail, recorded_at
FROM inbound_messages
WHERE namespace = %(namespace)s
  AND (%(kind)s::text IS NULL OR kind = %(kind)s)
  AND (%(account)s::text IS NULL OR account_id = %(account)s)
  AND (recorded_at, account_id, source_ref)
      < (%(after_at)s::timestamptz, %(after_account)s::text, %(after_ref)s::text)
ORDER BY recorded_at DESC, account_id DESC, source_ref DESC
LIMIT %(limit)s;
