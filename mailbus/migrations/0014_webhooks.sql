-- Outbound webhooks: endpoints (managed through the API by their key), one
-- delivery row per endpoint and event (the webhooks service's outbox), and
-- every attempt made.
--
-- A key may carry the `webhooks` scope; the check is widened, not replaced
-- by anything narrower, so every existing key stays valid.
ALTER TABLE api_keys DROP CONSTRAINT api_keys_scopes_known;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_scopes_known
    CHECK (scopes <@ ARRAY['send', 'read', 'admin', 'webhooks']::text[]);

-- `namespace` is the topic prefix of the installation (the webhooks service
-- of a namespace delivers only its own endpoints). `all_messages` is set
-- for an admin key's endpoint: it receives events of every message, as the
-- admin key reads every message through the API. The signing secret is
-- kept in clear: HMAC needs it. A rotation keeps the previous secret until
-- `previous_secret_until`, and deliveries are signed with both meanwhile.
CREATE TABLE webhook_endpoints (
    id                    uuid PRIMARY KEY,
    namespace             text NOT NULL,
    key_id                text NOT NULL REFERENCES api_keys (id),
    all_messages          boolean NOT NULL DEFAULT false,
    url                   text NOT NULL,
    event_types           text[] NOT NULL,
    description           text NOT NULL DEFAULT '',
    secret                text NOT NULL,
    previous_secret       text,
    previous_secret_until timestamptz,
    enabled               boolean NOT NULL DEFAULT true,
    disabled_reason       text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_endpoints_url_length CHECK (length(url) <= 2048),
    CONSTRAINT webhook_endpoints_description_length CHECK (length(description) <= 512)
);
CREATE INDEX webhook_endpoints_key ON webhook_endpoints (namespace, key_id, created_at);

-- One row per (endpoint, lane, event): the live lane is the nil UUID, each
-- replay has a lane of its own, so a replay never disturbs live deliveries
-- and delivers an event again under the same event id. `body` is the exact
-- JSON sent: every retry signs and sends the same bytes.
CREATE TABLE webhook_deliveries (
    endpoint_id     uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    lane            uuid NOT NULL,
    event_id        uuid NOT NULL,
    namespace       text NOT NULL,
    event_type      text NOT NULL,
    occurred_at     timestamptz NOT NULL,
    body            text NOT NULL,
    state           text NOT NULL DEFAULT 'pending',
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    leased_until    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz,
    PRIMARY KEY (endpoint_id, lane, event_id),
    CONSTRAINT webhook_deliveries_state CHECK (state IN ('pending', 'delivered', 'failed'))
);
-- The dispatcher's question: which endpoints have a delivery due?
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (namespace, next_attempt_at)
    WHERE state = 'pending';
-- Settled deliveries by age, for the retention prune.
CREATE INDEX webhook_deliveries_settled ON webhook_deliveries (namespace, settled_at)
    WHERE state <> 'pending';
-- An endpoint's due deliveries, oldest event first.
CREATE INDEX webhook_deliveries_order ON webhook_deliveries
    (endpoint_id, lane, occurred_at, event_id) WHERE state = 'pending';

CREATE TABLE webhook_attempts (
    endpoint_id  uuid NOT NULL,
    lane         uuid NOT NULL,
    event_id     uuid NOT NULL,
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    status_code  integer,
    latency_ms   integer NOT NULL,
    error        text,
    response     text,
    PRIMARY KEY (endpoint_id, lane, event_id, attempt),
    FOREIGN KEY (endpoint_id, lane, event_id)
        REFERENCES webhook_deliveries (endpoint_id, lane, event_id) ON DELETE CASCADE
);
CREATE INDEX webhook_attempts_listing ON webhook_attempts (endpoint_id, at DESC, event_id);

-- A rewind asked for through the API; the webhooks service reads the
-- topics from `since` up to where they ended when it started the replay,
-- and queues the matching events in the replay's own lane.
CREATE TABLE webhook_replays (
    id           uuid PRIMARY KEY,
    endpoint_id  uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    namespace    text NOT NULL,
    since        timestamptz NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    state        text NOT NULL DEFAULT 'pending',
    queued       integer NOT NULL DEFAULT 0,
    finished_at  timestamptz,
    CONSTRAINT webhook_replays_state CHECK (state IN ('pending', 'done'))
);
CREATE INDEX webhook_replays_pending ON webhook_replays (namespace) WHERE state = 'pending';

-- The API (ingest) manages a key's endpoints, queues test events and
-- replays, and lists attempts. It neither sends nor settles a delivery.
GRANT SELECT, INSERT, DELETE,
    UPDATE (url, event_types, description, secret, previous_secret, previous_secret_until,
            enabled, disabled_reason, updated_at)
    ON webhook_endpoints TO mailbus_ingest;
GRANT SELECT, INSERT ON webhook_deliveries TO mailbus_ingest;
GRANT SELECT ON webhook_attempts TO mailbus_ingest;
GRANT SELECT, INSERT ON webhook_replays TO mailbus_ingest;

-- The webhooks service: reads endpoints (and disables one that keeps
-- failing), owns deliveries and attempts (deleting settled ones past their
-- retention), works off replays, and learns which key sent a message and
-- whether that key still stands; nothing else.
GRANT SELECT, UPDATE (enabled, disabled_reason, updated_at)
    ON webhook_endpoints TO mailbus_webhooks;
GRANT SELECT, INSERT, DELETE,
    UPDATE (state, attempts, next_attempt_at, leased_until, settled_at)
    ON webhook_deliveries TO mailbus_webhooks;
GRANT SELECT, INSERT ON webhook_attempts TO mailbus_webhooks;
GRANT SELECT, UPDATE (state, queued, finished_at) ON webhook_replays TO mailbus_webhooks;
GRANT SELECT (id, key_id) ON messages TO mailbus_webhooks;
GRANT SELECT (id, revoked_at) ON api_keys TO mailbus_webhooks;
