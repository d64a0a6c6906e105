"""Prometheus metrics of the replies service. Labels are bounded: accounts, kinds, classes."""

from prometheus_client import Counter, Gauge

INBOUND = Counter(
    "mailbus_replies_inbound_total",
    "Inbound messages read from a mailbox, by account and what they were classified as",
    ["account", "kind"],
)
RESPONSES = Counter(
    "mailbus_replies_responses_total", "Responses the broker acknowledged, by kind", ["kind"]
)
BOUNCES = Counter(
    "mailbus_replies_bounces_total", "Bounces read from DSNs, by account and class",
    ["account", "type"],
)
UNSUBSCRIBES = Counter(
    "mailbus_replies_unsubscribes_total", "Unsubscribes received by mail, by account",
    ["account"],
)
SUPPRESSED = Counter(
    "mailbus_replies_suppressions_total", "Recipients suppressed, by reason", ["reason"]
)
ERRORS = Counter(
    "mailbus_replies_handler_errors_total",
    "Inbound messages whose handling failed and will be handed over again", ["account"],
)
MAILBOXES = Gauge("mailbus_replies_mailboxes", "Mailboxes being read")
QUARANTINED = Counter(
    "mailbus_replies_quarantined_total",
    "Inbound messages kept as unmatched without being classified, by account and cause"
    " (size: over max_message_bytes; deadline: past classify_deadline_seconds)",
    ["account", "cause"],
)
