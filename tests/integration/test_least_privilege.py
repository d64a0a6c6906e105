"""Least privilege for every principal, proven on the real broker and the real PostgreSQL.

Each service's own credentials (var/secrets) try every topic of a fresh
namespace (produce, fetch, describe), every consumer group (join) and topic
creation, and every table (select, insert, update of each column, delete).
What its grant in mailbus/topics.py (or, for tables, mailbus/privileges.py) allows
must work, and everything else must be refused by the server itself. A few
expectations are written out by hand, so that a table grown too broad
cannot make the matrix pass on its own.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)
from psycopg import sql

from mailbus import topics
from mailbus.privileges import FUNCTIONS, NOTHING, SEQUENCES, TABLE_RIGHTS, Rights
from mailbus.provision import provision
from mailbus.settings import ServiceSettings
from mailbus.topics import GRANTS, TOPICS
from tests.support.kafka import drop_namespace, new_prefix

REPO = Path(__file__).resolve().parents[2]
PRINCIPALS = ("ingest", "sender", "confirm", "projector", "hooks", "replies", "webhooks")
TOPIC_NAMES = tuple(spec.name for spec in TOPICS)
# Every group some grant names, one under confirm's owned prefix (a Faust
# internal group), one that a grant named before (replies joined none) and
# one nobody owns.
GROUPS = (*sorted({g for grant in GRANTS.values() for g in grant.groups}),
          "mailbus-confirm-probe", "mailbus-replies", "mailbus-nobody")
OK = "ok"
TOPIC_REFUSED = KafkaError.TOPIC_AUTHORIZATION_FAILED
GROUP_REFUSED = KafkaError.GROUP_AUTHORIZATION_FAILED
# Long enough for an allowed group join on a loaded machine; a refusal
# arrives in well under a second.
PROBE_SECONDS = 15.0

Outcome = str | int  # OK, or the Kafka error code that refused it


def test_every_service_has_a_principal() -> None:
    # Written out: a service dropped from GRANTS would otherwise leave the
    # matrix below without it, and pass.
    assert set(GRANTS) == set(PRINCIPALS)
    # A retired name is one no grant gives any more.
    named = {n for g in GRANTS.values() for n in (*g.read, *g.write, *g.groups)}
    assert not set(topics.RETIRED) & named


# Where each principal's code lives.
CODE = {"ingest": ("services/ingest",), "sender": ("services/sender",),
        "confirm": ("services/confirm/stream.py",),
        "projector": ("services/confirm/projector.py",),
        "replies": ("services/replies",), "hooks": ("services/hooks",),
        "webhooks": ("services/webhooks",)}
CONSTANTS = {getattr(topics, n): n for n in dir(topics)
             if n.isupper() and isinstance(getattr(topics, n), str)}


@pytest.mark.parametrize("principal", PRINCIPALS)
def test_every_grant_is_used_by_the_service_code(principal: str) -> None:
    # A grant nobody's code names is a grant too many: each topic must
    # appear as its topics constant, each group where a group id is set (a
    # Faust app id is its group).
    text = "\n".join(f.read_text() for where in CODE[principal]
                     for f in ([REPO / where] if where.endswith(".py")
                               else sorted((REPO / where).glob("*.py"))))
    grant = GRANTS[principal]
    for name in {*grant.read, *grant.write}:
        assert re.search(rf"\btopics\.{CONSTANTS[name]}\b", text), (principal, name)
    group_id = r"(group[._]id|APP_NAME)\b[^\n]*\"{}\""
    for group in grant.groups:
        assert re.search(group_id.format(re.escape(group)), text), (principal, group)
    for owned in grant.owned_prefixes:
        # Faust names its internal topics and groups after the app id.
        assert re.search(group_id.format(re.escape(owned.rstrip("-"))), text), (
            principal, owned)


def _owned(grant: topics.Grant, name: str) -> bool:
    return name.startswith(grant.owned_prefixes) if grant.owned_prefixes else False


def expected(principal: str, op: str, name: str) -> Outcome:
    """What the principal's Grant says the broker must answer."""
    grant = GRANTS[principal]
    owned = _owned(grant, name)
    if op == "join":
        return OK if name in grant.groups or owned else GROUP_REFUSED
    allowed = {"produce": name in grant.write, "fetch": name in grant.read,
               "describe": name in grant.read or name in grant.write}[op]
    return OK if allowed or owned else TOPIC_REFUSED


