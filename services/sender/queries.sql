-- Statements of the sender. Each runs as mailbus_sender.

-- name: admit
-- A redelivered record (same message id) changes nothing, unless the row
-- was rerouted away: then this record is the new route and takes it over.
-- A `cancelled` row (migration 0018) is never taken over: a rewind or a
-- replay of email.requested admits nothing over it, and a pool move of a
-- cancelled message cannot exist (only a claimed row is rerouted).
INSERT INTO send_ledger (message_id, namespace, account_id, pool, source_partition, due_at,
                         payload, requested_at, replayed)
VALUES (%(message_id)s, %(namespace)s, %(account_id)s, %(pool)s, %(partition)s, %(due_at)s,
        %(payload)s, %(requested_at)s, %(replayed)s)
ON CONFLICT (namespace, message_id) DO UPDATE
SET account_id = EXCLUDED.account_id, pool = EXCLUDED.pool,
    source_partition = EXCLUDED.source_partition, payload = EXCLUDED.payload,
    due_at = EXCLUDED.due_at, state = 'queued', settled_at = NULL
WHERE send_ledger.state = 'rerouted' AND send_ledger.account_id <> EXCLUDED.account_id;

-- name: take_over
-- A new epoch for each partition this instance was assigned (migration 0013).
-- The UPDATE waits for claims and settles that hold the partition's row FOR
-- SHARE under the old epoch; after it commits, theirs match nothing.
INSERT INTO sender_partitions (namespace, partition, owner)
SELECT %(namespace)s, p, %(owner)s FROM unnest(%(partitions)s::integer[]) AS p
ON CONFLICT (namespace, partition) DO UPDATE
SET owner = EXCLUDED.owner, epoch = sender_partitions.epoch + 1, taken_at = now()
RETURNING partition, epoch;

