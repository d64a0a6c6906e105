"""The OpenAPI document as a client meets the API: every error it may answer, as problem+json.

FastAPI documents what a route returns when all goes well and its own
validation error; the API answers more (the Gate's 401 and 429, 403, 404,
409, 413, 503) and renders every error as RFC 9457 problem+json. This adds
them once, for every `/v1/` operation, with the headers they carry, so the
document can be checked against the running service (tests/integration/
test_schemathesis.py).
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from mailbus.ingest.problems import MEDIA_TYPE

PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {"type": "array", "items": {
            "type": "object", "required": ["field", "message"],
            "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
    },
}
_RETRY_AFTER = {"Retry-After": {"required": True, "description": "seconds to wait",
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
# status -> (description, headers it always carries)
ERRORS: dict[str, tuple[str, dict[str, Any]]] = {
    "401": ("No API key, or not a valid one",
            {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}),
    "403": ("The key lacks the scope this operation needs", {}),
    "404": ("No such message for this key", {}),
    "409": ("The Idempotency-Key was used with another body", {}),
    "413": ("The body is over the cap", {}),
    "422": ("The request breaks a rule; `errors` names each field", {}),
    "429": ("The key's request rate is used up", _RETRY_AFTER),
    "500": ("A bug; details only in the service log", {}),
    "503": ("Kafka or PostgreSQL unavailable; nothing was accepted", _RETRY_AFTER),
}
_EVERY = ("401", "403", "422", "429", "500", "503")
_WITH_ID = ("404",)
_POSTED = ("413",)
_IDEMPOTENT = ("409",)
IDEMPOTENCY_KEY_PATTERN = "^[\\x21-\\x7e]{1,255}$"

_QUEUED = {"type": "object", "required": ["id", "status"],
           "properties": {"id": {"type": "string", "format": "uuid"},
                          "status": {"const": "queued"}}}
_BATCH = {"type": "object", "required": ["accepted", "rejected", "results"],
          "properties": {
              "accepted": {"type": "integer", "minimum": 0},
              "rejected": {"type": "integer", "minimum": 0},
              "results": {"type": "array", "items": {
                  "type": "object", "required": ["index", "status"],
                  "properties": {"index": {"type": "integer"},
                                 "id": {"type": "string", "format": "uuid"},
                                 "status": {"enum": ["queued", "rejected"]},
                                 "error": PROBLEM}}}}}
_SUPPRESSION = {"type": "object", "required": ["address", "scope", "active", "reason"],
                "properties": {"address": {"type": "string"},
                               "scope": {"type": ["string", "null"]},
                               "active": {"type": "boolean"}, "reason": {"const": "manual"}}}
_BY_ID = {"parameters": {"message_id": "$response.body#/id"}}
# What a successful POST answers, beyond FastAPI's empty schema.
SUCCESS: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/messages", "post"): {"description": "Accepted: Kafka holds the event", "content": {
        "application/json": {"schema": _QUEUED}},
        "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
        "links": {"GetMessage": {"operationId": "get_message_v1_messages__message_id__get",
                                 **_BY_ID},
                  "GetResponses": {
                      "operationId": "message_responses_v1_messages__message_id__responses_get",
                      **_BY_ID}}},
    ("/v1/messages/batch", "post"): {
        "description": "At least one item accepted; Kafka holds their events",
        "content": {"application/json": {"schema": _BATCH}}},
    ("/v1/suppressions", "post"): {
        "description": "The change is on the suppressions topic every sender reads",
        "content": {"application/json": {"schema": _SUPPRESSION}}},
}


# Cancelling and rescheduling a queued message (cancel.py): 200 says which
# happened; 409 is too late (`state` says why) or not queued yet (Retry-After).
_CHANGED = {"type": "object", "required": ["id", "result", "status"],
            "properties": {"id": {"type": "string", "format": "uuid"},
                           "result": {"enum": ["cancelled", "already_cancelled",
                                               "rescheduled"]},
                           "status": {"enum": ["cancelled", "queued"]},
                           "send_at": {"type": "string", "format": "date-time"}}}
SCHEDULE_CHANGES: dict[tuple[str, str], str] = {
    ("/v1/messages/{message_id}/cancel", "post"):
        "Cancelled (`result` cancelled, or already_cancelled when it was before)",
    ("/v1/messages/{message_id}/reschedule", "post"):
        "Moved: it waits until `send_at`",
}
_STATE_PROBLEM = {"allOf": [{"$ref": "#/components/schemas/Problem"}, {
    "type": "object", "properties": {"state": {"enum": [
        "sending", "sent", "failed", "cancelled", "partly_sent", "ambiguous", "rerouted"]}}}]}


def _schedule_responses(responses: dict[str, Any], description: str) -> None:
    responses["200"] = {"description": description,
                        "content": {"application/json": {"schema": _CHANGED}}}
    responses["409"] = {
        "description": "Too late: claimed for sending or past it (`state` says which); or "
                       "not queued by the sender yet (type not-queued-yet, with Retry-After)",
        "headers": {"Retry-After": {"required": False, "description": "seconds to wait",
                                    "schema": {"type": "string", "pattern": "^[0-9]+$"}}},
        "content": {MEDIA_TYPE: {"schema": copy.deepcopy(_STATE_PROBLEM)}}}


_MESSAGE = {"to": ["Ada Lovelace <ada@example.com>"], "subject": "Are you coming on Friday?",
            "text": "We meet at six."}
# A request that is accepted, for clients and for the examples schemathesis starts from.
EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/messages", "post"): _MESSAGE,
    ("/v1/messages/batch", "post"): {"messages": [_MESSAGE, {**_MESSAGE, "to": [
        "grace@example.com"]}]},
    ("/v1/suppressions", "post"): {"address": "ada@example.com", "scope": None, "active": True},
    ("/v1/messages/{message_id}/cancel", "post"): {"reason": "the order was withdrawn"},
    ("/v1/messages/{message_id}/reschedule", "post"): {"send_at": "2030-01-01T09:00:00Z"},
    ("/v1/templates", "post"): {"name": "receipt", "subject": "Receipt {{ order }}",
                                "text": "Thank you, {{ customer }}."},
}


def _error(status: str) -> dict[str, Any]:
    description, headers = ERRORS[status]
    response: dict[str, Any] = {"description": description, "content": {
        MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    if headers:
        response["headers"] = copy.deepcopy(headers)
    return response


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """Add the problem responses, success bodies and header rules to a FastAPI document."""
    document.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM
    for schema in ("HTTPValidationError", "ValidationError"):
        document["components"]["schemas"].pop(schema, None)
    for path, operations in document.get("paths", {}).items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            statuses = list(_EVERY)
            if "{message_id}" in path or "{endpoint_id}" in path or "{name}" in path:
                statuses += _WITH_ID
            if method == "post":
                statuses += _POSTED
                if path.startswith("/v1/messages"):
                    statuses += _IDEMPOTENT
            responses = operation.setdefault("responses", {})
            for status in statuses:
                responses[status] = _error(status)
            if (path, method) in EXAMPLES:
                body = operation["requestBody"]["content"]["application/json"]
                body["example"] = copy.deepcopy(EXAMPLES[path, method])
            if (path, method) in SUCCESS:
                responses["202"] = copy.deepcopy(SUCCESS[path, method])
                responses.pop("200", None)
            if (path, method) in SCHEDULE_CHANGES:
                _schedule_responses(responses, SCHEDULE_CHANGES[path, method])
            if path == "/v1/messages/batch":
                # No item accepted: the per-item answers, as with a 202.
                responses["422"]["content"]["application/json"] = {"schema": _BATCH}
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "Idempotency-Key":
                    parameter["schema"] = {"type": "string",
                                           "pattern": IDEMPOTENCY_KEY_PATTERN}
    return document


def install(app: FastAPI) -> None:
    """Serve the completed document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
