-- The webhooks service's statements; each runs as mailbus_webhooks.

-- name: enqueue
-- One delivery per endpoint that wants this event: an endpoint of the key
-- that sent the message (or of an admin key), asking for the event's type,
-- whose key is not revoked. Live lane: enabled endpoints only; a replay
-- lane names its endpoint. ON CONFLICT: a record read again after a
-- restart (offsets are committed after this commits) queues nothing new.
INSERT INTO webhook_deliveries (endpoint_id, lane, event_id, namespace, event_type,
                                occurred_at, body)
SELECT e.id, %(lane)s::uuid, %(event_id)s::uuid, e.namespace, %(event_type)s,
       %(occurred_at)s, %(body)s
FROM webhook_endpoints e
JOIN api_keys k ON k.id = e.key_id AND k.revoked_at IS NULL
WHERE e.namespace = %(namespace)s
  AND (%(endpoint_id)s::uuid IS NULL AND e.enabled OR e.id = %(endpoint_id)s::uuid)
  AND %(event_type)s = ANY (e.event_types)
  AND (e.all_messages OR EXISTS (SELECT 1 FROM messages m
                                 WHERE m.id = %(message_id)s::uuid AND m.key_id = e.key_id))
ON CONFLICT DO NOTHING;

-- name: due_lanes
-- Which (endpoint, lane) pairs have a delivery due that nobody holds.
SELECT DISTINCT d.endpoint_id, d.lane
FROM webhook_deliveries d
JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled
WHERE d.namespace = %(namespace)s AND d.state = 'pending' AND d.next_attempt_at <= now()
  AND (d.leased_until IS NULL OR d.leased_until < now())
LIMIT %(limit)s;

-- name: backlog
-- For the pending gauge: deliveries of enabled endpoints not settled yet.
SELECT count(*) FILTER (WHERE d.next_attempt_at <= now()) AS due,
       count(*) FILTER (WHERE d.next_attempt_at > now()) AS waiting
FROM webhook_deliveries d
JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled
WHERE d.namespace = %(namespace)s AND d.state = 'pending';

-- name: endpoint
SELECT url, secret, previous_secret, previous_secret_until > now() AS previous_valid, enabled
FROM webhook_endpoints WHERE id = %(endpoint_id)s;

-- name: claim
-- The lane's oldest due deliveries, leased to this worker: another instance
-- skips them (SKIP LOCKED now, the lease afterwards) until the lease runs
-- out, which is how a killed instance's claims come back.
WITH due AS (
    SELECT endpoint_id, lane, event_id FROM webhook_deliveries
    WHERE endpoint_id = %(endpoint_id)s AND lane = %(lane)s AND state = 'pending'
      AND next_attempt_at <= now() AND (leased_until IS NULL OR leased_until < now())
    ORDER BY occurred_at, event_id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
UPDATE webhook_deliveries d SET leased_until = now() + make_interval(secs => %(lease)s)
FROM due
WHERE (d.endpoint_id, d.lane, d.event_id) = (due.endpoint_id, due.lane, due.event_id)
RETURNING d.event_id, d.event_type, d.occurred_at, d.body, d.attempts, d.created_at;

-- name: record_attempt
INSERT INTO webhook_attempts (endpoint_id, lane, event_id, attempt, status_code, latency_ms,
                              error, response)
VALUES (%(endpoint_id)s, %(lane)s, %(event_id)s, %(attempt)s, %(status_code)s,
        %(latency_ms)s, %(error)s, %(response)s)
ON CONFLICT DO NOTHING;

-- name: settle
UPDATE webhook_deliveries
SET attempts = %(attempt)s, state = %(state)s,
    next_attempt_at = coalesce(%(next_attempt_at)s, next_attempt_at), leased_until = NULL,
    settled_at = CASE WHEN %(state)s = 'pending' THEN NULL ELSE now() END
WHERE endpoint_id = %(endpoint_id)s AND lane = %(lane)s AND event_id = %(event_id)s;

-- name: release
-- Claimed but not attempted (the worker stopped at a failure): due again at once.
UPDATE webhook_deliveries SET leased_until = NULL
WHERE endpoint_id = %(endpoint_id)s AND lane = %(lane)s AND event_id = ANY (%(event_ids)s)
  AND state = 'pending';

-- name: last_success
SELECT max(settled_at) FROM webhook_deliveries
WHERE endpoint_id = %(endpoint_id)s AND state = 'delivered';

-- name: disable
UPDATE webhook_endpoints SET enabled = false, disabled_reason = %(reason)s, updated_at = now()
WHERE id = %(endpoint_id)s AND enabled;

-- name: prune
-- Settled deliveries past the retention, a batch at a time; their attempts
-- go with them (ON DELETE CASCADE). Served by webhook_deliveries_settled.
DELETE FROM webhook_deliveries
WHERE (endpoint_id, lane, event_id) IN (
    SELECT endpoint_id, lane, event_id FROM webhook_deliveries
    WHERE namespace = %(namespace)s AND state <> 'pending'
      AND settled_at < now() - make_interval(days => %(days)s)
    LIMIT %(batch)s);

-- name: pending_replays
SELECT r.id, r.endpoint_id, r.since FROM webhook_replays r
WHERE r.namespace = %(namespace)s AND r.state = 'pending'
ORDER BY r.requested_at;

-- name: finish_replay
UPDATE webhook_replays SET state = 'done', queued = %(queued)s, finished_at = now()
WHERE id = %(id)s;
