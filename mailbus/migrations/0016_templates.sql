-- Stored templates (POST /v1/templates): each version of a template is one
-- row, never changed once written; an update is a new row with the next
-- version number, a delete removes every version of the name.
--
-- A template belongs to the API key that created it, in this installation's
-- namespace (the topic prefix, as webhook endpoints and the projection): every
-- statement of services/ingest/templates.sql is scoped to (namespace, key_id),
-- so another key's template is as absent as an unknown one. The ingest
-- resolves a template when it accepts a message and copies its source into
-- the email.requested event, so no other service reads this table, and
-- deleting a template never changes a message already accepted.
--
-- The sizes are the API's caps (services/ingest/templates.py), kept here
-- too so that no writer can store more than the API would accept.
CREATE TABLE templates (
    namespace  text NOT NULL,
    key_id     text NOT NULL REFERENCES api_keys (id),
    name       text NOT NULL,
    version    integer NOT NULL,
    subject    text,
    text       text,
    html       text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT templates_name CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
    CONSTRAINT templates_version CHECK (version >= 1),
    CONSTRAINT templates_body CHECK (text IS NOT NULL OR html IS NOT NULL),
    CONSTRAINT templates_size CHECK (
        coalesce(octet_length(subject), 0) + coalesce(octet_length(text), 0)
        + coalesce(octet_length(html), 0) <= 524288),
    -- The latest version of a name is the first row of this index backwards.
    PRIMARY KEY (namespace, key_id, name, version)
);

-- The API creates versions, reads them and deletes whole templates; a
-- version is never updated.
GRANT SELECT, INSERT, DELETE ON templates TO mailbus_ingest;
