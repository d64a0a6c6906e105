-- Fenced ownership of email.requested partitions. Kafka's group tells a
-- sender which partitions it owns, but a sender that lost one learns it late
-- (its rebalance callback runs between polls) and may still be sending that
-- partition's rows. Each take-over bumps the partition's epoch; claims and
-- settles carry the epoch they were made under and lock this row FOR SHARE,
-- so a take-over (which updates it) waits for them, and a stale owner's
-- claim or settle made after it matches nothing. Senders that predate this
-- table never read it: it only fences senders that use it.
CREATE TABLE IF NOT EXISTS sender_partitions (
    namespace text NOT NULL,
    partition integer NOT NULL,
    owner uuid NOT NULL,
    epoch bigint NOT NULL DEFAULT 1,
    taken_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, partition)
);

GRANT SELECT, INSERT, UPDATE ON sender_partitions TO mailbus_sender;
