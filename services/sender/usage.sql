-- What `mailbus accounts list` shows of the ledger. Run by the operator's
-- CLI as the admin role, not by the sender; read-only.

-- name: sent_last_day
-- The rolling 24 h the quota counts (quota.py rebuilds it from the same rows).
SELECT account_id, count(*) FROM send_ledger
WHERE namespace = %(namespace)s AND state = 'sent' AND sent_at > now() - interval '24 hours'
GROUP BY account_id;

-- name: queued
SELECT account_id, count(*) FROM send_ledger
WHERE namespace = %(namespace)s AND state = 'queued'
GROUP BY account_id;
