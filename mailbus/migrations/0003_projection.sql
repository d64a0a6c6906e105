-- The projection: every event of a message as the projector (`mailbus
-- projector`, Kafka principal and PostgreSQL role of confirm) saw it, each
-- message's current status, and counts per account and UTC day; read by the
-- API for timelines, listings and daily reports.
--
-- `namespace` is the Kafka topic prefix of the installation a row belongs
-- to: installations (and test runs) sharing a database never see or count
-- each other's events.

-- One row per event, written once: the projector inserts with ON CONFLICT
-- DO NOTHING on (namespace, event_id), so a replayed or redelivered record
-- changes nothing. event_id alone would be unique in practice (UUIDs), but a
-- mirrored topic replayed into a second installation must still project there.
-- `counted_day`/`counted_account` are set on the one event that first
-- brought its kind to its message: the row daily_counts counted, so a report
-- restricted to some messages (one API key's) counts exactly as daily_counts.
CREATE TABLE message_events (
    namespace       text NOT NULL,
    event_id        uuid NOT NULL,
    message_id      uuid NOT NULL,
    kind            text NOT NULL,
    occurred_at     timestamptz NOT NULL,
    account_id      text,
    detail          jsonb NOT NULL DEFAULT '{}',
    counted_day     date,
    counted_account text,
    projected_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, event_id),
    CONSTRAINT message_events_kind CHECK (kind IN
        ('requested', 'sent', 'failed', 'delivered', 'bounced', 'response',
         'confirmed', 'unconfirmed', 'unknown'))
);
-- A message's timeline, oldest first.
CREATE INDEX message_events_message ON message_events (namespace, message_id, occurred_at);
-- A day's counted events: the daily report of one key's messages.
CREATE INDEX message_events_counted ON message_events (namespace, counted_day)
    WHERE counted_day IS NOT NULL;

-- The projector's state per message: the set of kinds seen and the status it
-- implies. Kept for every message the projector saw, also those another
-- producer wrote straight to Kafka (no `messages` row). The projector locks
-- these rows (FOR UPDATE, in message id order) before deciding: two
-- instances projecting events of one message (email.requested is keyed by
-- account, the rest by message) serialise here, so a kind is counted once.
CREATE TABLE message_status (
    namespace  text NOT NULL,
    message_id uuid NOT NULL,
    account_id text,
    kinds      text[] NOT NULL DEFAULT '{}',
    status     text NOT NULL DEFAULT 'queued',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, message_id)
);

-- Messages per account and UTC day, each message counted once per kind (see
-- services/confirm/projection.py). Only ever incremented, in the transaction
-- that inserted the counted event, so a replay counts nothing twice.
CREATE TABLE daily_counts (
    namespace   text NOT NULL,
    day         date NOT NULL,
    account_id  text NOT NULL,
    requested   bigint NOT NULL DEFAULT 0,
    sent        bigint NOT NULL DEFAULT 0,
    delivered   bigint NOT NULL DEFAULT 0,
    confirmed   bigint NOT NULL DEFAULT 0,
    failed      bigint NOT NULL DEFAULT 0,
    bounced     bigint NOT NULL DEFAULT 0,
    unconfirmed bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, day, account_id)
);

-- Listing every message newest first (admin keys), keyset-paginated on
-- (requested_at, id); a key's own listing uses messages_key_requested.
CREATE INDEX messages_requested_id ON messages (requested_at DESC, id DESC);

-- The projector: appends events, keeps per-message state and counters, and
-- moves the API's own rows along; it can neither change nor delete history.
GRANT SELECT, INSERT ON message_events TO mailbus_confirm;
GRANT SELECT, INSERT, UPDATE (account_id, kinds, status, updated_at)
    ON message_status TO mailbus_confirm;
GRANT SELECT, INSERT,
    UPDATE (requested, sent, delivered, confirmed, failed, bounced, unconfirmed)
    ON daily_counts TO mailbus_confirm;
GRANT SELECT, UPDATE (status, updated_at) ON messages TO mailbus_confirm;

-- The API reads the projection.
GRANT SELECT ON message_events, message_status, daily_counts TO mailbus_ingest;
