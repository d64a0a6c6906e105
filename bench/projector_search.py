"""The projector's database write per batch, with and without the search rows.

Runs `project` (services/confirm/projector.py) as the projector role on the
real PostgreSQL: batches of `--batch` events (the projector's default 500),
each message an email.requested (three recipients, one tag, a key) and,
in a later batch, its email.sent, as the pipeline produces them. Decoding
from Avro is left out (the same for both); turning a record into its row
(`event_row`) and, where the code has it, into its search terms
(`findable`) is timed with the write, as `Projector._apply` does both.

Run it with the interpreter of each checkout, one after the other, in the
same session, to compare the code with and without the search rows:

    /work/main/.venv/bin/python bench/projector_search.py --label before
    .venv/bin/python bench/projector_search.py --label after

Prints events/s and the median and p90 time of a batch. Each run writes to
a namespace of its own (`bench-search-<uuid>.`); its rows stay, like the
projector's.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from mailbus.confirm.projector import ProjectorSettings, project
from mailbus.timeline import event_row

try:  # only where the projector writes search rows
    from mailbus.search import findable
except ImportError:
    findable = None  # type: ignore[assignment]

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def records(n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """email.requested and email.sent records of n messages."""
    asked, sent = [], []
    for i in range(n):
        mid, at = str(uuid.uuid4()), T0 + timedelta(milliseconds=i)
        asked.append({
            "event_id": str(uuid.uuid4()), "message_id": mid, "occurred_at": at,
            "account_id": "acct-a", "pool": None, "key_id": f"bench-k{i % 10}",
            "idempotency_key": None, "subject": "bench", "send_at": None,
            "to": [{"email": f"user{i * 7919 % 200_000}@example.com", "name": "User"}],
            "cc": [{"email": "ops@example.com", "name": None}],
            "bcc": [{"email": f"audit{i % 50}@example.org", "name": None}],
            "tags": ["newsletter" if i % 2 else "receipt"], "requested_at": at})
        sent.append({
            "event_id": str(uuid.uuid4()), "message_id": mid,
            "occurred_at": at + timedelta(seconds=1), "account_id": f"acct-{'abcd'[i % 4]}",
            "transport": "smtp", "recipients": ["x"], "provider_message_id": None,
            "rfc822_message_id": None, "smtp_response": "250 2.0.0 Ok", "attempt": 1,
            "requested_at": at, "possible_duplicate": False, "send_latency_us": 1000})
    return asked, sent


def write(conn: psycopg.Connection[Any], namespace: str, schema: str,
          batch: list[dict[str, Any]]) -> float:
    """One batch as the projector writes it; returns its seconds."""
    start = time.perf_counter()
    rows, found = [], {}
    for record in batch:
        row = event_row(schema, record)
        rows.append(row)
        if findable is not None and row.kind == "requested":
            terms = findable(row.message_id, record)
            if terms is not None:
                found[row.event_id] = terms
    if findable is not None:
        project(conn, namespace, rows, None, found)
    else:
        project(conn, namespace, rows)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--label", default="this code")
    args = parser.parse_args()
    namespace = f"bench-search-{uuid.uuid4().hex[:10]}."
    asked, sent = records(args.messages)
    times: list[float] = []
    with psycopg.connect(ProjectorSettings().postgres.conninfo(), autocommit=True) as conn:
        for schema, events in (("mailbus.EmailRequested", asked), ("mailbus.EmailSent", sent)):
            for i in range(0, len(events), args.batch):
                times.append(write(conn, namespace, schema, events[i:i + args.batch]))
    total = 2 * args.messages
    ms = sorted(t * 1000 for t in times)
    print(f"{args.label:<10} search rows {'no ' if findable is None else 'yes':<3}  "
          f"{total / sum(times):>8,.0f} events/s  batch of {args.batch}: median "
          f"{statistics.median(ms):.1f} ms  p90 {ms[int(len(ms) * 0.9)]:.1f} ms  "
          f"({total:,} events, {len(times)} batches)")


if __name__ == "__main__":
    main()
