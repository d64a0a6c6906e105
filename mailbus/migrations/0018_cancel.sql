-- Cancelling and rescheduling a queued message (POST /v1/messages/{id}/cancel
-- and /reschedule).
--
-- A message the sender has admitted but not claimed is a `queued` row of
-- send_ledger. Cancelling turns it `cancelled` (a state of its own, settled:
-- never claimed, never admitted again, see `admit` in the sender's
-- queries.sql); rescheduling moves its due_at. Either way the event that
-- says so goes into sender_outbox in the same transaction, and the sender's
-- outbox sweep emits it to email.schedule: one place emits the ledger's
-- events, and none is lost.
ALTER TABLE send_ledger DROP CONSTRAINT send_ledger_state;
ALTER TABLE send_ledger ADD CONSTRAINT send_ledger_state CHECK
    (state IN ('queued', 'sending', 'sent', 'failed', 'rerouted', 'cancelled'));

-- A cancelled row is settled: retention deletes it with the sent and failed
-- rows, after the same MAILBUS_LEDGER_RETENTION_HOURS, which outlives
-- email.requested's retention, so a rewind of the topic still finds it.
-- The partial indexes name the settled states: rebuilt to include it.
DROP INDEX send_ledger_settled;
CREATE INDEX send_ledger_settled ON send_ledger (namespace, settled_at)
    WHERE state IN ('sent', 'failed', 'rerouted', 'cancelled');
DROP INDEX send_ledger_settled_payload;
CREATE INDEX send_ledger_settled_payload ON send_ledger (namespace, settled_at)
    WHERE state IN ('sent', 'failed', 'rerouted', 'cancelled') AND payload IS NOT NULL;

-- The projection's kinds: a cancel and a reschedule are timeline entries.
ALTER TABLE message_events DROP CONSTRAINT message_events_kind;
ALTER TABLE message_events ADD CONSTRAINT message_events_kind CHECK (kind IN
    ('requested', 'sent', 'failed', 'delivered', 'bounced', 'response',
     'confirmed', 'unconfirmed', 'unknown', 'cancelled', 'rescheduled'));

-- The one thing the ingest role may do to the sender's tables. It gets no
-- right on send_ledger or sender_outbox: SECURITY DEFINER runs this as their
-- owner, search_path is pinned so a caller cannot shadow a table or now(),
-- and the checks below are the whole of what it can change.
--
--   p_key_id    the asking key, NULL for an admin key (any message). A
--               message of another key is `not_found`, as one that does
--               not exist: its existence is not revealed.
--   p_due_at    NULL to cancel, else the new due time (reschedule).
--   p_event     the Avro single-object encoded event (email.schedule)
--               the API built; it goes to the outbox as given, keyed by
--               the message id, on this namespace's email.schedule only.
--
-- Outcomes:
--   cancelled / rescheduled    done; the event is in the outbox
--   already_cancelled          cancelled before; nothing new
--   not_found                  no such message for this key
--   not_admitted               accepted, not in the ledger yet (admission
--                              lags a moment), or moving to another pool
--                              account (`rerouted`): ask again shortly
--   too_late                   claimed for sending or past it; `state` says
--                              which: sending, sent, failed, cancelled, or
--                              partly_sent (handed over to some recipients,
--                              waiting for others) or ambiguous (a send
--                              was interrupted and may have been handed
--                              over: it goes again flagged, and a cancel
--                              could not be honest)
--
-- The row is locked FOR UPDATE before it is judged. The sender's claim
-- takes due rows FOR UPDATE SKIP LOCKED: a claim that holds the row first
-- makes this wait until its commit, and the row is then `sending` (too
-- late); a cancel that holds it first makes the claim skip it, and after the
-- commit it is no longer `queued`. Either way exactly one of them wins.
CREATE FUNCTION change_schedule(p_namespace text, p_message_id uuid, p_key_id text,
                                p_due_at timestamptz, p_event bytea)
RETURNS TABLE (outcome text, state text, due_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r public.send_ledger%ROWTYPE;
BEGIN
    -- The event is the API's: a single-object Avro record (C3 01 and an
    -- 8-byte fingerprint first), small. Anything else is refused here.
    IF p_event IS NULL OR length(p_event) < 11 OR length(p_event) > 4096
       OR substring(p_event FROM 1 FOR 2) <> '\xc301'::bytea THEN
        RAISE EXCEPTION 'change_schedule: not an event' USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM public.messages m
                   WHERE m.id = p_message_id AND (p_key_id IS NULL OR m.key_id = p_key_id)) THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::text, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT * INTO r FROM public.send_ledger l
    WHERE l.message_id = p_message_id AND l.namespace = p_namespace
    FOR UPDATE;
    IF NOT FOUND OR r.state = 'rerouted' THEN
        RETURN QUERY SELECT 'not_admitted'::text, r.state, r.due_at;
        RETURN;
    END IF;
    IF r.state = 'cancelled' AND p_due_at IS NULL THEN
        RETURN QUERY SELECT 'already_cancelled'::text, r.state, r.due_at;
        RETURN;
    END IF;
    IF r.state <> 'queued' THEN
        RETURN QUERY SELECT 'too_late'::text, r.state, r.due_at;
        RETURN;
    END IF;
    IF r.sent_at IS NOT NULL OR r.pending_recipients IS NOT NULL THEN
        RETURN QUERY SELECT 'too_late'::text, 'partly_sent'::text, r.due_at;
        RETURN;
    END IF;
    IF r.ambiguous THEN
        RETURN QUERY SELECT 'too_late'::text, 'ambiguous'::text, r.due_at;
        RETURN;
    END IF;
    -- The row is locked and was judged `queued` above; the updates say so
    -- again, so that they could never change a row the claim took.
    IF p_due_at IS NULL THEN
        -- The request bytes (addresses, bodies) are not needed any more.
        UPDATE public.send_ledger l
        SET state = 'cancelled', settled_at = now(), payload = NULL,
            last_error = 'cancelled'
        WHERE l.message_id = p_message_id AND l.namespace = p_namespace
          AND l.state = 'queued';
    ELSE
        UPDATE public.send_ledger l SET due_at = p_due_at
        WHERE l.message_id = p_message_id AND l.namespace = p_namespace
          AND l.state = 'queued';
    END IF;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'too_late'::text, l.state, l.due_at FROM public.send_ledger l
            WHERE l.message_id = p_message_id AND l.namespace = p_namespace;
        RETURN;
    END IF;
    IF p_due_at IS NOT NULL THEN
        -- The API shows the time it will go at.
        UPDATE public.messages m SET send_at = p_due_at, updated_at = now()
        WHERE m.id = p_message_id;
    END IF;
    INSERT INTO public.sender_outbox (message_id, namespace, source_partition, topic, key, value)
    VALUES (p_message_id, p_namespace, r.source_partition, p_namespace || 'email.schedule',
            convert_to(p_message_id::text, 'UTF8'), p_event);
    RETURN QUERY SELECT CASE WHEN p_due_at IS NULL THEN 'cancelled' ELSE 'rescheduled' END,
                        CASE WHEN p_due_at IS NULL THEN 'cancelled' ELSE 'queued' END,
                        coalesce(p_due_at, r.due_at);
END;
$$;

-- Functions are executable by PUBLIC unless revoked.
REVOKE ALL ON FUNCTION change_schedule(text, uuid, text, timestamptz, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION change_schedule(text, uuid, text, timestamptz, bytea) TO mailbus_ingest;
