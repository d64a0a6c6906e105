-- Stored templates as an API resource, and their lookup when a message names
-- one. Each runs as mailbus_ingest; every statement is scoped to this
-- installation's namespace and the asking key, so another key's template is
-- as absent as an unknown one.

-- name: lock_key
-- Writes of one key are serialised (per transaction), so its caps hold exactly
-- and two updates of a name cannot both take the same next version number.
-- A hash collision with another key only makes the two wait for each other.
SELECT pg_advisory_xact_lock(hashtextextended(%(namespace)s || '/' || %(key_id)s, 0));

-- name: usage
-- What the key holds, against its caps: names, versions of this name, bytes.
SELECT count(DISTINCT name) AS names,
       count(*) FILTER (WHERE name = %(name)s) AS versions,
       coalesce(max(version) FILTER (WHERE name = %(name)s), 0) AS latest,
       coalesce(sum(coalesce(octet_length(subject), 0) + coalesce(octet_length(text), 0)
                    + coalesce(octet_length(html), 0)), 0) AS bytes
FROM templates WHERE namespace = %(namespace)s AND key_id = %(key_id)s;

-- name: insert
INSERT INTO templates (namespace, key_id, name, version, subject, text, html)
VALUES (%(namespace)s, %(key_id)s, %(name)s, %(version)s, %(subject)s, %(text)s, %(html)s)
RETURNING name, version, subject, text, html, created_at;

-- name: list
-- One row per name: its latest version and when the first and latest were made.
SELECT name, max(version) AS latest_version, count(*) AS versions,
       min(created_at) AS created_at, max(created_at) AS updated_at
FROM templates WHERE namespace = %(namespace)s AND key_id = %(key_id)s
GROUP BY name ORDER BY name;

-- name: versions
SELECT version, created_at FROM templates
WHERE namespace = %(namespace)s AND key_id = %(key_id)s AND name = %(name)s
ORDER BY version;

-- name: delete
DELETE FROM templates
WHERE namespace = %(namespace)s AND key_id = %(key_id)s AND name = %(name)s;

-- name: find
-- Templates named by messages, many at once (one round trip for the requests
-- that arrive together): row i answers the i-th (key, name, version), a NULL
-- version meaning the latest. The primary key's index finds each, the latest
-- by reading it backwards. No row for i: no such template (or version).
SELECT DISTINCT ON (q.i) q.i, t.name, t.version, t.subject, t.text, t.html, t.created_at
FROM unnest(%(key_ids)s::text[], %(names)s::text[], %(versions)s::int[])
     WITH ORDINALITY AS q (key_id, name, version, i)
JOIN templates t ON t.namespace = %(namespace)s AND t.key_id = q.key_id AND t.name = q.name
                AND (q.version IS NULL OR t.version = q.version)
ORDER BY q.i, t.version DESC;
