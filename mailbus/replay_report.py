"""How a replay's outcomes compare with the original's, from the two projections.

Both namespaces are projected (the live one by its projector, the replay's by
a projector run in it), and a replayed request keeps its message id, so the
comparison is per message: the status each side reached, and per account
how many messages ended in each status. Only messages the replay holds are
compared: a replay of one hour is not measured against a month.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg

Outcome = tuple[str | None, str]  # (account, status)


@dataclass
class Report:
    """Per-account status counts on each side, and the messages whose outcome differs."""

    original: Counter[tuple[str | None, str]] = field(default_factory=Counter)
    replayed: Counter[tuple[str | None, str]] = field(default_factory=Counter)
    differing: list[tuple[str, Outcome | None, Outcome]] = field(default_factory=list)

    @property
    def same(self) -> bool:
        """Whether every replayed message ended as its original did."""
        return not self.differing


def compare(original: dict[str, Outcome], replayed: dict[str, Outcome]) -> Report:
    """Compare the outcome of each replayed message with the original's (pure)."""
    report = Report()
    for message_id, outcome in sorted(replayed.items()):
        before = original.get(message_id)
        report.replayed[outcome] += 1
        if before is not None:
            report.original[before] += 1
        if before != outcome:
            report.differing.append((message_id, before, outcome))
    return report


def outcomes(conn: psycopg.Connection[Any], namespace: str,
             only: list[str] | None = None) -> dict[str, Outcome]:
    """Account and status of each projected message of a namespace (or of some of them)."""
    if only is None:
        rows = conn.execute("SELECT message_id::text, account_id, status FROM message_status"
                            " WHERE namespace = %s", (namespace,)).fetchall()
    else:
        rows = conn.execute("SELECT message_id::text, account_id, status FROM message_status"
                            " WHERE namespace = %s AND message_id = ANY(%s::uuid[])",
                            (namespace, only)).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def report(conninfo: str, original_ns: str, replay_ns: str) -> Report:
    """Read both projections and compare them."""
    with psycopg.connect(conninfo) as conn:
        replayed = outcomes(conn, replay_ns)
        original = outcomes(conn, original_ns, list(replayed))
    return compare(original, replayed)
