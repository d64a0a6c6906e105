"""Prometheus metrics of confirm and the projector. Labels are bounded: accounts, kinds."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)

CONFIRMED = Counter("mailbus_confirm_confirmed_total", "Confirmed verdicts emitted",
                    ["account"])
UNCONFIRMED = Counter("mailbus_confirm_unconfirmed_total",
                      "Unconfirmed verdicts emitted (sent, not delivered in time)", ["account"])
SENT_TO_DELIVERED = Histogram(
    "mailbus_confirm_sent_to_delivered_seconds", "From email.sent to email.delivered",
    buckets=LATENCY_BUCKETS)
REQUESTED_TO_DELIVERED = Histogram(
    "mailbus_confirm_requested_to_delivered_seconds",
    "From the request's acceptance to email.delivered", buckets=LATENCY_BUCKETS)

PROJECTED = Counter("mailbus_projector_events_total", "Events newly written, by kind", ["kind"])
BATCH_ERRORS = Counter("mailbus_projector_batch_errors_total",
                       "Batches PostgreSQL refused (retried)")


def verdicts(records: list[dict[str, Any]]) -> None:
    """Count verdicts once the broker acked them."""
    for record in records:
        account = record.get("account_id") or "unknown"
        if record["outcome"] == "confirmed":
            CONFIRMED.labels(account).inc()
            if record.get("sent_to_delivered_us") is not None:
                SENT_TO_DELIVERED.observe(max(0, record["sent_to_delivered_us"]) / 1e6)
            if record.get("requested_to_delivered_us") is not None:
                REQUESTED_TO_DELIVERED.observe(max(0, record["requested_to_delivered_us"]) / 1e6)
        else:
            UNCONFIRMED.labels(account).inc()
