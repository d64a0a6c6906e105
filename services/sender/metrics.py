"""Prometheus metrics and probes of the sender. Labels are bounded: accounts, transports, reasons.

The metrics port (mailbus.runtime.metrics_server) also answers `/healthz`
(the process is up) and `/readyz` (it may send: the suppression list is
loaded and followed, admission runs, every account worker runs), which the
image's HEALTHCHECK calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

SENT = Counter("mailbus_sender_sent_total", "Messages handed over", ["account", "transport"])
FAILED = Counter(
    "mailbus_sender_failed_total", "Messages failed for good", ["account", "reason", "permanent"]
)
RETRIES = Counter("mailbus_sender_retries_total", "Hand-overs to be retried", ["account"])
REROUTED = Counter("mailbus_sender_rerouted_total", "Messages moved to another pool account",
                   ["account"])
DEAD_LETTERED = Counter("mailbus_sender_dead_lettered_total",
                        "Records sent to the dead-letter topic", ["reason"])
QUOTA_USED = Gauge("mailbus_sender_quota_used", "Sends in the last 24 h", ["account"])
QUOTA_LEFT = Gauge("mailbus_sender_quota_left", "Sends left in the rolling 24 h quota",
                   ["account"])
QUOTA_LIMIT = Gauge("mailbus_sender_quota_limit", "The account's 24 h quota", ["account"])
SEND_SECONDS = Histogram(
    "mailbus_sender_send_duration_seconds", "Time to hand one message over", ["transport"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SMTP_CONNECTIONS = Gauge("mailbus_sender_smtp_connections", "Open SMTP connections",
                         ["account"])
ATTACHMENT_FILES = Counter("mailbus_sender_attachment_files_total",
                           "Files read for messages, from the sender's cache or PostgreSQL",
                           ["source"])
SETTLE_ERRORS = Counter("mailbus_sender_settle_errors_total",
                        "Settle transactions that failed and are retried (PostgreSQL)")
SETTLES_FENCED = Counter("mailbus_sender_settles_fenced_total",
                         "Outcomes not settled: the row or its partition is another sender's")
SETTLE_BATCH = Histogram("mailbus_sender_settle_batch_size", "Outcomes per settle transaction",
                         buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500))
SETTLE_SECONDS = Histogram("mailbus_sender_settle_duration_seconds",
                           "Time of one settle transaction",
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5))
ADMITTED = Counter("mailbus_sender_admitted_total", "email.requested records admitted")
ADMISSION_ERRORS = Counter("mailbus_sender_admission_errors_total",
                           "Admission rounds that failed and are retried (PostgreSQL or Kafka)")
SUPPRESSION_READER_RESTARTS = Counter("mailbus_sender_suppression_reader_restarts_total",
                                      "Suppression readers that died and were replaced")
LEDGER_PRUNED = Counter("mailbus_sender_ledger_pruned_total",
                        "Settled ledger rows deleted (rows) or emptied of their request (payloads)",
                        ["what"])
READY = Gauge("mailbus_sender_ready", "1 when the sender may send (see /readyz)")
COMPONENT_UP = Gauge("mailbus_sender_component_up",
                     "1 when a part of the sender runs as it should", ["component"])


# What the periodic summary line counts per account, from the counters above.
HANDLED = ("sent", "failed", "retried")
_HANDLED_FROM = (("sent", SENT), ("failed", FAILED), ("retried", RETRIES))


def handled() -> dict[tuple[str, str], float]:
    """Totals so far per (account, what): sent, failed for good, handed back to retry."""
    out: dict[tuple[str, str], float] = {}
    for what, counter in _HANDLED_FROM:
        for metric in counter.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    key = (sample.labels["account"], what)
                    out[key] = out.get(key, 0.0) + sample.value
    return out


def reason_class(reason: str) -> str:
    """A bounded label for a failure reason (the full text goes to the event)."""
    for prefix in ("suppressed", "template", "compose", "gave up"):
        if reason.startswith(prefix):
            return prefix.replace(" ", "_")
    if reason[:1] in "45" and reason[1:3].isdigit():
        return f"smtp_{reason[0]}xx"
    return "other"


def readiness(suppressions: bool, admission: bool, workers: Iterable[bool]) -> dict[str, Any]:
    """The /readyz body: ready only when every part is."""
    parts = {"suppressions": suppressions, "admission": admission, "workers": all(workers)}
    return {"status": "ok" if all(parts.values()) else "unavailable", **parts}