# (principal, operation, topic or group, allowed), from reading each service's code.
BY_HAND: list[tuple[str, str, str, bool]] = [
    # The public hooks service reads nothing and writes only responses and suppressions.
    ("hooks", "fetch", topics.REQUESTED, False),
    ("hooks", "describe", topics.REQUESTED, False),
    ("hooks", "fetch", topics.SUPPRESSIONS, False),
    ("hooks", "produce", topics.REQUESTED, False),
    ("hooks", "produce", topics.SENT, False),
    ("hooks", "produce", topics.DELIVERED, False),
    ("hooks", "join", "mailbus-sender", False),
    ("hooks", "produce", topics.RESPONSES, True),
    ("hooks", "produce", topics.SUPPRESSIONS, True),
    # Ingest appends and reads nothing back.
    ("ingest", "fetch", topics.REQUESTED, False),
    ("ingest", "fetch", topics.SUPPRESSIONS, False),
    ("ingest", "produce", topics.SENT, False),
    ("ingest", "produce", topics.REQUESTED, True),
    ("ingest", "produce", topics.SUPPRESSIONS, True),
    # Cancels and reschedules go through the sender's outbox (0018), never from
    # ingest to the topic; only the sender writes email.schedule.
    ("ingest", "produce", topics.SCHEDULE, False),
    ("hooks", "produce", topics.SCHEDULE, False),
    ("replies", "produce", topics.SCHEDULE, False),
    ("confirm", "produce", topics.SCHEDULE, False),
    ("projector", "produce", topics.SCHEDULE, False),
    ("webhooks", "produce", topics.SCHEDULE, False),
    ("sender", "produce", topics.SCHEDULE, True),
    ("sender", "fetch", topics.SCHEDULE, False),
    ("projector", "fetch", topics.SCHEDULE, True),
    ("webhooks", "fetch", topics.SCHEDULE, True),
    ("confirm", "fetch", topics.SCHEDULE, False),
    # The mailbox reader produces DSN outcomes, responses and suppressions only.
    ("replies", "produce", topics.SENT, False),
    ("replies", "produce", topics.REQUESTED, False),
    ("replies", "produce", topics.CONFIRMED, False),
    ("replies", "fetch", topics.RESPONSES, False),
    ("replies", "join", "mailbus-replies", False),
    ("replies", "produce", topics.BOUNCED, True),
    ("replies", "produce", topics.DELIVERED, True),
    # The sender never reads bounces or responses, never lifts or suppresses.
    ("sender", "fetch", topics.BOUNCED, False),
    ("sender", "fetch", topics.RESPONSES, False),
    ("sender", "produce", topics.SUPPRESSIONS, False),
    ("sender", "produce", topics.CONFIRMED, False),
    ("sender", "produce", topics.RESPONSES, False),
    ("sender", "fetch", topics.REQUESTED, True),
    ("sender", "fetch", topics.SUPPRESSIONS, True),
    ("sender", "produce", topics.REQUESTED, True),
    ("sender", "join", "mailbus-sender", True),
    # The Faust join sees no request (recipients, bodies) and no reply text.
    ("confirm", "fetch", topics.REQUESTED, False),
    ("confirm", "fetch", topics.RESPONSES, False),
    ("confirm", "fetch", topics.SUPPRESSIONS, False),
    ("confirm", "join", "mailbus-projector", False),
    ("confirm", "fetch", topics.SENT, True),
    ("confirm", "produce", topics.CONFIRMED, True),
    ("confirm", "join", "mailbus-confirm", True),
    ("confirm", "join", "mailbus-confirm-probe", True),
    # The projector reads everything and writes nothing.
    ("projector", "produce", topics.CONFIRMED, False),
    ("projector", "produce", topics.REQUESTED, False),
    ("projector", "join", "mailbus-confirm", False),
    ("projector", "join", "mailbus-confirm-probe", False),
    ("projector", "fetch", topics.REQUESTED, True),
    ("projector", "fetch", topics.CONFIRMED, True),
    ("projector", "join", "mailbus-projector", True),
    # Webhooks reads every outcome, never a request (bodies, addresses) or
    # the suppression list, and writes nothing.
    ("webhooks", "fetch", topics.REQUESTED, False),
    ("webhooks", "fetch", topics.SUPPRESSIONS, False),
    ("webhooks", "produce", topics.SENT, False),
    ("webhooks", "produce", topics.RESPONSES, False),
    ("webhooks", "join", "mailbus-projector", False),
    ("webhooks", "fetch", topics.SENT, True),
    ("webhooks", "fetch", topics.RESPONSES, True),
    ("webhooks", "fetch", topics.CONFIRMED, True),
    ("webhooks", "join", "mailbus-webhooks", True),
]


