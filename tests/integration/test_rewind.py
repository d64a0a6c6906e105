"""The projection is a function of the log: rewound, or built from a replay, it is the same."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from mailbus import recording, replay
from mailbus.confirm.projector import PROJECTED
from mailbus.provision import provision
from mailbus.rewind import RewindRefused, rewind_projector
from tests.support import projector as p
from tests.support.kafka import drop_namespace, new_prefix

pytestmark = pytest.mark.integration


def the_log(count: int) -> list[tuple[str, dict[str, Any]]]:
    """A day of a pipeline's events: most confirmed, some failed, bounced, answered."""
    start = datetime(2026, 11, 29, 8, tzinfo=UTC)
    events: list[tuple[str, dict[str, Any]]] = []
    for i in range(count):
        mid, at = str(uuid.uuid4()), start + timedelta(minutes=7 * i)
        account = ("dev", "team-a")[i % 2]
        events += [p.requested(mid, at, account), p.sent(mid, at + timedelta(seconds=1),
                                                         account)]
        if i % 5 == 4:
            events.append(p.failed(mid, at + timedelta(seconds=2), account=account))
            continue
        events += [p.delivered(mid, at + timedelta(seconds=2), account=account),
                   p.confirmed(mid, at + timedelta(seconds=3), account=account)]
        if i % 7 == 0:
            events += [p.bounced(mid, at + timedelta(hours=1)),
                       p.suppression(f"gone{i}@example.com", at + timedelta(hours=1),
                                     reason="hard_bounce", message_id=mid)]
        if i % 3 == 0:
            events.append(p.responded(mid, at + timedelta(minutes=30)))
    return events


def projection(namespace: str) -> tuple[Any, ...]:
    """Every projected row of a namespace, without the wall-clock bookkeeping columns."""
    return (
        p.rows("SELECT event_id, message_id, kind, occurred_at, account_id, detail, counted_day,"
               " counted_account FROM message_events WHERE namespace = %s ORDER BY event_id",
               namespace),
        p.rows("SELECT message_id, account_id, kinds, status FROM message_status"
               " WHERE namespace = %s ORDER BY message_id", namespace),
        p.rows("SELECT day, account_id, requested, sent, delivered, confirmed, failed, bounced,"
               " unconfirmed FROM daily_counts WHERE namespace = %s ORDER BY 1, 2", namespace),
        p.rows("SELECT address_hash, scope, address, reason, active, message_id, occurred_at"
               " FROM suppressions WHERE namespace = %s ORDER BY 1, 2", namespace),
    )


def project_all(namespace: str, admin_kafka: dict[str, Any]) -> None:
    with p.projector_running(p.settings_for(namespace)):
        p.eventually(lambda: _caught_up(admin_kafka, namespace), timeout=90)


def _caught_up(admin_kafka: dict[str, Any], namespace: str) -> None:
    assert p.lag(admin_kafka, namespace) == 0


def test_rewound_and_replayed_projections_equal_the_first(namespace, admin, admin_kafka,
                                                          registry):
    p.produce(admin_kafka, namespace, registry, the_log(40))
    project_all(namespace, admin_kafka)
    first = projection(namespace)
    assert len(first[0]) > 150 and first[3]  # events and suppressions were projected

    conninfo = admin.postgres.conninfo()
    with p.projector_running(p.settings_for(namespace)):
        p.eventually(lambda: _has_member(admin_kafka, namespace), timeout=30)
        with pytest.raises(RewindRefused):
            rewind_projector(admin_kafka, conninfo, namespace)
    assert projection(namespace) == first  # a refused rewind changed nothing

    deleted = rewind_projector(admin_kafka, conninfo, namespace)
    assert deleted["message_events"] == len(first[0])
    assert not any(projection(namespace))
    project_all(namespace, admin_kafka)
    assert projection(namespace) == first

    # The same log replayed into another namespace projects to the same rows.
    other = new_prefix()
    try:
        provision(admin_kafka, admin.var_dir / "secrets", other, users=False)
        replay.run(recording.read_topics(admin_kafka, namespace, PROJECTED, since_ms=0),
                   admin_kafka, other, names=PROJECTED, speed=None)
        project_all(other, admin_kafka)
        assert projection(other) == first
    finally:
        drop_namespace(admin_kafka, other)


def _has_member(admin_kafka: dict[str, Any], namespace: str) -> None:
    from confluent_kafka.admin import AdminClient

    group = namespace + "mailbus-projector"
    client = AdminClient(admin_kafka)  # kept: a collected client never completes its futures
    found = client.describe_consumer_groups([group])[group].result(10)
    assert found.members


def test_rewind_needs_only_the_admin_role_grants(namespace, admin):
    # The CLI's role deletes projection rows and nothing else of the projector's.
    with psycopg.connect(admin.postgres.conninfo()) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO message_events (namespace, event_id, message_id, kind,"
                         " occurred_at) VALUES (%s, gen_random_uuid(), gen_random_uuid(),"
                         " 'sent', now())", (namespace,))
