-- The sender's ledger stays bounded.
--
-- A row is needed while it is queued or sending, for 24 h after its send
-- (the rolling quota is rebuilt from `sent_at`), and for as long as the
-- email.requested record it came from can be read again (a replay finds the
-- row and sends nothing twice). Past that, settled rows (sent, failed,
-- rerouted) are deleted in batches by the sender
-- (MAILBUS_LEDGER_RETENTION_HOURS). Their request bytes, which hold the
-- addresses and bodies, are cleared sooner
-- (MAILBUS_LEDGER_PAYLOAD_RETENTION_HOURS): nothing reads a settled row's
-- payload again.
--
-- `settled_at`: when the row last became sent, failed or rerouted; NULL while
-- it is queued or sending (a rerouted row that comes back is queued again).
ALTER TABLE send_ledger ADD COLUMN settled_at timestamptz;
ALTER TABLE send_ledger ALTER COLUMN payload DROP NOT NULL;

-- Rows settled before this migration: their best known settlement time.
UPDATE send_ledger SET settled_at = coalesce(sent_at, claimed_at, admitted_at)
WHERE state IN ('sent', 'failed', 'rerouted');

-- The prune walks settled rows oldest first. Partial: queued and sending
-- rows, which the prune never touches, are not in it.
CREATE INDEX send_ledger_settled ON send_ledger (namespace, settled_at)
    WHERE state IN ('sent', 'failed', 'rerouted');
-- Clearing payloads: only rows that still hold one, so the index holds about
-- a payload retention's worth of rows, not the whole row retention.
CREATE INDEX send_ledger_settled_payload ON send_ledger (namespace, settled_at)
    WHERE state IN ('sent', 'failed', 'rerouted') AND payload IS NOT NULL;

GRANT DELETE ON send_ledger TO mailbus_sender;
