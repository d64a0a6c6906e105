"""Prometheus metrics of the webhooks service. Labels are bounded: event types, outcomes."""

from prometheus_client import Counter, Gauge, Histogram

QUEUED = Counter(
    "mailbus_webhooks_deliveries_queued_total",
    "Deliveries queued (one per endpoint and event), by lane kind", ["lane"])
ATTEMPTS = Counter(
    "mailbus_webhooks_attempts_total",
    "Delivery attempts, by outcome (delivered, http_error, error, refused)", ["outcome"])
ATTEMPT_SECONDS = Histogram(
    "mailbus_webhooks_attempt_duration_seconds", "Wall time of one delivery attempt")
EXHAUSTED = Counter(
    "mailbus_webhooks_deliveries_failed_total",
    "Deliveries whose retries ran out without a 2xx")
DISABLED = Counter(
    "mailbus_webhooks_endpoints_disabled_total",
    "Endpoints disabled because they kept failing for the whole retry schedule")
SKIPPED = Counter(
    "mailbus_webhooks_records_skipped_total", "Records that did not decode, skipped")
PENDING = Gauge(
    "mailbus_webhooks_deliveries_pending",
    "Deliveries not settled yet, of enabled endpoints: due now, or waiting out a backoff",
    ["when"])
