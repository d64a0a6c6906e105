"""Deciding what a request becomes: which account sends it, and the event it yields.

Pure functions: no Kafka, no database. The service layer (`service.py`) does
the I/O around them.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mailbus.accounts import Directory, pick_account
from mailbus.ingest.models import Address, MessageRequest
from mailbus.ingest.problems import Problem, invalid

# uuid5 namespace for ids derived from an Idempotency-Key, so a retry that
# reaches Kafka twice (ack lost, commit failed) carries the same message id
# and the sender's ledger sends it once.
IDEMPOTENT_NAMESPACE = uuid.UUID("6f1c1d2e-5b7a-4c1e-9a53-6d61696c6275")
DEFAULT_POOL = "default"


@dataclass(frozen=True)
class ApiKey:
    """An authenticated caller."""

    id: str
    scopes: frozenset[str]
    accounts: frozenset[str] | None  # None: every account
    default_pool: str | None
    rate_limit: str | None = None  # None: the installation's rate

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


def require_scope(key: ApiKey, scope: str) -> None:
    """403 unless the key holds the scope (admin holds every scope)."""
    if scope not in key.scopes and not key.is_admin:
        raise Problem(403, "forbidden", "Forbidden", f"this key lacks the '{scope}' scope")


def route(req: MessageRequest, key: ApiKey, directory: Directory) -> tuple[str, str | None]:
    """(account id, pool or None) for a request; 422 naming `from` when none may send it."""
    target = req.from_ or f"pool:{key.default_pool or DEFAULT_POOL}"
    allowed = key.accounts
    if target.startswith("pool:"):
        pool = target.removeprefix("pool:")
        members = [a for a in directory.pools.get(pool, ()) if allowed is None or a in allowed]
        if not members:
            raise invalid([{"field": "from", "message": f"no account of pool '{pool}' is "
                            "configured that this key may use"}])
        return pick_account(members, req.to[0].email), pool
    if target not in directory.by_id:
        raise invalid([{"field": "from", "message": f"unknown sender account '{target}'"}])
    if allowed is not None and target not in allowed:
        raise invalid([{"field": "from", "message": f"this key may not send from '{target}'"}])
    return target, None


def message_id_for(key_id: str, idempotency_key: str | None, index: int | None = None,
                   generation: str | None = None) -> str:
    """A fresh random id, or one derived from the Idempotency-Key (its generation, the
    batch position): the same use of a key yields the same ids, a use after expiry new ones."""
    if idempotency_key is None:
        return str(uuid.uuid4())
    name = f"{key_id}\0{idempotency_key}" + ("" if index is None else f"\0{index}")
    if generation is not None:
        name += f"\0{generation}"
    return str(uuid.uuid5(IDEMPOTENT_NAMESPACE, name))


def request_digest(payload: Any) -> bytes:
    """SHA-256 of a request body in canonical JSON: equal bodies, equal digests."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).digest()


def _address(addr: Address) -> dict[str, Any]:
    return {"email": addr.email, "name": addr.name}


def requested_event(
    req: MessageRequest, *, message_id: str, account_id: str, pool: str | None,
    key_id: str, idempotency_key: str | None, now: datetime,
) -> dict[str, Any]:
    """The mailbus.EmailRequested record for an accepted request."""
    template = None
    if req.template is not None:
        template = {
            "subject": req.template.subject,
            "text": req.template.text,
            "html": req.template.html,
            "variables_json": json.dumps(req.template.variables, ensure_ascii=False),
            # A stored template (resolved by templates.py): which one, and which version.
            "name": req.template.name,
            "version": req.template.version if isinstance(req.template.version, int) else None,
        }
    return {
        "event_id": str(uuid.uuid4()),
        "message_id": message_id,
        "occurred_at": now,
        "account_id": account_id,
        "pool": pool,
        "key_id": key_id,
        "idempotency_key": idempotency_key,
        "to": [_address(a) for a in req.to],
        "cc": [_address(a) for a in req.cc],
        "bcc": [_address(a) for a in req.bcc],
        "reply_to": _address(req.reply_to) if req.reply_to else None,
        "subject": req.subject,
        "text": req.text,
        "html": req.html,
        "template": template,
        "actions": [{"id": a.id, "label": a.label, "url": a.url} for a in req.actions],
        "tags": list(req.tags),
        "metadata": dict(req.metadata),
        "send_at": req.send_at,
        "requested_at": now,
        "headers": [{"name": n, "value": v} for n, v in req.headers.items()],
        "attachments": [a.record() for a in req.attachments],
    }


def message_row(event: dict[str, Any]) -> dict[str, Any]:
    """The `messages` row for an accepted event."""
    subject = event["subject"] or (event["template"] or {}).get("subject")
    return {
        "id": event["message_id"],
        "key_id": event["key_id"],
        "account_id": event["account_id"],
        "pool": event["pool"],
        "subject": subject,
        "recipients": len(event["to"]) + len(event["cc"]) + len(event["bcc"]),
        "tags": event["tags"],
        "idempotency_key": event["idempotency_key"],
        "send_at": event["send_at"],
        "requested_at": event["requested_at"],
        "attachments": [a["sha256"] for a in event["attachments"]],
    }
