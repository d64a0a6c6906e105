"""What each service's PostgreSQL role may do, table by table: the rights the migrations give.

A table not named for a role must refuse it everything. `mailbus doctor`
compares this with what the database says each role has (and prints the
GRANT or REVOKE that fixes a difference); tests/integration/test_least_privilege.py
proves it by trying every statement as every role. A migration that grants
or revokes changes this table in the same commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import sql


@dataclass(frozen=True)
class Rights:
    """A role's rights on one table."""

    select: bool = True
    insert: bool = False
    update: tuple[str, ...] | bool = False  # True: every column
    delete: bool = False


NOTHING = Rights(select=False)

PROJECTOR_ROLE: dict[str, Rights] = {
    "message_events": Rights(insert=True),
    "message_status": Rights(insert=True, update=("account_id", "kinds", "status", "updated_at",
                                                  "key_id", "requested_at")),
    # Recipient, tag and account rows of the search, written as events are
    # projected (0015); never changed afterwards.
    "message_search": Rights(insert=True),
    "daily_counts": Rights(insert=True, update=("requested", "sent", "delivered", "confirmed",
                                                "failed", "bounced", "unconfirmed")),
    "messages": Rights(update=("status", "updated_at")),
    "suppressions": Rights(insert=True, update=("address", "reason", "active", "message_id",
                                                "event_id", "occurred_at", "updated_at")),
}
TABLE_RIGHTS: dict[str, dict[str, Rights]] = {
    "ingest": {
        "api_keys": Rights(),
        "messages": Rights(insert=True),
        # DELETE: expired Idempotency-Key records are pruned (0008).
        "idempotency_keys": Rights(insert=True, update=True, delete=True),
        "message_events": Rights(), "message_status": Rights(), "daily_counts": Rights(),
        "suppressions": Rights(), "inbound_messages": Rights(),
        # Endpoints are managed through the API (0014); it queues test
        # events and replays, reads attempts, and settles nothing.
        "webhook_endpoints": Rights(insert=True, delete=True, update=(
            "url", "event_types", "description", "secret", "previous_secret",
            "previous_secret_until", "enabled", "disabled_reason", "updated_at")),
        "webhook_deliveries": Rights(insert=True),
        "webhook_attempts": Rights(),
        "webhook_replays": Rights(insert=True),
        # GET /v1/messages searches what the projector wrote (0015).
        "message_search": Rights(),
        # Stored templates (0016): versions are written once, read, and
        # deleted with their template; never updated.
        "templates": Rights(insert=True, delete=True),
        # Attachments (0017): stored once by hash, referenced per key; the
        # pruning rounds delete expired references and unreferenced blobs.
        "attachment_blobs": Rights(insert=True, delete=True),
        "attachment_refs": Rights(insert=True, update=("expires_at",), delete=True),
    },
    "sender": {
        # DELETE: settled rows are pruned (0010).
        "send_ledger": Rights(insert=True, update=True, delete=True),
        "sender_outbox": Rights(insert=True, delete=True),
        # Fenced ownership (0013): a take-over inserts or bumps its partition's epoch.
        "sender_partitions": Rights(insert=True, update=True),
        # The bytes of the attachments it sends, by hash (0017).
        "attachment_blobs": Rights(),
    },
    # The Faust join keeps its state in Kafka; it has no business in the database.
    "confirm": {},
    "projector": PROJECTOR_ROLE,
    "replies": {
        "mailbox_state": Rights(insert=True, update=True),
        "inbound_messages": Rights(insert=True),
    },
    # The public hooks service answers from signed links alone.
    "hooks": {},
    # Which key sent a message and whether it still stands (column grants:
    # no subject, no secret hash), endpoints to read and disable, its own
    # deliveries, attempts and replays.
    "webhooks": {
        "messages": Rights(),
        "api_keys": Rights(),
        "webhook_endpoints": Rights(update=("enabled", "disabled_reason", "updated_at")),
        # DELETE: settled deliveries are pruned after their retention.
        "webhook_deliveries": Rights(insert=True, delete=True, update=(
            "state", "attempts", "next_attempt_at", "leased_until", "settled_at")),
        "webhook_attempts": Rights(insert=True),
        "webhook_replays": Rights(update=("state", "queued", "finished_at")),
    },
}
# Functions of the public schema a role may execute.
# ingest: cancel or reschedule a queued message in the sender's ledger (0018),
# without any right on send_ledger or sender_outbox.
FUNCTIONS: dict[str, list[str]] = {"replies": ["replies_sent_to"],
                                   "ingest": ["change_schedule"]}
# Sequences a role may draw from (the outbox's ids, by the sender's inserts alone).
SEQUENCES: dict[str, list[str]] = {"sender": ["sender_outbox_id_seq"]}


@dataclass(frozen=True)
class Seen:
    """What the database says a role may do on one table."""

    columns: tuple[str, ...]
    select: bool
    insert: bool
    delete: bool
    update: tuple[str, ...]  # the columns it may update
    # TRUNCATE, REFERENCES or TRIGGER: no service needs any of them.
    other: bool = False


@dataclass(frozen=True)
class Difference:
    """One right a role has and should not, or lacks and needs."""

    table: str
    right: str  # SELECT, INSERT, DELETE, UPDATE, TRUNCATE/REFERENCES/TRIGGER
    columns: tuple[str, ...] = field(default=())
    missing: bool = True  # False: granted beyond the need

    def __str__(self) -> str:
        cols = f" ({', '.join(self.columns)})" if self.columns else ""
        return f"{self.right}{cols} on {self.table}"


def differences(service: str, seen: dict[str, Seen]) -> list[Difference]:
    """Rights the role lacks, then rights it has beyond its need, table by table."""
    out: list[Difference] = []
    expected = TABLE_RIGHTS[service]
    for table in sorted(expected.keys() - seen.keys()):
        out.append(Difference(table, "table missing"))
    for table, got in sorted(seen.items()):
        want = expected.get(table, NOTHING)
        for right in ("select", "insert", "delete"):
            if getattr(want, right) != getattr(got, right):
                out.append(Difference(table, right.upper(), missing=getattr(want, right)))
        wanted = (set(got.columns) if want.update is True
                  else set(want.update) if want.update else set())
        lacking, extra = wanted - set(got.update), set(got.update) - wanted
        if lacking:
            out.append(Difference(table, "UPDATE", _ordered(lacking, got.columns)))
        if extra:
            out.append(Difference(table, "UPDATE", _ordered(extra, got.columns), missing=False))
        if got.other:
            out.append(Difference(table, "TRUNCATE, REFERENCES, TRIGGER", missing=False))
    return out


def _ordered(names: set[str], columns: tuple[str, ...]) -> tuple[str, ...]:
    """In the table's column order; a column the table lacks (a schema behind) last."""
    return (*(c for c in columns if c in names), *sorted(names - set(columns)))


def fix(difference: Difference, role: str) -> str:
    """The statement (run as the schema owner) that removes the difference."""
    d = difference
    if d.right == "table missing":
        return "run `mailbus setup db` (the migrations create it)"
    cols = sql.SQL(" ({})").format(sql.SQL(", ").join(map(sql.Identifier, d.columns))) \
        if d.columns else sql.SQL("")
    template = "GRANT {right}{cols} ON {table} TO {role}" if d.missing else \
        "REVOKE {right}{cols} ON {table} FROM {role}"
    return sql.SQL(template).format(right=sql.SQL(d.right), cols=cols,
                                    table=sql.Identifier(d.table),
                                    role=sql.Identifier(role)).as_string(None)
