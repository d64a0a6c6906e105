"""`mailbus verify`: send N messages through the public API and wait for every confirmation.

Only the public HTTP API is used, as any client would: the batch endpoint to
send, the message list to watch statuses, each message's timeline for the
latencies. The run passes when every message is confirmed by the deadline.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

FINAL = {"confirmed", "failed", "bounced"}
BATCH = 500


@dataclass
class Outcome:
    """What a verification run saw."""

    ids: list[str]
    statuses: dict[str, str] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    send_seconds: float = 0.0
    wait_seconds: float = 0.0

    def count(self) -> Counter[str]:
        """Messages per status."""
        return Counter(self.statuses.get(i, "queued") for i in self.ids)

    @property
    def ok(self) -> bool:
        """Every message confirmed."""
        return all(self.statuses.get(i) == "confirmed" for i in self.ids)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max of a sample (empty sample: nothing)."""
    if not values:
        return {}
    if len(values) == 1:
        return {"p50": values[0], "p95": values[0], "p99": values[0], "max": values[0]}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p95": q[94], "p99": q[98], "max": max(values)}


class Verifier:
    """Drives one run against an API base URL with a key holding send and read scopes."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0):
        self.client = httpx.Client(base_url=base_url, timeout=timeout,
                                   headers={"Authorization": f"Bearer {token}"})

    def send(self, count: int, recipients: list[str], run_id: str, sender: str | None
             ) -> list[str]:
        """Post `count` messages in batches; returns their ids in order."""
        ids: list[str] = []
        for start in range(0, count, BATCH):
            messages = []
            for n in range(start, min(count, start + BATCH)):
                message: dict[str, Any] = {
                    "to": [recipients[n % len(recipients)]],
                    "subject": f"mailbus verification {run_id} #{n + 1}",
                    "text": f"Verification message {n + 1} of {count} (run {run_id}).",
                    "tags": ["verify"], "metadata": {"verify_run": run_id},
                }
                if sender:
                    message["from"] = sender
                messages.append(message)
            r = self.client.post("/v1/messages/batch", json={"messages": messages},
                                 headers={"Idempotency-Key": f"verify-{run_id}-{start}"})
            if r.status_code != 202:
                raise RuntimeError(f"the API answered {r.status_code}: {r.text[:500]}")
            body = r.json()
            rejected = [x for x in body["results"] if x["status"] != "queued"]
            if rejected:
                raise RuntimeError(f"the API rejected {len(rejected)}: {rejected[0]}")
            ids += [x["id"] for x in body["results"]]
        return ids

    def statuses(self, since: datetime) -> dict[str, str]:
        """Every message of this key since `since`, walking the list's pages."""
        out: dict[str, str] = {}
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"since": since.isoformat(), "limit": 500}
            if cursor:
                params["cursor"] = cursor
            r = self.client.get("/v1/messages", params=params)
            r.raise_for_status()
            page = r.json()
            out.update({m["id"]: m["status"] for m in page["messages"]})
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    def latency_ms(self, message_id: str) -> float | None:
        """Request-to-confirmation latency from the message's timeline."""
        r = self.client.get(f"/v1/messages/{message_id}")
        if r.status_code != 200:
            return None
        for event in r.json().get("timeline", []):
            us = (event.get("detail") or {}).get("requested_to_delivered_us")
            if event.get("kind") == "confirmed" and us is not None:
                return float(us) / 1000.0
        return None

    def close(self) -> None:
        """Release the HTTP connection pool."""
        self.client.close()


def run(verifier: Verifier, *, count: int, recipients: list[str], deadline: float,
        sender: str | None = None, progress: Any = None, poll: float = 1.0) -> Outcome:
    """Send, then wait until everything is final or the deadline passes."""
    run_id = uuid.uuid4().hex[:8]
    started = datetime.now(UTC)
    t0 = time.monotonic()
    outcome = Outcome(verifier.send(count, recipients, run_id, sender))
    outcome.send_seconds = time.monotonic() - t0
    wanted = set(outcome.ids)
    end = time.monotonic() + deadline
    while True:
        seen = verifier.statuses(started)
        outcome.statuses = {i: s for i, s in seen.items() if i in wanted}
        final = sum(1 for i in outcome.ids if outcome.statuses.get(i) in FINAL)
        if progress is not None:
            progress(final, count)
        if final == count or time.monotonic() > end:
            break
        time.sleep(poll)
    outcome.wait_seconds = time.monotonic() - t0 - outcome.send_seconds
    for message_id in outcome.ids:
        if outcome.statuses.get(message_id) == "confirmed":
            latency = verifier.latency_ms(message_id)
            if latency is not None:
                outcome.latencies_ms.append(latency)
    return outcome
