-- Reading the projection: message status, timelines, listings, daily reports.
-- Each runs as mailbus_ingest, which may read but not write the projection.
-- `namespace` is this installation's topic prefix: the projector of another
-- installation sharing the database writes rows this API never shows.

-- name: message
-- Scoped to the asking key: another key's id is indistinguishable from an
-- unknown one (404). Admin keys pass NULL to see every message.
SELECT id, account_id, pool, status, subject, recipients, tags, send_at, requested_at,
       updated_at
FROM messages
WHERE id = %(id)s AND (%(key_id)s::text IS NULL OR key_id = %(key_id)s);

-- name: projected_message
-- For admin keys: a message another producer wrote straight to Kafka has
-- no `messages` row, only the projector's.
SELECT message_id AS id, account_id, status, updated_at
FROM message_status
WHERE namespace = %(namespace)s AND message_id = %(id)s;

-- name: timeline
-- Oldest first. Events of the same instant (a final SMTP server's acceptance is
-- sent and delivered at once; clocks are coarse) follow the pipeline's causal
-- order, whatever order they were projected in; then the order of projection.
-- A DSN saying delivery is delayed is no event of any topic (the remote
-- server is still trying): the replies service's inbound_messages row is its
-- record, one timeline entry per delayed recipient, at the report's arrival.
SELECT * FROM (
SELECT kind, occurred_at, account_id, detail, projected_at, event_id::text AS tiebreak
FROM message_events
WHERE namespace = %(namespace)s AND message_id = %(id)s
UNION ALL
SELECT 'delayed', coalesce(i.received_at, i.recorded_at), i.account_id,
       jsonb_strip_nulls(jsonb_build_object(
           'recipient', r.value ->> 'recipient', 'status_code', r.value ->> 'status',
           'diagnostic', r.value ->> 'diagnostic')),
       i.recorded_at, i.source_ref || '#' || r.ordinality
FROM inbound_messages i
CROSS JOIN LATERAL jsonb_array_elements(
    CASE jsonb_typeof(i.detail -> 'results') WHEN 'array' THEN i.detail -> 'results'
    ELSE '[]' END) WITH ORDINALITY AS r(value, ordinality)
WHERE i.namespace = %(namespace)s AND i.message_id = %(id)s AND i.kind = 'dsn'
  AND r.value ->> 'action' = 'delayed'
) AS events
ORDER BY occurred_at,
         array_position(ARRAY['requested', 'rescheduled', 'cancelled', 'sent', 'failed',
                              'delayed', 'delivered', 'bounced', 'response', 'confirmed',
                              'unconfirmed', 'unknown'], kind),
         projected_at, tiebreak;

-- name: list_for_key
-- Keyset pagination on (requested_at, id), newest first: the cursor is the
-- last row of the previous page (the first page passes +infinity, or
-- `until`), so pages neither repeat nor skip rows when new messages arrive,
-- and the index messages_key_requested serves it at any depth. `since`
-- defaults to -infinity; both stay plain comparisons so the planner can use
-- the index. The scope (key_id) comes from the asking key, never from the
-- cursor, which only says where in that scope a page starts.
SELECT id, account_id, pool, status, subject, recipients, tags, send_at, requested_at,
       updated_at
FROM messages
WHERE key_id = %(key_id)s
  AND (requested_at, id) < (%(after_at)s::timestamptz, %(after_id)s::uuid)
  AND requested_at >= %(since)s::timestamptz
  AND (%(status)s::text IS NULL OR status = %(status)s)
ORDER BY requested_at DESC, id DESC
LIMIT %(limit)s;

-- name: list_all
-- The same for admin keys, over every key's messages (index
-- messages_requested_id). `messages` holds what this database's APIs
-- accepted; it has no namespace column.
SELECT id, account_id, pool, status, subject, recipients, tags, send_at, requested_at,
       updated_at
FROM messages
WHERE (requested_at, id) < (%(after_at)s::timestamptz, %(after_id)s::uuid)
  AND requested_at >= %(since)s::timestamptz
  AND (%(status)s::text IS NULL OR status = %(status)s)
ORDER BY requested_at DESC, id DESC
LIMIT %(limit)s;

-- name: term_size
-- How many messages a filter's value has in the scope, counted up to a cap
-- (an index-only scan of at most `cap` entries): with two or three of
-- recipient, tag and account, the smallest drives the search and the others
-- are probed per row.
SELECT count(*) AS n FROM (
    SELECT 1 FROM message_search
    WHERE namespace = %(namespace)s AND field = %(field)s AND value = %(value)s
      AND (%(key_id)s::text IS NULL OR key_id = %(key_id)s)
    LIMIT %(cap)s) AS capped;

