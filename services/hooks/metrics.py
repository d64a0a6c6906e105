"""Prometheus metrics of the hooks service. Labels are bounded: routes, kinds, reasons."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "mailbus_hooks_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "mailbus_hooks_request_duration_seconds", "Time to answer an HTTP request", ["route"]
)
RECORDED = Counter(
    "mailbus_hooks_responses_recorded_total", "Responses the broker acknowledged, by kind",
    ["kind"],
)
REFUSED = Counter(
    "mailbus_hooks_tokens_refused_total", "Link tokens refused, by reason", ["reason"]
)
RATE_LIMITED = Counter(
    "mailbus_hooks_rate_limited_total", "Requests refused with 429 by the per-address limit"
)
UNAVAILABLE = Counter(
    "mailbus_hooks_unavailable_total", "Recordings refused with 503 because Kafka did not ack"
)
TRACKED_ADDRESSES = Gauge(
    "mailbus_hooks_rate_limiter_addresses", "Source addresses the rate limiter remembers"
)
