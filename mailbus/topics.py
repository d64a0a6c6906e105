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
# A queued message cancelled or moved through the API (written by the sender's outbox).
SCHEDULE = "email.schedule"


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
# How far ahead a message may be scheduled (`send_at`), in days.
SCHEDULE_HORIZON_DAYS = 30
# email.requested outlives the horizon by a week: a rewind of the topic (an
# offset reset, docs/replay.md) rebuilds the ledger of every message still
# waiting, and the ledger's retention outlives the topic's (the sender's
# MAILBUS_LEDGER_RETENTION_HOURS), so it finds every settled row too.
REQUESTED_RETENTION_MS = (SCHEDULE_HORIZON_DAYS * 24 * 3600 * 1000) + WEEK_MS


@dataclass(frozen=True)
class TopicSpec:
    """A topic as the pipeline needs it to exist."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(REQUESTED, ACCOUNT_PARTITIONS, {"retention.ms": str(REQUESTED_RETENTION_MS)}),
    TopicSpec(REQUESTED_DLQ, 1, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(SENT, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(FAILED, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(DELIVERED, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(BOUNCED, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(RESPONSES, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(CONFIRMED, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
    TopicSpec(SCHEDULE, MESSAGE_PARTITIONS, {"retention.ms": str(MONTH_MS)}),
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


# Least privilege per service: each entry is what the service's code reads,
# writes and joins, and nothing more (tests/integration/test_least_privilege.py
# tries every other topic and group with the service's own credentials).
#
# WRITE on email.suppressions cannot be narrowed to "suppress only": the topic
# is compacted by address hash, so any record a writer puts under a key (an
# `active: false`, a tombstone, even garbage) replaces the suppression there
# once the log is compacted. Hooks and replies only ever write `active: true`
# records; that they cannot lift is a property of their code, not of the
# broker (docs/design.md, Security).
GRANTS: dict[str, Grant] = {
    # Requests, and an admin key's manual suppressions and lifts; it reads
    # nothing back (status and lists come from PostgreSQL).
    "ingest": Grant(write=(REQUESTED, SUPPRESSIONS)),
    # Admits requests (group mailbus-sender) and follows the suppression list
    # by assign() (no group). It also writes email.requested: an exhausted
    # account's pool messages move to another member as a new request keyed
    # by that account. email.delivered for accounts whose server is the final
    # hop. email.schedule: the cancels and reschedules the API put in its
    # outbox (through change_schedule, migration 0018).
    "sender": Grant(
        read=(REQUESTED, SUPPRESSIONS),
        write=(REQUESTED, SENT, FAILED, DELIVERED, REQUESTED_DLQ, SCHEDULE),
        groups=("mailbus-sender",),
    ),
    # The Faust join: sent, delivered, failed and bounced in, verdicts out;
    # its app id is the group, its changelog topics carry the app id.
    "confirm": Grant(
        read=(SENT, FAILED, DELIVERED, BOUNCED),
        write=(CONFIRMED,),
        groups=("mailbus-confirm",),
        owned_prefixes=("mailbus-confirm-",),
    ),
    # Every event into PostgreSQL; it writes nothing to Kafka.
    "projector": Grant(
        read=(REQUESTED, SENT, FAILED, DELIVERED, BOUNCED, RESPONSES, CONFIRMED, SUPPRESSIONS,
              SCHEDULE),
        groups=("mailbus-projector",),
    ),
    # The mailbox reader only produces: replies and complaints, DSNs (a
    # delivery DSN is email.delivered, a failure email.bounced) and the
    # suppressions they cause.
    "replies": Grant(write=(DELIVERED, BOUNCED, RESPONSES, SUPPRESSIONS)),
    # Link clicks and one-click unsubscribes.
    "hooks": Grant(write=(RESPONSES, SUPPRESSIONS)),
    # Outbound webhooks: every outcome of a message, to the endpoints of the
    # key that sent it. It writes nothing to Kafka; a rewind reads by
    # assign(), outside the group.
    "webhooks": Grant(
        read=(SENT, FAILED, DELIVERED, BOUNCED, RESPONSES, CONFIRMED, SCHEDULE),
        groups=("mailbus-webhooks",),
    ),
}

SERVICES: tuple[str, ...] = tuple(GRANTS)

# Topics and groups that some grant named once and none names now: a
# re-provisioning takes back the ACLs services still hold on them.
RETIRED: tuple[str, ...] = ("mailbus-replies",)
