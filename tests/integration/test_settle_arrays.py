"""The settle batch's array literals, read back by PostgreSQL itself."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbus.sender.settle import bytea_array, text_array
from mailbus.settings import ServiceSettings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def conn():
    with psycopg.connect(ServiceSettings(service_name="admin").postgres.conninfo(),
                         autocommit=True) as c:
        yield c


def test_uuids_times_and_nulls_read_back(conn: psycopg.Connection) -> None:
    ids = [str(uuid.uuid4()) for _ in range(5)]
    at = datetime(2026, 11, 30, 7, 1, 2, 345678, tzinfo=UTC)
    row = conn.execute("SELECT %s::uuid[], %s::timestamptz[], %s::text[]",
                       (text_array(ids), text_array([at.isoformat(), None]),
                        text_array(["mbx.email.sent", "NULL"]))).fetchone()
    assert row is not None
    assert [str(u) for u in row[0]] == ids
    assert row[1] == [at, None]
    assert row[2] == ["mbx.email.sent", "NULL"]  # quoted: the word, not SQL NULL


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_any_bytes_read_back(conn: psycopg.Connection, values: list[bytes]) -> None:
    row = conn.execute("SELECT %s::bytea[]", (bytea_array(values),)).fetchone()
    assert row is not None
    assert [bytes(v) for v in row[0]] == values
