-- What recipients answered, as the API reads it, and who must not be mailed.
--
-- Responses (replies, clicks, unsubscribes, complaints, opens) are rows of
-- message_events with kind 'response', written by the projector like every
-- other event; the index below serves the API's response feed, which pages
-- in the order mailbus recorded them (projected_at), so a client polling
-- with a cursor never misses one that arrived late with an older
-- occurred_at.
CREATE INDEX message_events_responses
    ON message_events (namespace, projected_at, event_id)
    WHERE kind = 'response';

-- The suppression list: the compacted email.suppressions topic as a table,
-- one row per address and scope ('' = every account), the latest event
-- winning (occurred_at, then event_id, so a replay or an out-of-order
-- delivery never brings an older state back). The sender reads the topic
-- itself; this copy is for the API and for operators.
CREATE TABLE suppressions (
    namespace    text NOT NULL,
    address_hash text NOT NULL,
    scope        text NOT NULL DEFAULT '',
    address      text NOT NULL,
    reason       text NOT NULL,
    active       boolean NOT NULL,
    message_id   uuid,
    event_id     uuid NOT NULL,
    occurred_at  timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, address_hash, scope),
    CONSTRAINT suppressions_hash CHECK (address_hash ~ '^[0-9a-f]{64}$')
);
CREATE INDEX suppressions_active ON suppressions (namespace, updated_at DESC)
    WHERE active;

GRANT SELECT, INSERT, UPDATE (address, reason, active, message_id, event_id, occurred_at,
                              updated_at)
    ON suppressions TO mailbus_confirm;
GRANT SELECT ON suppressions TO mailbus_ingest;
