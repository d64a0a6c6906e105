-- The sender's ledger, delay queue and outbox.
--
-- Every email.requested record is first admitted here (and only then is its
-- Kafka offset committed), so the ledger is the sender's whole state:
--   queued   waiting for its due time (send_at, a retry, or quota freeing up)
--   sending  claimed by a worker: handed to the transport, outcome not yet recorded
--   sent     handed over; never sent again
--   failed   permanently failed, or gave up after the last retry
--   rerouted handed to another account of its pool by a new email.requested event
-- A row found in `sending` when its partition is (re)assigned belongs to a
-- sender that died mid-send: it goes back to `queued` with `ambiguous` set.
-- `namespace` is the Kafka topic prefix of the installation a row belongs
-- to: installations (and test runs) that share a database never touch each
-- other's rows.
CREATE TABLE send_ledger (
    message_id       uuid PRIMARY KEY,
    namespace        text NOT NULL DEFAULT '',
    account_id       text NOT NULL,
    pool             text,
    source_partition integer NOT NULL,
    state            text NOT NULL DEFAULT 'queued',
    due_at           timestamptz NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    reroutes         integer NOT NULL DEFAULT 0,
    ambiguous        boolean NOT NULL DEFAULT false,
    payload          bytea NOT NULL,
    requested_at     timestamptz,
    admitted_at      timestamptz NOT NULL DEFAULT now(),
    claimed_at       timestamptz,
    sent_at          timestamptz,
    last_error       text,
    CONSTRAINT send_ledger_state CHECK
        (state IN ('queued', 'sending', 'sent', 'failed', 'rerouted'))
);
-- The workers' claim: due rows of one account in the partitions this
-- instance owns, oldest first. Partial, so it stays small however much
-- history the table holds.
CREATE INDEX send_ledger_due ON send_ledger (namespace, account_id, due_at)
    WHERE state = 'queued';
-- Rebuilding an account's rolling 24 h quota on start.
CREATE INDEX send_ledger_sent ON send_ledger (namespace, account_id, sent_at)
    WHERE state = 'sent';
CREATE INDEX send_ledger_sending ON send_ledger (namespace, source_partition)
    WHERE state = 'sending';

-- Events decided but not yet acknowledged by Kafka. Written in the same
-- transaction as the ledger change that decided them, deleted once the
-- broker acked: a crash in between re-emits them (consumers deduplicate on
-- event_id), and none is lost.
CREATE TABLE sender_outbox (
    id               bigserial PRIMARY KEY,
    namespace        text NOT NULL DEFAULT '',
    message_id       uuid NOT NULL,
    source_partition integer NOT NULL,
    topic            text NOT NULL,
    key              bytea NOT NULL,
    value            bytea NOT NULL,
    headers          jsonb NOT NULL DEFAULT '[]',
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sender_outbox_partition ON sender_outbox (namespace, source_partition, id);

GRANT SELECT, INSERT, UPDATE ON send_ledger TO mailbus_sender;
GRANT SELECT, INSERT, DELETE ON sender_outbox TO mailbus_sender;
GRANT USAGE ON SEQUENCE sender_outbox_id_seq TO mailbus_sender;
GRANT SELECT ON send_ledger TO mailbus_admin;