-- name: search_for_key
-- By recipient, tag or account (`field`, `value`; message_search, written by
-- the projector, 0015): the key's range of its primary key gives the page
-- in order, scanned backwards from the cursor; each row is then joined to
-- its message for the status and the page's columns. The other filters
-- (`also_fields`, `also_values`, at most two) are one primary-key probe each
-- per row, written as "no other filter is missing": inside NOT EXISTS over
-- the arrays the probe stays a per-row subplan, so the planner cannot turn
-- it into a hash join of two whole ranges, which it picks when it
-- underestimates how many messages have both (1.6 s instead of milliseconds
-- at 10^6 rows, docs/api.md). The join to messages also checks m.key_id, so
-- the scope never rests on the side table alone, and it holds back a
-- message projected before the API committed its row (the API commits after
-- Kafka's acknowledgement) until that row exists.
SELECT m.id, m.account_id, m.pool, m.status, m.subject, m.recipients, m.tags, m.send_at,
       s.requested_at, m.updated_at
FROM message_search s
JOIN messages m ON m.id = s.message_id
WHERE s.namespace = %(namespace)s AND s.field = %(field)s AND s.value = %(value)s
  AND s.key_id = %(key_id)s
  AND (s.requested_at, s.message_id) < (%(after_at)s::timestamptz, %(after_id)s::uuid)
  AND s.requested_at >= %(since)s::timestamptz
  AND m.key_id = %(key_id)s
  AND (%(status)s::text IS NULL OR m.status = %(status)s)
  AND NOT EXISTS (
      SELECT 1 FROM unnest(%(also_fields)s::text[], %(also_values)s::text[]) AS o(field, value)
      WHERE NOT EXISTS (
          SELECT 1 FROM message_search t
          WHERE t.namespace = s.namespace AND t.field = o.field AND t.value = o.value
            AND t.key_id = s.key_id AND t.requested_at = s.requested_at
            AND t.message_id = s.message_id))
ORDER BY s.requested_at DESC, s.message_id DESC
LIMIT %(limit)s;

-- name: search_all
-- The same for admin keys (index message_search_all; the probes stay on the
-- primary key, all rows of a message having its key).
SELECT m.id, m.account_id, m.pool, m.status, m.subject, m.recipients, m.tags, m.send_at,
       s.requested_at, m.updated_at
FROM message_search s
JOIN messages m ON m.id = s.message_id
WHERE s.namespace = %(namespace)s AND s.field = %(field)s AND s.value = %(value)s
  AND (s.requested_at, s.message_id) < (%(after_at)s::timestamptz, %(after_id)s::uuid)
  AND s.requested_at >= %(since)s::timestamptz
  AND (%(status)s::text IS NULL OR m.status = %(status)s)
  AND NOT EXISTS (
      SELECT 1 FROM unnest(%(also_fields)s::text[], %(also_values)s::text[]) AS o(field, value)
      WHERE NOT EXISTS (
          SELECT 1 FROM message_search t
          WHERE t.namespace = s.namespace AND t.field = o.field AND t.value = o.value
            AND t.key_id = s.key_id AND t.requested_at = s.requested_at
            AND t.message_id = s.message_id))
ORDER BY s.requested_at DESC, s.message_id DESC
LIMIT %(limit)s;

-- name: daily_all
-- Admin keys: the projector's counters as they are.
SELECT account_id, requested, sent, delivered, confirmed, failed, bounced, unconfirmed
FROM daily_counts
WHERE namespace = %(namespace)s AND day = %(day)s
ORDER BY account_id;

-- name: daily_for_key
-- Other keys: the same numbers over the key's own messages. An event carries
-- counted_day/counted_account exactly when the projector counted it in
-- daily_counts, so this is daily_counts restricted to these messages.
SELECT e.counted_account AS account_id,
       count(*) FILTER (WHERE e.kind = 'requested') AS requested,
       count(*) FILTER (WHERE e.kind = 'sent') AS sent,
       count(*) FILTER (WHERE e.kind = 'delivered') AS delivered,
       count(*) FILTER (WHERE e.kind = 'confirmed') AS confirmed,
       count(*) FILTER (WHERE e.kind = 'failed') AS failed,
       count(*) FILTER (WHERE e.kind = 'bounced') AS bounced,
       count(*) FILTER (WHERE e.kind = 'unconfirmed') AS unconfirmed
FROM message_events e
JOIN messages m ON m.id = e.message_id
WHERE e.namespace = %(namespace)s AND e.counted_day = %(day)s AND m.key_id = %(key_id)s
GROUP BY e.counted_account
ORDER BY e.counted_account;
