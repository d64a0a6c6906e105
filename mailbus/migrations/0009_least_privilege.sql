-- The projector gets a role of its own.
--
-- Until now `mailbus projector` ran as the confirm principal, so the Faust
-- join (which touches no table) held the projector's writes to the
-- projection, and the projector could produce verdicts to email.confirmed.
-- mailbus_projector (created by `mailbus setup db`, like every service role)
-- now holds exactly what 0003 and 0004 gave the projector, and
-- mailbus_confirm holds nothing but CONNECT.

GRANT SELECT, INSERT ON message_events TO mailbus_projector;
GRANT SELECT, INSERT, UPDATE (account_id, kinds, status, updated_at)
    ON message_status TO mailbus_projector;
GRANT SELECT, INSERT,
    UPDATE (requested, sent, delivered, confirmed, failed, bounced, unconfirmed)
    ON daily_counts TO mailbus_projector;
GRANT SELECT, UPDATE (status, updated_at) ON messages TO mailbus_projector;
GRANT SELECT, INSERT, UPDATE (address, reason, active, message_id, event_id, occurred_at,
                              updated_at)
    ON suppressions TO mailbus_projector;

-- Table-level REVOKE ALL also takes back the column grants (UPDATE (...))
-- that 0003 and 0004 made on these tables.
REVOKE ALL ON message_events, message_status, daily_counts, messages, suppressions
    FROM mailbus_confirm;
