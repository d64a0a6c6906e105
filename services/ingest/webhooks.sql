-- Webhook endpoints as an API resource. Each runs as mailbus_ingest; every
-- statement is scoped to the asking key and this installation's namespace,
-- so another key's endpoint is as absent as an unknown one.

-- name: count_for_key
SELECT count(*) FROM webhook_endpoints WHERE namespace = %(namespace)s AND key_id = %(key_id)s;

-- name: insert
INSERT INTO webhook_endpoints (id, namespace, key_id, all_messages, url, event_types,
                               description, secret)
VALUES (%(id)s, %(namespace)s, %(key_id)s, %(all_messages)s, %(url)s, %(event_types)s,
        %(description)s, %(secret)s)
RETURNING *;

-- name: list
SELECT * FROM webhook_endpoints WHERE namespace = %(namespace)s AND key_id = %(key_id)s
ORDER BY created_at, id;

-- name: get
SELECT * FROM webhook_endpoints
WHERE id = %(id)s AND namespace = %(namespace)s AND key_id = %(key_id)s;

-- name: update
-- NULL leaves a field as it is. Enabling clears the reason it was disabled.
UPDATE webhook_endpoints
SET url = coalesce(%(url)s, url),
    event_types = coalesce(%(event_types)s, event_types),
    description = coalesce(%(description)s, description),
    enabled = coalesce(%(enabled)s, enabled),
    disabled_reason = CASE WHEN %(enabled)s IS NULL THEN disabled_reason
                           WHEN %(enabled)s THEN NULL ELSE 'disabled through the API' END,
    updated_at = now()
WHERE id = %(id)s AND namespace = %(namespace)s AND key_id = %(key_id)s
RETURNING *;

-- name: delete
DELETE FROM webhook_endpoints
WHERE id = %(id)s AND namespace = %(namespace)s AND key_id = %(key_id)s;

-- name: rotate
-- The current secret stays valid (deliveries carry both signatures) for the
-- grace period.
UPDATE webhook_endpoints
SET previous_secret = secret, secret = %(secret)s,
    previous_secret_until = now() + make_interval(secs => %(grace)s), updated_at = now()
WHERE id = %(id)s AND namespace = %(namespace)s AND key_id = %(key_id)s
RETURNING *;

-- name: queue_test
INSERT INTO webhook_deliveries (endpoint_id, lane, event_id, namespace, event_type,
                                occurred_at, body)
VALUES (%(id)s, '00000000-0000-0000-0000-000000000000', %(event_id)s, %(namespace)s,
        %(event_type)s, %(occurred_at)s, %(body)s);

-- name: queue_replay
INSERT INTO webhook_replays (id, endpoint_id, namespace, since)
VALUES (%(replay_id)s, %(id)s, %(namespace)s, %(since)s)
RETURNING requested_at;

-- name: attempts
-- Newest first; the cursor is the (at, event_id, attempt) of the last row shown.
SELECT a.event_id, a.lane, a.attempt, a.at, a.status_code, a.latency_ms, a.error, a.response,
       d.event_type, d.state
FROM webhook_attempts a
JOIN webhook_deliveries d USING (endpoint_id, lane, event_id)
WHERE a.endpoint_id = %(id)s
  AND (a.at, a.event_id, a.attempt) < (%(after_at)s::timestamptz, %(after_id)s::uuid,
                                       %(after_attempt)s::integer)
ORDER BY a.at DESC, a.event_id DESC, a.attempt DESC
LIMIT %(limit)s;
