"""Accepting a validated message: the rules the route and the fast path share.

`POST /v1/messages` is answered by FastAPI's route or, for a plain JSON body,
by fastpath.py below it; both call `one()`, so the two paths cannot drift
apart. The batch route uses `idempotency()` and `plan()` per item.
"""

from __future__ import annotations

import re
from typing import Any

from mailbus.ingest import attachments, metrics
from mailbus.ingest.groupcommit import Member
from mailbus.ingest.handlers import ApiKey, message_id_for, request_digest, require_scope, route
from mailbus.ingest.models import MessageRequest, cross_field_problems
from mailbus.ingest.problems import Problem, invalid
from mailbus.ingest.service import Ingestor, Planned
from mailbus.ingest.templates import TemplateStore, resolved

# The Idempotency-Key header's rule (openapi.py writes the same pattern out).
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def idempotency(value: str | None) -> str | None:
    """The Idempotency-Key header, or a 422 naming it."""
    if value is not None and not IDEMPOTENCY_KEY.match(value):
        raise invalid([{"field": "Idempotency-Key",
                        "message": "must be 1 to 255 printable ASCII characters"}])
    return value


def plan(ing: Ingestor, key: ApiKey, req: MessageRequest, idem: str | None,
         generation: str | None, index: int | None = None, prefix: str = "") -> Planned:
    """Cross-field rules and routing (422 naming the field, under `prefix` in a batch)."""
    errors = [{"field": prefix + f, "message": m} for f, m in cross_field_problems(req)]
    if errors:
        raise invalid(errors)
    try:
        account_id, pool = route(req, key, ing.directory)
    except Problem as exc:
        for err in exc.errors:
            err["field"] = prefix + err["field"]
        raise
    return Planned(req, message_id_for(key.id, idem, index, generation), account_id, pool)


async def one(ing: Ingestor, key: ApiKey, req: MessageRequest,
              idempotency_key: str | None, templates: TemplateStore | None = None
              ) -> tuple[int, dict[str, Any]]:
    """A single message, in this order: the scope (403), the Idempotency-Key (422),
    the claim, its stored template (422), cross-field rules and routing (422), then
    its group's commit."""
    require_scope(key, "send")
    idem = idempotency(idempotency_key)
    # The digest tells a replay from a reuse of an Idempotency-Key: no key, no digest.
    digest = request_digest(req.model_dump(mode="json", by_alias=True)) if idem else b""
    generation = await ing.claim(key, idem, digest) if idem else None
    try:
        # The digest is of the request as sent: "latest" stays "latest" in a replay.
        req = await resolved(templates, key, req)
        planned = plan(ing, key, req, idem, generation)
        if req.attachments:
            # The files are committed before the event is produced (attachments.py).
            refused = (await attachments.store(ing, key, [planned], [""]))[0]
            if refused is not None:
                raise refused
    except Problem:
        metrics.REJECTED.labels("validation").inc()
        raise
    return await ing.accept_one(Member(key, planned, idem, digest, generation))
