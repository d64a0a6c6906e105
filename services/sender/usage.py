"""What each account used of its quota, read from the sender's ledger.

The ledger is the sender's table; `mailbus accounts list` calls this rather
than querying it itself (docs/design.md, Layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from mailbus import queries

SQL = queries.load_resource(__package__, "usage.sql")


@dataclass(frozen=True)
class Usage:
    """Per account: messages sent in the rolling 24 h, and messages waiting to be sent."""

    sent_last_day: dict[str, int]
    queued: dict[str, int]


def usage(conn: psycopg.Connection, namespace: str) -> Usage:
    """The namespace's per-account counts; accounts with none are absent."""
    params = {"namespace": namespace}
    return Usage(dict(conn.execute(SQL["sent_last_day"], params).fetchall()),
                 dict(conn.execute(SQL["queued"], params).fetchall()))
