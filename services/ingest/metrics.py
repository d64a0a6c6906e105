"""Prometheus metrics of the ingest API. Labels are bounded: routes, accounts, reasons."""

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "mailbus_ingest_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "mailbus_ingest_request_duration_seconds", "Time to answer an HTTP request", ["route"]
)
ACCEPTED = Counter(
    "mailbus_ingest_messages_accepted_total", "Messages accepted into email.requested",
    ["account", "pool"],
)
REJECTED = Counter(
    "mailbus_ingest_messages_rejected_total", "Messages refused, by reason", ["reason"]
)
IDEMPOTENT_REPLAYS = Counter(
    "mailbus_ingest_idempotent_replays_total", "Requests answered from a stored Idempotency-Key"
)
PRODUCE_SECONDS = Histogram(
    "mailbus_ingest_produce_duration_seconds",
    "Time from producing a request's events to the broker's acks",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
GROUP_SIZE = Histogram(
    "mailbus_ingest_group_commit_size",
    "Single-message requests accepted or refused together in one transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
