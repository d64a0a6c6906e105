"""The topics of the pipeline, their partition counts and configs, and who may use them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

REQUESTED = "email.requested"
REQUESTED_DLQ = "email.requested.dlq"
SENT = "email.sent"
FAILED = "email.failed"
DELIVERED = "email.delivered"
BOUNCED = "email.bounced"
RESPONSES = "email.responses"
CONFIRMED = "email.confirmed"
SUPPRESSIONS = "email.suppressions"



def address_hash(address: str) -> str:
    """The key of email.suppressions: hex SHA-256 of the trimmed, lower-cased address.

    Every producer of suppressions, in any language, must key them this way;
    the sender looks addresses up by it.
    """
    return hashlib.sha256(address.strip().lower().encode()).hexdigest()


# Every per-message topic has the same partition count: the confirm join
# reads them as co-partitioned tables keyed by message id, which only holds
# when the key hashes to the same partition number on every topic.
MESSAGE_PARTITIONS = 6
# email.requested is keyed by sender account; more partitions than accounts
# leaves some idle, fewer makes accounts share a sender instance. 12 lets a
# dozen sender instances share the work.
ACCOUNT_PARTITIONS = 12

WEEK_MS = 7 * 24 * 3600 * 1000
MONTH_MS = 30 * 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    """A topic as the pipeline needs it to exist."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(REQUESTED, ACCOUNT_PARTITIONS, {"retention.ms": str(WEEK_MS)}),
    TopicSpec(REQUESTED_DLQ, 1, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(SENT, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(FAILED, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(DELIVERED, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(BOUNCED, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(RESPONSES, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(CONFIRMED, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    # The suppression list is state, not history: compaction keeps the
    # latest record per address hash forever.
    TopicSpec(SUPPRESSIONS, 3, {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}),
)


@dataclass(frozen=True)
class Grant:
    """What one service principal may do: topics it reads or writes, groups it joins."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    # Topic-name prefixes the principal owns outright (Faust's changelog and
    # repartition topics, which it creates itself).
    owned_prefixes: tuple[str, ...] = ()


# Least privilege per service. Ingest may only append (requests, and manual
# suppressions); nothing it holds lets it read what others wrote.
GRANTS: dict[str, Grant] = {
    # Admin keys may also suppress an address or lift a suppression by hand.
    "ingest": Grant(write=(REQUESTED, SUPPRESSIONS)),
    # The sender also writes email.requested: an exhausted account's pool
    # messages move to another member as a new request keyed by that account.
    "sender": Grant(
        read=(REQUESTED, SUPPRESSIONS, BOUNCED),
        write=(REQUESTED, SENT, FAILED, DELIVERED, REQUESTED_DLQ),
        groups=("mailbus-sender",),
    ),
    "confirm": Grant(
        # The projector (same principal) reads confirmed back into PostgreSQL.
        read=(REQUESTED, SENT, FAILED, DELIVERED, BOUNCED, RESPONSES, SUPPRESSIONS, CONFIRMED),
        write=(CONFIRMED,),
        groups=("mailbus-confirm", "mailbus-projector"),
        owned_prefixes=("mailbus-confirm-",),
    ),
    "replies": Grant(
        write=(DELIVERED, BOUNCED, RESPONSES, SUPPRESSIONS),
        groups=("mailbus-replies",),
    ),
    "hooks": Grant(write=(RESPONSES, SUPPRESSIONS)),
}

SERVICES: tuple[str, ...] = tuple(GRANTS)
