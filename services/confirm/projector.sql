-- Statements of the projector. Each runs as mailbus_projector, all of one
-- batch in one transaction, in this order.

-- name: ensure_status
-- A row to lock for every message of the batch, also one seen for the first
-- time. Ids arrive sorted: concurrent projectors inserting overlapping sets
-- wait on each other in one order and cannot deadlock.
INSERT INTO message_status (namespace, message_id)
SELECT %(namespace)s, id FROM unnest(%(ids)s::uuid[]) AS id
ON CONFLICT (namespace, message_id) DO NOTHING;

-- name: lock_status
-- FOR UPDATE: another projector instance with events of the same message
-- (email.requested is keyed by account, the rest by message) waits here
-- until this batch commits, so each sees the other's kinds and a kind is
-- counted once. The account falls back to the API's row for events that do
-- not name one. key_id and requested_at: the message's search scope, once
-- its email.requested was projected (0015).
SELECT s.message_id::text, s.kinds, coalesce(s.account_id, m.account_id), s.key_id,
       s.requested_at
FROM message_status s
LEFT JOIN messages m ON m.id = s.message_id
WHERE s.namespace = %(namespace)s AND s.message_id = ANY(%(ids)s::uuid[])
ORDER BY s.message_id
FOR UPDATE OF s;

-- name: known_events
-- Events already projected (a redelivery, a replay). Read under the locks
-- above, so no other instance can insert one of them meanwhile.
SELECT event_id::text FROM message_events
WHERE namespace = %(namespace)s AND event_id = ANY(%(ids)s::uuid[]);

-- name: insert_event
-- The batch's new events in one statement (arrays in event_id order: the
-- order every lock here is taken in). DO NOTHING is a second line of
-- defence: known_events already left these out.
INSERT INTO message_events (namespace, event_id, message_id, kind, occurred_at, account_id,
                            detail, counted_day, counted_account)
SELECT %(namespace)s, v.event_id, v.message_id, v.kind, v.occurred_at, v.account_id,
       v.detail, v.counted_day, v.counted_account
FROM unnest(%(event_ids)s::uuid[], %(message_ids)s::uuid[], %(kinds)s::text[],
            %(occurred)s::timestamptz[], %(accounts)s::text[], %(details)s::jsonb[],
            %(days)s::date[], %(counted_accounts)s::text[])
     WITH ORDINALITY AS v(event_id, message_id, kind, occurred_at, account_id, detail,
                          counted_day, counted_account, n)
ORDER BY v.n
ON CONFLICT (namespace, event_id) DO NOTHING;

-- name: update_status
-- Every message of the batch in one statement; its kinds travel as one
-- comma-separated text each (kind names have no comma), as arrays of
-- arrays must all be one length. The search scope (key_id, requested_at) is
-- set once, by the first email.requested of the message, and kept.
UPDATE message_status s
SET kinds = string_to_array(v.kinds, ','), status = v.status, account_id = v.account_id,
    key_id = coalesce(s.key_id, v.key_id),
    requested_at = coalesce(s.requested_at, v.requested_at), updated_at = now()
FROM unnest(%(ids)s::uuid[], %(kinds)s::text[], %(statuses)s::text[], %(accounts)s::text[],
            %(key_ids)s::text[], %(requested)s::timestamptz[])
     AS v(message_id, kinds, status, account_id, key_id, requested_at)
WHERE s.namespace = %(namespace)s AND s.message_id = v.message_id;

-- name: update_message
-- The API's own rows, when the messages came through the API. updated_at
-- moves only when the status does.
UPDATE messages m SET status = v.status, updated_at = now()
FROM unnest(%(ids)s::uuid[], %(statuses)s::text[]) AS v(id, status)
WHERE m.id = v.id AND m.status IS DISTINCT FROM v.status;

-- name: insert_search
-- The batch's search rows (0015) in one statement, in primary-key order: the
-- order of the locks a concurrent projector's insert of the same keys would
-- wait on. The messages' status rows are locked above, so two instances
-- never write one message's rows at once anyway. DO NOTHING: a redelivered
-- or rerouted email.requested, a second email.sent through the same
-- account, writes no second row.
INSERT INTO message_search (namespace, field, value, key_id, requested_at, message_id)
SELECT %(namespace)s, v.field, v.value, v.key_id, v.requested_at, v.message_id
FROM unnest(%(fields)s::text[], %(values)s::text[], %(key_ids)s::text[],
            %(times)s::timestamptz[], %(message_ids)s::uuid[])
     WITH ORDINALITY AS v(field, value, key_id, requested_at, message_id, n)
ORDER BY v.n
ON CONFLICT DO NOTHING;

-- name: insert_sent_accounts
-- Messages whose email.sent was projected before their email.requested (the
-- topics are read in parallel, so a lagging partition of email.requested can
-- arrive last): their account rows, from the sent events already stored
-- (index message_events_message), now that the scope is known.
INSERT INTO message_search (namespace, field, value, key_id, requested_at, message_id)
SELECT DISTINCT e.namespace, 'account', e.account_id, s.key_id, s.requested_at, e.message_id
FROM message_events e
JOIN message_status s ON s.namespace = e.namespace AND s.message_id = e.message_id
WHERE e.namespace = %(namespace)s AND e.message_id = ANY(%(ids)s::uuid[])
  AND e.kind = 'sent' AND e.account_id IS NOT NULL AND length(e.account_id) <= 320
  AND s.key_id IS NOT NULL
ORDER BY 3, 4, 5, 6
ON CONFLICT DO NOTHING;

-- name: count
-- Increments only: run once, in the transaction that inserted the counted
-- events, so a replayed batch (all events known) adds nothing.
INSERT INTO daily_counts (namespace, day, account_id, requested, sent, delivered, confirmed,
                          failed, bounced, unconfirmed)
VALUES (%(namespace)s, %(day)s, %(account_id)s, %(requested)s, %(sent)s, %(delivered)s,
        %(confirmed)s, %(failed)s, %(bounced)s, %(unconfirmed)s)
ON CONFLICT (namespace, day, account_id) DO UPDATE
SET requested = daily_counts.requested + EXCLUDED.requested,
    sent = daily_counts.sent + EXCLUDED.sent,
    delivered = daily_counts.delivered + EXCLUDED.delivered,
    confirmed = daily_counts.confirmed + EXCLUDED.confirmed,
    failed = daily_counts.failed + EXCLUDED.failed,
    bounced = daily_counts.bounced + EXCLUDED.bounced,
    unconfirmed = daily_counts.unconfirmed + EXCLUDED.unconfirmed;

-- name: upsert_suppression
-- The latest event per address and scope wins, by (occurred_at, event_id):
-- an older record read after a newer one (a replay, another partition's
-- order) changes nothing.
INSERT INTO suppressions (namespace, address_hash, scope, address, reason, active, message_id,
                          event_id, occurred_at)
VALUES (%(namespace)s, %(address_hash)s, %(scope)s, %(address)s, %(reason)s, %(active)s,
        %(message_id)s, %(event_id)s, %(occurred_at)s)
ON CONFLICT (namespace, address_hash, scope) DO UPDATE
SET address = EXCLUDED.address, reason = EXCLUDED.reason, active = EXCLUDED.active,
    message_id = EXCLUDED.message_id, event_id = EXCLUDED.event_id,
    occurred_at = EXCLUDED.occurred_at, updated_at = now()
WHERE (suppressions.occurred_at, suppressions.event_id)
    < (EXCLUDED.occurred_at, EXCLUDED.event_id);
