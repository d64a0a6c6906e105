-- A message id is unique within a namespace, not across them: a replay of
-- email.requested into another namespace (docs/replay.md) carries the same
-- message ids, and its sender must find a row of its own, not the original's
-- `sent` row (which would leave the replayed message queued forever).
-- message_id leads: every lookup names it, and a key led by namespace would
-- tempt the planner into walking a whole namespace instead of the partial
-- indexes the claim and the prune are written for.
ALTER TABLE send_ledger DROP CONSTRAINT send_ledger_pkey;
ALTER TABLE send_ledger ADD PRIMARY KEY (message_id, namespace);

-- Requests that arrived through `mailbus replay` (they carry its
-- mailbus.replay.source header): delivered to the replay sink, never through
-- the account's own transport, unless the sender is told otherwise.
ALTER TABLE send_ledger ADD COLUMN replayed boolean NOT NULL DEFAULT false;
