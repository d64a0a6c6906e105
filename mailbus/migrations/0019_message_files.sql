-- Which stored files each accepted message names (their SHA-256s, as in its
-- email.requested event), so a reschedule can keep them as long as the
-- message's new time needs (services/ingest/cancel.sql, keep_files). The
-- ingest writes it with the message row; nothing else reads it.
ALTER TABLE messages ADD COLUMN attachments text[] NOT NULL DEFAULT '{}';