def _config(principal: str, prefix: str) -> dict[str, Any]:
    settings = ServiceSettings(service_name=principal)
    return settings.kafka.model_copy(update={"topic_prefix": prefix}).client_config()


def _produce_all(conf: dict[str, Any], prefix: str) -> dict[str, Outcome]:
    """Produce one record to every topic; the broker's verdict per topic."""
    producer = Producer({**conf, "message.timeout.ms": int(PROBE_SECONDS * 1000)})
    out: dict[str, Outcome] = {}

    def report(name: str) -> Callable[[KafkaError | None, Any], None]:
        return lambda err, _msg: out.__setitem__(name, OK if err is None else err.code())

    for name in TOPIC_NAMES:
        # A key: the compacted suppressions topic refuses records without one.
        producer.produce(prefix + name, b"probe", key=b"probe", on_delivery=report(name))
    producer.flush(PROBE_SECONDS + 5)
    return out


def _fetch(conf: dict[str, Any], topic: str) -> Outcome:
    """Fetch partition 0 from the start by assign(): READ on the topic, no group involved."""
    consumer = Consumer({**conf, "group.id": f"probe-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    try:
        # A topic the principal may not even describe has no leader to fetch
        # from: librdkafka stops at the refused metadata and reports nothing
        # for an assigned partition. READ implies DESCRIBE in Kafka, so this
        # refusal is the broker refusing the read.
        meta = consumer.list_topics(topic, timeout=PROBE_SECONDS).topics[topic]
        if meta.error is not None:
            return meta.error.code()
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + PROBE_SECONDS
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is None:
                return OK  # the record the fixture wrote
            # librdkafka looks up the probe group's coordinator anyway; that
            # refusal is about the throwaway group, not the topic.
            if err.code() == GROUP_REFUSED and msg.topic() is None:
                continue
            return err.code()
        return "timeout"
    finally:
        consumer.close()


def _describe_all(conf: dict[str, Any], prefix: str) -> dict[str, Outcome]:
    consumer = Consumer({**conf, "group.id": f"probe-{uuid.uuid4().hex}"})
    try:
        out: dict[str, Outcome] = {}
        for name in TOPIC_NAMES:
            meta = consumer.list_topics(prefix + name, timeout=PROBE_SECONDS).topics[prefix + name]
            out[name] = OK if meta.error is None else meta.error.code()
        return out
    finally:
        consumer.close()


def _join(conf: dict[str, Any], group: str, topic: str) -> Outcome:
    """Subscribe as a member of the group: OK once the group assigned partitions."""
    assigned: list[bool] = []
    consumer = Consumer({**conf, "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    try:
        consumer.subscribe([topic], on_assign=lambda _c, _parts: assigned.append(True))
        deadline = time.monotonic() + PROBE_SECONDS
        while time.monotonic() < deadline and not assigned:
            msg = consumer.poll(0.2)
            err = msg.error() if msg is not None else None
            if err is not None:
                return err.code()
        return OK if assigned else "timeout"
    finally:
        consumer.close()


def _subscribable(principal: str) -> str:
    # A topic the principal may describe, so that subscribing is about the group only.
    grant = GRANTS[principal]
    return (grant.read or grant.write)[0]


@pytest.fixture(scope="module")
def observed(admin_kafka: dict[str, Any], admin: ServiceSettings
             ) -> Iterator[tuple[str, dict[tuple[str, str, str], Outcome]]]:
    """Every probe of every principal in one fresh namespace, run side by side."""
    prefix = new_prefix()
    provision(admin_kafka, admin.var_dir / "secrets", prefix, users=False)
    try:
        seed = Producer(admin_kafka)
        for name in TOPIC_NAMES:
            seed.produce(prefix + name, b"seed", key=b"seed", partition=0)
        assert seed.flush(30) == 0
        confs = {p: _config(p, prefix) for p in PRINCIPALS}
        with ThreadPoolExecutor(max_workers=12) as pool:
            produced = {p: pool.submit(_produce_all, confs[p], prefix) for p in PRINCIPALS}
            described = {p: pool.submit(_describe_all, confs[p], prefix) for p in PRINCIPALS}
            fetched = {(p, t): pool.submit(_fetch, confs[p], prefix + t)
                       for p in PRINCIPALS for t in TOPIC_NAMES}
            joined = {(p, g): pool.submit(_join, confs[p], prefix + g,
                                          prefix + _subscribable(p))
                      for p in PRINCIPALS for g in GROUPS}
            out: dict[tuple[str, str, str], Outcome] = {}
            for p in PRINCIPALS:
                out |= {(p, "produce", t): r for t, r in produced[p].result().items()}
                out |= {(p, "describe", t): r for t, r in described[p].result().items()}
            out |= {(p, "fetch", t): f.result() for (p, t), f in fetched.items()}
            out |= {(p, "join", g): f.result() for (p, g), f in joined.items()}
        yield prefix, out
    finally:
        drop_namespace(admin_kafka, prefix)


def test_the_broker_allows_exactly_what_each_grant_says(observed) -> None:
    _, seen = observed
    assert len(seen) == len(PRINCIPALS) * (3 * len(TOPIC_NAMES) + len(GROUPS))
    wrong = {key: (seen[key], expected(*key)) for key in seen if seen[key] != expected(*key)}
    assert not wrong, "(principal, op, name): (seen, expected) " + repr(wrong)
    # Not a matrix of refusals only, nor of permissions only.
    assert sum(v == OK for v in seen.values()) >= 40
    assert sum(v != OK for v in seen.values()) >= 100


@pytest.mark.parametrize(("principal", "op", "name", "allowed"), BY_HAND,
                         ids=[f"{p}-{op}-{n}" for p, op, n, _ in BY_HAND])
def test_expectations_written_by_hand(observed, principal: str, op: str, name: str,
                                      allowed: bool) -> None:
    _, seen = observed
    refused = GROUP_REFUSED if op == "join" else TOPIC_REFUSED
    assert seen[(principal, op, name)] == (OK if allowed else refused)


def test_only_confirm_creates_topics_and_only_under_its_prefix(observed) -> None:
    prefix, _ = observed
    for principal in PRINCIPALS:
        admin = AdminClient(_config(principal, prefix))
        for name, may in ((f"mailbus-confirm-probe-{principal}-changelog",
                           principal == "confirm"),
                          (f"email.probe-{principal}", False)):
            future = admin.create_topics([NewTopic(prefix + name, 1, 1)],
                                         request_timeout=PROBE_SECONDS)[prefix + name]
            if may:
                future.result()
            else:
                with pytest.raises(KafkaException) as refused:
                    future.result()
                assert refused.value.args[0].code() == TOPIC_REFUSED, (principal, name)


def test_each_writer_may_use_the_idempotent_producer(observed) -> None:
    # What the services run (KIP-679: WRITE on a topic is enough for it).
    prefix, _ = observed
    for principal in PRINCIPALS:
        grant = GRANTS[principal]
        if not grant.write:
            continue
        producer = Producer({**_config(principal, prefix), "enable.idempotence": True,
                             "message.timeout.ms": int(PROBE_SECONDS * 1000)})
        errors: list[KafkaError | None] = []

        def report(err: KafkaError | None, _msg: Any, seen: list[Any] = errors) -> None:
            seen.append(err)

        for name in grant.write:
            producer.produce(prefix + name, b"probe", key=b"probe", on_delivery=report)
        producer.flush(PROBE_SECONDS + 5)
        assert errors == [None] * len(grant.write), principal


def test_provisioning_again_takes_back_what_a_grant_no_longer_gives(
        admin_kafka: dict[str, Any], admin: ServiceSettings) -> None:
    prefix, other = new_prefix(), new_prefix()
    provision(admin_kafka, admin.var_dir / "secrets", prefix, users=False)
    admin_client = AdminClient(admin_kafka)

    def acl(principal: str, rtype: ResourceType, name: str) -> AclBinding:
        return AclBinding(rtype, name, ResourcePatternType.LITERAL, principal, "*",
                          AclOperation.READ, AclPermissionType.ALLOW)

    # What an older grant gave (hooks reading requests, replies' group), and
    # what is not provisioning's business: another principal's ACL and
    # another namespace's.
    stale = [acl("User:hooks", ResourceType.TOPIC, prefix + topics.REQUESTED),
             acl("User:replies", ResourceType.GROUP, prefix + "mailbus-replies")]
    foreign = [acl("User:monitoring", ResourceType.TOPIC, prefix + topics.SENT),
               acl("User:hooks", ResourceType.TOPIC, other + topics.REQUESTED),
               # A namespace whose prefix extends this one's.
               acl("User:hooks", ResourceType.TOPIC, f"{prefix}mailbus-staging-{topics.REQUESTED}")]
    try:
        for future in admin_client.create_acls(stale + foreign).values():
            future.result(30)
        seed = Producer(admin_kafka)
        seed.produce(prefix + topics.REQUESTED, b"seed", key=b"seed", partition=0)
        assert seed.flush(30) == 0
        hooks = _config("hooks", prefix)
        deadline = time.monotonic() + 30
        while _fetch(hooks, prefix + topics.REQUESTED) != OK:  # the stale grant works...
            assert time.monotonic() < deadline
            time.sleep(0.2)
        provision(admin_kafka, admin.var_dir / "secrets", prefix, users=False)
        # ...until provisioning runs again, which waits until the broker applied it.
        assert _fetch(hooks, prefix + topics.REQUESTED) == TOPIC_REFUSED
        assert _join(_config("replies", prefix), prefix + "mailbus-replies",
                     prefix + topics.RESPONSES) == GROUP_REFUSED
        listed = {(b.principal, b.name) for b in admin_client.describe_acls(AclBindingFilter(
            ResourceType.ANY, None, ResourcePatternType.ANY, None, None,  # type: ignore[arg-type]
            AclOperation.ANY, AclPermissionType.ANY)).result(30)}
        assert not {(b.principal, b.name) for b in stale} & listed
        assert {(b.principal, b.name) for b in foreign} <= listed
    finally:
        filters = [AclBindingFilter(b.restype, b.name, b.resource_pattern_type, b.principal,
                                    b.host, b.operation, b.permission_type)
                   for b in stale + foreign]
        for future in admin_client.delete_acls(filters).values():
            future.result(30)
        drop_namespace(admin_kafka, prefix)


# PostgreSQL: what each service role may do, table by table (mailbus/privileges.py,
# which `mailbus doctor` checks too). A table not named for a role must refuse it
# everything.


def _owner_conn(admin: ServiceSettings) -> psycopg.Connection[Any]:
    owner = admin.postgres.model_copy(update={
        "user": "mailbus_owner", "password": None,
        "password_file": admin.var_dir / "secrets" / "postgres-mailbus_owner.password"})
    return psycopg.connect(owner.conninfo(), autocommit=True)


@pytest.fixture(scope="module")
def tables(admin: ServiceSettings) -> dict[str, list[str]]:
    """Every table of the public schema and its columns, as the owner sees them."""
    with _owner_conn(admin) as conn:
        rows = conn.execute(
            "SELECT c.relname, a.attname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm')"
            " ORDER BY c.relname, a.attnum").fetchall()
    out: dict[str, list[str]] = {}
    for table, column in rows:
        out.setdefault(table, []).append(column)
    return out


def _attempts(table: str, columns: list[str]) -> list[tuple[str, str | None, sql.Composed]]:
    """(operation, column, statement) for one table; none of them changes a row."""
    t = sql.Identifier(table)
    out: list[tuple[str, str | None, sql.Composed]] = [
        ("select", None, sql.SQL("SELECT 1 FROM {} LIMIT 0").format(t)),
        ("insert", None, sql.SQL("INSERT INTO {} ({}) SELECT NULL WHERE false").format(
            t, sql.Identifier(columns[0]))),
        ("delete", None, sql.SQL("DELETE FROM {} WHERE false").format(t))]
    out += [("update", c, sql.SQL("UPDATE {} SET {} = NULL WHERE false").format(
        t, sql.Identifier(c))) for c in columns]
    return out


def _may(rights: Rights, op: str, column: str | None) -> bool:
    if op == "update":
        return rights.update is True or (isinstance(rights.update, tuple)
                                         and column in rights.update)
    return bool(getattr(rights, op))


@pytest.mark.parametrize("service", PRINCIPALS)
def test_each_role_may_touch_only_its_tables(service: str, tables: dict[str, list[str]]
                                             ) -> None:
    assert set(TABLE_RIGHTS) == set(PRINCIPALS)
    # The expectations name real tables and columns, or they would test nothing.
    for table, rights in TABLE_RIGHTS[service].items():
        assert table in tables, table
        if isinstance(rights.update, tuple):
            assert set(rights.update) <= set(tables[table]), table
    role = ServiceSettings(service_name=service).postgres
    wrong = []
    with psycopg.connect(role.conninfo()) as conn:
        for table, columns in tables.items():
            rights = TABLE_RIGHTS[service].get(table, NOTHING)
            for op, column, statement in _attempts(table, columns):
                try:
                    with conn.transaction(force_rollback=True):
                        conn.execute(statement)
                    allowed = True
                except psycopg.errors.InsufficientPrivilege:
                    allowed = False
                if allowed != _may(rights, op, column):
                    wrong.append((table, op, column, "allowed" if allowed else "refused"))
    assert not wrong, wrong


@pytest.mark.parametrize("service", PRINCIPALS)
def test_no_role_may_truncate_create_or_draw_foreign_sequences(service: str) -> None:
    role = ServiceSettings(service_name=service).postgres
    with psycopg.connect(role.conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql.SQL("CREATE TABLE {} (id int)").format(
                sql.Identifier(f"probe_{uuid.uuid4().hex[:8]}")))
        # MATERIALIZED: the privilege functions must see only the filtered
        # rows (has_sequence_privilege refuses a table's oid).
        truncatable = conn.execute(
            "WITH t AS MATERIALIZED (SELECT c.oid, c.relname FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r')"
            " SELECT array_agg(relname) FROM t"
            " WHERE has_table_privilege(oid, 'TRUNCATE, REFERENCES, TRIGGER')").fetchone()
        assert truncatable == (None,)
        sequences = conn.execute(
            "WITH s AS MATERIALIZED (SELECT c.oid, c.relname FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'S')"
            " SELECT coalesce(array_agg(relname ORDER BY relname), '{}') FROM s"
            " WHERE has_sequence_privilege(oid, 'USAGE, UPDATE')").fetchone()
        # The outbox's ids are drawn by the sender's inserts alone (written out here).
        assert sequences == ((["sender_outbox_id_seq"] if service == "sender" else []),)
        assert sequences == (SEQUENCES.get(service, []),)
        functions = conn.execute(
            "SELECT coalesce(array_agg(p.proname ORDER BY p.proname), '{}') FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
            " AND has_function_privilege(p.oid, 'EXECUTE')").fetchone()
        # replies_sent_to answers the replies role alone (0007); change_schedule
        # the ingest role alone (0018). Written out here.
        assert functions == (({"replies": ["replies_sent_to"],
                               "ingest": ["change_schedule"]}.get(service, [])),)
        assert functions == ((FUNCTIONS.get(service, [])),)


def test_webhooks_reads_only_who_sent_a_message() -> None:
    # Column grants: the owner of a message and whether a key is revoked;
    # never a subject, a key's secret hash or its scopes.
    role = ServiceSettings(service_name="webhooks").postgres
    with psycopg.connect(role.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT id, key_id FROM messages LIMIT 0")
        conn.execute("SELECT id, revoked_at FROM api_keys LIMIT 0")
        for statement in ("SELECT subject FROM messages", "SELECT secret_sha256 FROM api_keys",
                          "SELECT previous_secret_sha256 FROM api_keys",
                          "SELECT scopes FROM api_keys", "SELECT * FROM messages",
                          "SELECT * FROM send_ledger", "DELETE FROM webhook_endpoints",
                          "UPDATE webhook_endpoints SET url = 'https://x.example/'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]


def test_hooks_reads_no_key_and_replies_cannot_touch_the_ledger() -> None:
    # Written out, whatever TABLE_RIGHTS says: the public service must not
    # see API keys, the mailbox reader must not move a message in the ledger.
    hooks = ServiceSettings(service_name="hooks").postgres
    replies = ServiceSettings(service_name="replies").postgres
    with psycopg.connect(hooks.conninfo(), autocommit=True) as conn:
        for statement in ("SELECT * FROM api_keys", "SELECT * FROM messages",
                          "SELECT * FROM suppressions"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]
    with psycopg.connect(replies.conninfo(), autocommit=True) as conn:
        for statement in ("UPDATE send_ledger SET state = 'sent'", "SELECT * FROM send_ledger",
                          "DELETE FROM sender_outbox", "SELECT * FROM api_keys"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]


def test_search_rows_are_written_by_the_projector_and_read_by_the_api() -> None:
    # Written out, whatever TABLE_RIGHTS says (0015): the projector inserts
    # and never rewrites a row; the API reads them and may not write one,
    # so a key cannot plant a row that would widen its searches.
    row = ("INSERT INTO message_search (namespace, field, value, key_id, requested_at,"
           " message_id) SELECT 'x', 'tag', 't', 'k', now(), gen_random_uuid() WHERE false")
    projector = ServiceSettings(service_name="projector").postgres
    ingest = ServiceSettings(service_name="ingest").postgres
    with psycopg.connect(projector.conninfo(), autocommit=True) as conn:
        conn.execute(row)
        conn.execute("SELECT key_id, requested_at FROM message_status LIMIT 0")
        conn.execute("UPDATE message_status SET key_id = NULL, requested_at = NULL WHERE false")
        for statement in ("UPDATE message_search SET key_id = 'k' WHERE false",
                          "DELETE FROM message_search WHERE false"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]
    with psycopg.connect(ingest.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT namespace, field, value, key_id, requested_at, message_id"
                     " FROM message_search LIMIT 0")
        for statement in (row, "UPDATE message_search SET key_id = 'k' WHERE false",
                          "DELETE FROM message_search WHERE false",
                          "UPDATE message_status SET key_id = 'k' WHERE false"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]
    for service in ("sender", "confirm", "replies", "hooks", "webhooks"):
        role = ServiceSettings(service_name=service).postgres
        with psycopg.connect(role.conninfo(), autocommit=True) as conn, pytest.raises(
                psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT 1 FROM message_search LIMIT 0")


def test_ingest_changes_the_ledger_only_through_change_schedule() -> None:
    # Written out, whatever TABLE_RIGHTS says (0018): the API cancels and
    # reschedules through the one SECURITY DEFINER function; it may not read
    # or write the sender's ledger or outbox, and no other role may call it.
    call = ("SELECT * FROM change_schedule('x', gen_random_uuid(), 'k', NULL,"
            " '\\xc301000000000000000000'::bytea)")
    ingest = ServiceSettings(service_name="ingest").postgres
    with psycopg.connect(ingest.conninfo(), autocommit=True) as conn:
        assert conn.execute(call).fetchone() == ("not_found", None, None)
        for statement in ("SELECT * FROM send_ledger", "UPDATE send_ledger SET state = 'queued'",
                          "INSERT INTO sender_outbox (message_id, source_partition, topic, key,"
                          " value) VALUES (gen_random_uuid(), 0, 't', 'k', 'v')",
                          "SELECT * FROM sender_outbox"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]
    for service in ("sender", "projector", "replies", "webhooks", "admin"):
        role = ServiceSettings(service_name=service).postgres
        with psycopg.connect(role.conninfo(), autocommit=True) as conn, \
                pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(call)  # type: ignore[arg-type]


def test_templates_are_the_ingest_roles_alone_and_never_rewritten() -> None:
    # Written out, whatever TABLE_RIGHTS says (0016): the API creates, reads
    # and deletes versions and cannot rewrite one (a message accepted with a
    # version names what it was); no other role may read a template.
    ingest = ServiceSettings(service_name="ingest").postgres
    with psycopg.connect(ingest.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT namespace, key_id, name, version, subject, text, html, created_at"
                     " FROM templates LIMIT 0")
        conn.execute("INSERT INTO templates (namespace, key_id, name, version, text)"
                     " SELECT 'x', 'k', 'n', 1, 't' WHERE false")
        conn.execute("DELETE FROM templates WHERE false")
        for statement in ("UPDATE templates SET text = 'x' WHERE false",
                          "UPDATE templates SET version = 2 WHERE false",
                          "TRUNCATE templates"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]
    for service in ("sender", "confirm", "projector", "replies", "hooks", "webhooks"):
        role = ServiceSettings(service_name=service).postgres
        with psycopg.connect(role.conninfo(), autocommit=True) as conn, pytest.raises(
                psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT 1 FROM templates LIMIT 0")


def test_attachments_are_stored_by_the_api_and_only_read_by_the_sender() -> None:
    # Written out, whatever TABLE_RIGHTS says (0017): the API stores bytes and
    # references and prunes them, and may move an expiry but never rewrite a
    # file, its hash or whose reference it is; the sender reads bytes and
    # nothing else; no other service sees either table.
    ingest = ServiceSettings(service_name="ingest").postgres
    sender = ServiceSettings(service_name="sender").postgres
    with psycopg.connect(ingest.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT sha256, size, content FROM attachment_blobs LIMIT 0")
        conn.execute("DELETE FROM attachment_blobs WHERE false")
        conn.execute("UPDATE attachment_refs SET expires_at = now() WHERE false")
        conn.execute("DELETE FROM attachment_refs WHERE false")
        for statement in ("UPDATE attachment_blobs SET content = '' WHERE false",
                          "UPDATE attachment_blobs SET sha256 = '' WHERE false",
                          "UPDATE attachment_refs SET key_id = 'k' WHERE false",
                          "UPDATE attachment_refs SET sha256 = '' WHERE false"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]
    with psycopg.connect(sender.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT sha256, content FROM attachment_blobs LIMIT 0")
        for statement in ("SELECT 1 FROM attachment_refs LIMIT 0",
                          "INSERT INTO attachment_blobs (sha256, size, content)"
                          " SELECT '', 0, '' WHERE false",
                          "DELETE FROM attachment_blobs WHERE false",
                          "UPDATE attachment_blobs SET content = '' WHERE false"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]
    for service in ("confirm", "projector", "replies", "hooks", "webhooks"):
        role = ServiceSettings(service_name=service).postgres
        with psycopg.connect(role.conninfo(), autocommit=True) as conn:
            for table in ("attachment_blobs", "attachment_refs"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 0").format(
                        sql.Identifier(table)))
