"""`mailbus doctor`'s checks of the shared parts: Kafka and PostgreSQL as each service, links.

Each service connects as its own principal (docs/security.md), so each is
checked with its own credentials: a password file that does not match the
broker's SCRAM credential, or an ACL that `mailbus setup kafka` has not
written, shows up as that service's row.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import psycopg
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from mailbus.db import migration_files
from mailbus.errors import ConfigError
from mailbus.findings import Finding
from mailbus.privileges import FUNCTIONS, SEQUENCES, Seen, differences, fix
from mailbus.settings import ServiceSettings
from mailbus.tokens import Keyring
from mailbus.topics import GRANTS

TIMEOUT = 10.0
def kafka(settings: ServiceSettings) -> Finding:
    """Log in as the service's principal; see every topic and group its grant names."""
    errors: list[KafkaError] = []
    try:
        conf = settings.kafka.client_config()
    except ConfigError as exc:
        return Finding("fail", str(exc), "run `mailbus setup kafka`, or set the password")
    # librdkafka's own log lines would repeat each refused login on stderr; the row says it.
    conf |= {"error_cb": errors.append, "socket.timeout.ms": int(TIMEOUT * 1000),
             "log_level": 0}
    admin = AdminClient(conf)
    who = f"as {settings.kafka.username} at {settings.kafka.bootstrap_servers}"
    # librdkafka reports a refused SCRAM login only to error_cb and keeps
    # retrying, so metadata is asked for in short slices until one answers,
    # the login is refused, or the time is up.
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            meta = admin.list_topics(timeout=1.0)
            break
        except KafkaException as exc:
            admin.poll(0.1)  # serves error_cb
            refused = [e for e in errors if e.code() == KafkaError._AUTHENTICATION]
            if refused:
                return Finding("fail", f"login {who} refused (password set): "
                               f"{refused[-1].str()}",
                               "the password file does not match the broker's SCRAM "
                               "credential: run `mailbus setup kafka`")
            if time.monotonic() > deadline:
                cause = errors[-1].str() if errors else str(exc.args[0])
                return Finding("fail", f"broker unreachable {who}: {cause}",
                               "check MAILBUS_KAFKA__BOOTSTRAP_SERVERS and that Kafka runs")
    grant = GRANTS[settings.service_name]
    missing = [name for name in dict.fromkeys((*grant.read, *grant.write))
               if (t := meta.topics.get(settings.kafka.topic(name))) is None
               or t.error is not None]
    groups = [settings.kafka.topic(g) for g in grant.groups]
    if groups:
        for group, future in admin.describe_consumer_groups(groups).items():
            try:
                future.result(TIMEOUT)
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
                    missing.append(f"group {group}")
    if missing:
        return Finding("fail", f"logged in {who}; not allowed or missing: {', '.join(missing)}",
                       "run `mailbus setup kafka` (topics and ACLs)")
    return Finding("ok", f"logged in {who}; {len(grant.read) + len(grant.write)} topic "
                   f"grant(s), {len(groups)} group(s) in place")


def postgres(settings: ServiceSettings) -> Finding:
    """Log in as the service's role and see the schema at the shipped migration."""
    pg = settings.postgres
    who = f"as {pg.user} at {pg.host}:{pg.port}/{pg.dbname}"
    try:
        conninfo = pg.conninfo()
    except ConfigError as exc:
        return Finding("fail", str(exc), "run `mailbus setup db`, or set the password")
    try:
        with psycopg.connect(conninfo, connect_timeout=int(TIMEOUT)) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        text = " ".join(str(exc).split())
        if "password authentication failed" in text:
            return Finding("fail", f"login {who} refused (password set)",
                           "the password file does not match the role: run `mailbus setup db`")
        return Finding("fail", f"cannot connect {who}: {text[:200]}",
                       "check MAILBUS_POSTGRES__HOST/PORT and that PostgreSQL runs")
    return Finding("ok", f"logged in {who}")


# As the role itself: each table of the public schema, what it may do there. The
# *_privilege functions count column grants too (a SELECT on two columns is a SELECT).
RIGHTS_SQL = """
SELECT c.relname,
       array(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
             AND NOT a.attisdropped ORDER BY a.attnum),
       has_any_column_privilege(c.oid, 'SELECT'), has_any_column_privilege(c.oid, 'INSERT'),
       has_table_privilege(c.oid, 'DELETE'),
       array(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
             AND NOT a.attisdropped AND has_column_privilege(c.oid, a.attnum, 'UPDATE')
             ORDER BY a.attnum),
       has_table_privilege(c.oid, 'TRUNCATE, REFERENCES, TRIGGER')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm')
"""
# MATERIALIZED: the privilege functions must see only the filtered rows
# (has_sequence_privilege refuses a table's oid).
SEQUENCES_SQL = """
WITH s AS MATERIALIZED (SELECT c.oid, c.relname FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'S')
SELECT coalesce(array_agg(relname ORDER BY relname), '{}') FROM s
WHERE has_sequence_privilege(oid, 'USAGE, UPDATE')
"""
FUNCTIONS_SQL = """
SELECT coalesce(array_agg(p.proname ORDER BY p.proname), '{}') FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND has_function_privilege(p.oid, 'EXECUTE')
"""


