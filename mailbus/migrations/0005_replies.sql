-- The replies service's mailbox readers: how far each mailbox has been read,
-- and every message read from one.
--
-- `namespace` is the Kafka topic prefix of the installation a row belongs
-- to: installations (and test runs) sharing a database never read each
-- other's marks or messages.

-- One high-water mark per mailbox. A reader hands a message to the service
-- first and moves the mark past it only after that returned, so a crash in
-- between hands it over again (at least once; inbound_messages dedupes).
--   IMAP:  uidvalidity + last_uid. UIDs only mean something under their
--          UIDVALIDITY; when the server announces another one, the mark is
--          reset (resets, reset_at, reset_reason say when and why) and the
--          mailbox is read again, skipping Message-IDs already recorded.
--   Gmail: history_id for users.history.list, and last_received_at (the
--          internalDate of the newest message handed over) for the full
--          sync that replaces history once Gmail no longer has it (404).
CREATE TABLE mailbox_state (
    namespace        text NOT NULL,
    account_id       text NOT NULL,
    mailbox          text NOT NULL,
    uidvalidity      bigint,
    last_uid         bigint NOT NULL DEFAULT 0,
    history_id       text,
    last_received_at timestamptz,
    resets           integer NOT NULL DEFAULT 0,
    reset_at         timestamptz,
    reset_reason     text,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, account_id, mailbox),
    CONSTRAINT mailbox_state_uid CHECK (last_uid >= 0)
);

-- Every message read from a mailbox, whether or not it answers one of ours.
-- `source_ref` names it in its mailbox ("imap:<uidvalidity>:<uid>",
-- "gmail:<id>"), so a message handed over twice is recorded once (INSERT
-- ... ON CONFLICT DO NOTHING). `message_id` is the mailbus message it
-- answers, when the classifier found one. `text` is capped by the service;
-- the full message stays in the mailbox.
CREATE TABLE inbound_messages (
    namespace         text NOT NULL,
    account_id        text NOT NULL,
    source_ref        text NOT NULL,
    header_message_id text,
    received_at       timestamptz,
    kind              text NOT NULL,
    message_id        uuid,
    sender            text,
    subject           text,
    text              text,
    detail            jsonb NOT NULL DEFAULT '{}',
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, account_id, source_ref)
);
-- After a UIDVALIDITY change, or in a Gmail full sync: was this Message-ID
-- already read from the account?
CREATE INDEX inbound_messages_header ON inbound_messages
    (namespace, account_id, header_message_id) WHERE header_message_id IS NOT NULL;
-- The API's view of what came back for one of our messages.
CREATE INDEX inbound_messages_message ON inbound_messages (namespace, message_id, recorded_at)
    WHERE message_id IS NOT NULL;

-- The reader keeps its marks and appends messages; it never rewrites one.
GRANT SELECT, INSERT, UPDATE ON mailbox_state TO mailbus_replies;
GRANT SELECT, INSERT ON inbound_messages TO mailbus_replies;
-- The API may show what came back.
GRANT SELECT ON inbound_messages TO mailbus_ingest;
