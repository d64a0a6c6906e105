"""Prometheus metrics of the sender. Labels are bounded: accounts, transports, reasons."""

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
ADMITTED = Counter("mailbus_sender_admitted_total", "email.requested records admitted")


def reason_class(reason: str) -> str:
    """A bounded label for a failure reason (the full text goes to the event)."""
    for prefix in ("suppressed", "template", "compose", "gave up"):
        if reason.startswith(prefix):
            return prefix.replace(" ", "_")
    if reason[:1] in "45" and reason[1:3].isdigit():
        return f"smtp_{reason[0]}xx"
    return "other"