def table_rights(settings: ServiceSettings) -> Finding:
    """The service's role has the rights on each table that its work needs, and no more
    (mailbus/privileges.py); each difference comes with the statement that fixes it."""
    pg = settings.postgres
    try:
        with psycopg.connect(pg.conninfo(), connect_timeout=int(TIMEOUT)) as conn:
            rows = conn.execute(RIGHTS_SQL).fetchall()
            sequences = conn.execute(SEQUENCES_SQL).fetchone()
            functions = conn.execute(FUNCTIONS_SQL).fetchone()
    except (psycopg.Error, ConfigError) as exc:
        return Finding("fail", f"cannot read the rights of {pg.user}: "
                       f"{' '.join(str(exc).split())[:200]}", "see the postgres login row")
    seen = {r[0]: Seen(tuple(r[1]), r[2], r[3], r[4], tuple(r[5]), r[6]) for r in rows}
    service, role = settings.service_name, pg.user or ""
    # (what, lacking: True / granted beyond the need: False, the fix)
    wrong = [(str(d), d.missing, fix(d, role) + ";") for d in differences(service, seen)]
    for kind, right, found, wanted in (
            ("sequence", "USAGE, UPDATE", sequences[0] if sequences else [],
             SEQUENCES.get(service, [])),
            ("function", "EXECUTE", functions[0] if functions else [],
             FUNCTIONS.get(service, []))):
        wrong += [(f"{right} on {kind} {name}", False,
                   f"REVOKE {right} ON {kind.upper()} {name} FROM {role};")
                  for name in sorted(set(found) - set(wanted))]
        wrong += [(f"{right} on {kind} {name}", True,
                   "run `mailbus setup db` (the migrations grant it)")
                  for name in sorted(set(wanted) - set(found))]
    if not wrong:
        return Finding("ok", f"{role}: the rights on {len(seen)} table(s) are what its"
                       " work needs, no more")
    lacks = ", ".join(w for w, missing, _ in wrong if missing)
    beyond = ", ".join(w for w, missing, _ in wrong if not missing)
    detail = "; ".join(p for p in (f"lacks {lacks}" if lacks else "",
                                   f"has beyond its need {beyond}" if beyond else "") if p)
    return Finding("fail", f"{role} {detail}", "as the schema owner: "
                   + " ".join(dict.fromkeys(f for _, _, f in wrong)))


def migrations(settings: ServiceSettings) -> Finding:
    """Every migration shipped with this version applied (read as the schema owner)."""
    shipped = [v for v, _ in migration_files()]
    try:
        with psycopg.connect(settings.postgres.conninfo(), connect_timeout=int(TIMEOUT)) as conn:
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
    except (psycopg.Error, ConfigError) as exc:
        return Finding("fail", f"cannot read schema_migrations: {' '.join(str(exc).split())}",
                       "run `mailbus setup db`")
    pending = [v for v in shipped if v not in done]
    if pending:
        return Finding("fail", f"{len(pending)} migration(s) not applied: {', '.join(pending)}",
                       "run `mailbus setup db`")
    return Finding("ok", f"schema at {shipped[-1]}")


def link_keys(settings: Any) -> Finding:
    """The keyring that signs (sender) and verifies (hooks, replies) links: present and valid."""
    path = settings.link_keys_file
    try:
        ring = Keyring.from_file(path)
    except ConfigError as exc:
        return Finding("fail", str(exc), "run `make up` (or mailbus setup) to create it, "
                       "and give sender, hooks and replies the same file")
    return Finding("ok", f"{path}: {len(ring.keys)} key(s), current {ring.current!r}")


def hooks_url(base_url: str) -> Finding:
    """The public base URL of the hooks service answers its health check."""
    url = base_url.rstrip("/") + "/healthz"
    try:
        reply = httpx.get(url, timeout=TIMEOUT, follow_redirects=False)
    except httpx.HTTPError as exc:
        return Finding("fail", f"{url}: {type(exc).__name__}: {exc}",
                       "start `mailbus hooks`, or set MAILBUS_HOOKS_BASE_URL to its public URL")
    if reply.status_code != 200:
        return Finding("fail", f"{url} answered {reply.status_code}",
                       "MAILBUS_HOOKS_BASE_URL must point at the hooks service")
    return Finding("ok", f"{url} answered 200")
