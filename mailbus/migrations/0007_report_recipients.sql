-- Whether a delivery report or a complaint names an address we sent that
-- message to.
--
-- A DSN or an ARF report suppresses its recipient for every account, and
-- anyone can mail one to our mailboxes. The replies service therefore acts
-- on a report only when the message it names was really sent, by us, to the
-- address it names. The recipients a message was handed over to are the
-- `recipients` of its email.sent events, which the projector keeps in
-- message_events.detail (one event per hand-over, each naming the
-- recipients that hand-over reached).
--
-- The replies role gets this one function, not the tables: message_events
-- holds every reply's text and subject, and send_ledger every message whole.
-- The function answers only "which of these addresses did message M go to",
-- to a caller that already knows M's random id, plus whether any hand-over
-- of M is recorded yet. SECURITY DEFINER runs it as the owner; search_path
-- is pinned so a caller cannot shadow the tables or lower() with its own.
--
--   projected       an email.sent of the message is in the projection
--   recipients      those of p_addresses it was sent to, lower-cased
--                   (addresses are compared without regard to case, as the
--                   sender's envelope and the suppression list do)
--   handed_over_at  the sender's ledger: when it was first handed over, or
--                   claimed when a hand-over is in flight; NULL when the
--                   ledger does not know it. A report read in the moment
--                   between a hand-over and the projection of its
--                   email.sent is read again later instead of refused.
CREATE FUNCTION replies_sent_to(p_namespace text, p_message_id uuid, p_addresses text[])
RETURNS TABLE (projected boolean, recipients text[], handed_over_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH sent AS (
        SELECT e.detail
        FROM public.message_events e
        WHERE e.namespace = p_namespace AND e.message_id = p_message_id AND e.kind = 'sent'
    )
    SELECT
        EXISTS (SELECT 1 FROM sent),
        ARRAY(
            SELECT DISTINCT lower(r.address)
            FROM sent
            CROSS JOIN LATERAL jsonb_array_elements_text(
                CASE jsonb_typeof(sent.detail -> 'recipients')
                    WHEN 'array' THEN sent.detail -> 'recipients' ELSE '[]' END) AS r(address)
            WHERE lower(r.address) = ANY (
                SELECT lower(asked) FROM unnest(p_addresses) AS asked)
            ORDER BY 1),
        (SELECT coalesce(l.sent_at, CASE WHEN l.state = 'sending' THEN l.claimed_at END)
         FROM public.send_ledger l
         WHERE l.message_id = p_message_id AND l.namespace = p_namespace)
$$;

-- Functions are executable by PUBLIC unless revoked.
REVOKE ALL ON FUNCTION replies_sent_to(text, uuid, text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION replies_sent_to(text, uuid, text[]) TO mailbus_replies;
