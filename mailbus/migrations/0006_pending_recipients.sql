-- Recipients refused for now while the message was taken for the others.
--
-- An SMTP server may refuse some recipients of a transaction with a 4xx
-- reply at RCPT (greylisting, a full mailbox, a rate limit per domain) and
-- accept the rest. The message is handed over for the accepted ones, and
-- the row goes back to the queue with `pending_recipients` set: the next
-- attempts send the same message to those recipients only, until they are
-- taken, refused for good, or the attempts run out. NULL: every recipient of
-- the request. `sent_at` keeps the first hand-over throughout.
ALTER TABLE send_ledger ADD COLUMN pending_recipients text[];

-- Rebuilding the rolling 24 h quota counts these rows too: they were handed
-- over once already. Small: only rows still waiting for some recipients.
CREATE INDEX send_ledger_partly_sent ON send_ledger (namespace, account_id, sent_at)
    WHERE state <> 'sent' AND sent_at IS NOT NULL;