-- name: recover_sending
-- Rows a previous owner left mid-send in partitions this instance now owns
-- (run in the take-over's transaction, after take_over): the transport may or
-- may not have taken them, and a live previous owner may still be sending
-- them (its settle is fenced off), so they go again flagged as possible
-- duplicates.
UPDATE send_ledger SET state = 'queued', ambiguous = true, due_at = now()
WHERE state = 'sending' AND namespace = %(namespace)s
  AND source_partition = ANY(%(partitions)s)
RETURNING message_id;

-- name: fence
-- The partitions a settle batch may still write to: this instance's, at the
-- epoch its rows were claimed under. FOR SHARE holds off a take-over until
-- the batch commits (and makes the batch wait for one in progress).
SELECT partition, epoch FROM sender_partitions
WHERE namespace = %(namespace)s AND owner = %(owner)s AND partition = ANY(%(partitions)s)
FOR SHARE;

-- name: claim
-- FOR UPDATE SKIP LOCKED: concurrent claimers never take the same row and
-- never wait on each other. The due rows are picked once, in a MATERIALIZED
-- CTE: as a subquery in FROM the planner may rescan it for each ledger row it
-- joins, and a rescan skips the rows this statement just updated and takes
-- the next ones, claiming more than LIMIT (and sending past the account's
-- quota, which counts only what it asked for).
--
-- Fenced (migration 0013): only partitions this instance still owns at the
-- epoch it knows; FOR SHARE on their ownership rows holds off a take-over
-- until this claim commits, so the take-over's recover_sending sees the rows
-- it claimed. ARRAY(...) is computed once, so the due scan keeps its plan.
WITH mine AS MATERIALIZED (
    SELECT partition FROM sender_partitions
    WHERE namespace = %(namespace)s AND owner = %(owner)s
      AND (partition, epoch) IN (
          SELECT * FROM unnest(%(partitions)s::integer[], %(epochs)s::bigint[]))
    FOR SHARE
),
due AS MATERIALIZED (
    SELECT message_id FROM send_ledger
    WHERE state = 'queued' AND namespace = %(namespace)s AND account_id = %(account_id)s
      AND due_at <= now() AND source_partition = ANY(ARRAY(SELECT partition FROM mine))
      -- pool_only: an exhausted account hands on only messages that have a pool
      -- and were not handed over already for some of their recipients.
      AND (NOT %(pool_only)s OR (pool IS NOT NULL AND pending_recipients IS NULL))
    ORDER BY due_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE send_ledger l SET state = 'sending', attempts = l.attempts + 1, claimed_at = now()
FROM due
WHERE l.namespace = %(namespace)s AND l.message_id = due.message_id
RETURNING l.message_id, l.payload, l.attempts, l.ambiguous, l.reroutes, l.source_partition,
          l.requested_at, l.pool, l.pending_recipients, l.replayed;

-- name: requeue_orphans
-- Rows of this account left `sending` in partitions this instance still owns
-- (fenced as claim is) that no worker of it holds: a claim whose commit went
-- through while its reply was lost (the connection dropped). Nobody will
-- settle them, so they go again, flagged as possible duplicates.
WITH mine AS MATERIALIZED (
    SELECT partition FROM sender_partitions
    WHERE namespace = %(namespace)s AND owner = %(owner)s
      AND (partition, epoch) IN (
          SELECT * FROM unnest(%(partitions)s::integer[], %(epochs)s::bigint[]))
    FOR SHARE
)
UPDATE send_ledger SET state = 'queued', ambiguous = true, due_at = now()
WHERE namespace = %(namespace)s AND account_id = %(account_id)s AND state = 'sending'
  AND source_partition = ANY(ARRAY(SELECT partition FROM mine))
  AND claimed_at < now() - make_interval(secs => %(older_than)s)
  AND message_id <> ALL(%(holding)s::uuid[])
RETURNING message_id;

-- name: mark_sent
-- Every mark_* returns the row it matched: a settle writes the outcome's
-- events only when its row was still `sending` (else another owner has it).
-- A row sent before for some recipients keeps that first hand-over's time.
-- settled_at (here and in mark_failed, mark_rerouted) starts the row's
-- retention clock: see prune_settled. The hot path: one statement for a whole
-- settle batch; the rarer outcomes below run once per row.
UPDATE send_ledger l SET state = 'sent', sent_at = coalesce(l.sent_at, v.sent_at),
    last_error = NULL, settled_at = now()
FROM unnest(%(message_ids)s::uuid[], %(sent_at)s::timestamptz[]) AS v(message_id, sent_at)
WHERE l.namespace = %(namespace)s AND l.message_id = v.message_id AND l.state = 'sending'
RETURNING l.message_id;

-- name: mark_partial
-- Handed over for some recipients, refused for now for the others: back to
-- the queue for those only (migration 0006).
UPDATE send_ledger
SET state = 'queued', due_at = %(due_at)s, pending_recipients = %(pending)s,
    sent_at = coalesce(sent_at, %(sent_at)s), last_error = %(error)s
WHERE namespace = %(namespace)s AND message_id = %(message_id)s AND state = 'sending'
RETURNING message_id;

-- name: mark_failed
UPDATE send_ledger SET state = 'failed', last_error = %(error)s, settled_at = now()
WHERE namespace = %(namespace)s AND message_id = %(message_id)s AND state = 'sending'
RETURNING message_id;

-- name: mark_retry
-- Back to the queue. `attempts` counts hand-over attempts; a requeue that
-- tried nothing (quota, rate) gives its attempt back. %(ambiguous)s: the
-- attempt timed out or lost its connection after the message was handed
-- over, so the next one goes flagged as a possible duplicate.
UPDATE send_ledger
SET state = 'queued', due_at = %(due_at)s, last_error = %(error)s,
    attempts = attempts - %(refund)s, ambiguous = ambiguous OR %(ambiguous)s
WHERE namespace = %(namespace)s AND message_id = %(message_id)s AND state = 'sending'
RETURNING message_id;

-- name: mark_rerouted
UPDATE send_ledger SET state = 'rerouted', reroutes = reroutes + 1, last_error = %(error)s,
    settled_at = now()
WHERE namespace = %(namespace)s AND message_id = %(message_id)s AND state = 'sending'
RETURNING message_id;

-- name: sent_in_window
-- Sends in the last 24 h: the account's quota survives restarts. Rows still
-- waiting for some recipients were handed over once already.
SELECT sent_at FROM send_ledger
WHERE namespace = %(namespace)s AND account_id = %(account_id)s AND state = 'sent'
  AND sent_at > now() - interval '24 hours'
UNION ALL
SELECT sent_at FROM send_ledger
WHERE namespace = %(namespace)s AND account_id = %(account_id)s AND state <> 'sent'
  AND sent_at IS NOT NULL AND sent_at > now() - interval '24 hours';

-- name: outbox_add
-- A settle batch's events in one statement (%(headers)s: one JSON array, the
-- n-th element the n-th record's headers). Inserted in the order given, so
-- their ids (one sequence) ascend in that order: the caller sorts the ids it
-- gets back to pair them with its records.
INSERT INTO sender_outbox (message_id, namespace, source_partition, topic, key, value, headers)
SELECT v.message_id, %(namespace)s, v.source_partition, v.topic, v.key, v.value,
       %(headers)s::jsonb -> (v.n::integer - 1)
FROM unnest(%(message_ids)s::uuid[], %(partitions)s::integer[], %(topics)s::text[],
            %(keys)s::bytea[], %(values)s::bytea[])
     WITH ORDINALITY AS v(message_id, source_partition, topic, key, value, n)
ORDER BY v.n
RETURNING id;

-- name: outbox_pending
-- Rows younger than %(age)s may still be emitted by the settle that wrote
-- them. The API's cancels and reschedules (change_schedule, migration 0018)
-- have no such emitter: the sweep emits them at once.
SELECT id, topic, key, value, headers FROM sender_outbox
WHERE namespace = %(namespace)s AND source_partition = ANY(%(partitions)s)
  AND (created_at < now() - %(age)s::interval
       OR topic = %(schedule_topic)s)
ORDER BY id LIMIT 500;

-- name: outbox_done
DELETE FROM sender_outbox WHERE id = ANY(%(ids)s);

-- name: prune_settled
-- Retention (migration 0010): one batch of rows settled longer ago than
-- %(keep_seconds)s. Queued, sending and partly sent rows are never settled.
-- A cancelled row (0018) goes after the same time: it must outlive the
-- email.requested record, or a rewind would admit the message again.
-- The sent_at guard keeps every send the rolling 24 h quota counts
-- (sent_in_window) whatever the setting says. SKIP LOCKED: two instances
-- pruning at once, or a worker or admission touching a row, never wait.
DELETE FROM send_ledger
WHERE namespace = %(namespace)s AND message_id IN (
    SELECT message_id FROM send_ledger
    WHERE namespace = %(namespace)s AND state IN ('sent', 'failed', 'rerouted', 'cancelled')
      AND settled_at < now() - make_interval(secs => %(keep_seconds)s)
      AND (sent_at IS NULL OR sent_at <= now() - interval '24 hours')
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
);

-- name: clear_payloads
-- One batch of settled rows whose request bytes (addresses, bodies) are no
-- longer needed: nothing reads a settled row's payload again (a rerouted row
-- that comes back gets the new record's bytes at admission).
UPDATE send_ledger SET payload = NULL
WHERE namespace = %(namespace)s AND message_id IN (
    SELECT message_id FROM send_ledger
    WHERE namespace = %(namespace)s AND state IN ('sent', 'failed', 'rerouted', 'cancelled')
      AND payload IS NOT NULL
      AND settled_at < now() - make_interval(secs => %(keep_seconds)s)
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
);
