-- Rotating a key's secret (`mailbus keys rotate`): the key keeps its id, and
-- with it everything that belongs to it (messages, templates, webhook
-- endpoints, files); only the secret changes. The secret it replaced stays
-- valid until previous_valid_until, so the applications that hold it can
-- move to the new one without a window of 401s.
ALTER TABLE api_keys
    ADD COLUMN previous_secret_sha256 bytea,
    ADD COLUMN previous_valid_until timestamptz,
    ADD CONSTRAINT api_keys_previous_secret_whole
        CHECK ((previous_secret_sha256 IS NULL) = (previous_valid_until IS NULL));
