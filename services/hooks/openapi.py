"""The hooks service's OpenAPI document: the pages and statuses each link answers.

The service does not serve it (its port faces the internet and publishes
nothing beyond the links); `document(app)` builds it for tests and for
operators. FastAPI infers JSON bodies; every link answers an HTML page (or
the pixel's GIF), so the responses are written out here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from mailbus.tokens import MAX_TOKEN

_HTML = {"text/html": {"schema": {"type": "string"}}}
_RETRY_AFTER = {"Retry-After": {"required": True, "description": "seconds to wait",
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
_PAGES: dict[str, dict[str, Any]] = {
    "200": {"description": "The page", "content": _HTML},
    "303": {"description": "Recorded; on to the URL signed into the link",
            "headers": {"Location": {"required": True, "schema": {"type": "string"}}}},
    "400": {"description": "Not a genuine link of this installation, or not for this route",
            "content": _HTML},
    "404": {"description": "Open tracking is off", "content": _HTML},
    "410": {"description": "The link expired", "content": _HTML},
    "413": {"description": "The body is over the cap", "content": _HTML},
    "429": {"description": "Too many requests from this address", "content": _HTML,
            "headers": _RETRY_AFTER},
    "500": {"description": "A bug; nothing was recorded", "content": _HTML},
    "503": {"description": "Kafka did not take the event; nothing was recorded",
            "content": _HTML, "headers": _RETRY_AFTER},
}
_STATUSES: dict[tuple[str, str], tuple[str, ...]] = {
    ("/a/{token}", "get"): ("200", "400", "410", "429", "500"),
    ("/a/{token}", "post"): ("200", "303", "400", "410", "413", "429", "500", "503"),
    ("/u/{token}", "get"): ("200", "400", "410", "429", "500"),
    ("/u/{token}", "post"): ("200", "400", "410", "413", "429", "500", "503"),
    ("/o/{token}", "get"): ("200", "400", "404", "410", "429", "500", "503"),
}
_HEALTH = {"type": "object", "required": ["status"],
           "properties": {"status": {"enum": ["ok", "unavailable"]}, "kafka": {"type": "boolean"}}}


def complete(doc: dict[str, Any]) -> dict[str, Any]:
    """Replace FastAPI's inferred JSON answers with the pages each route gives."""
    doc.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    doc.get("components", {}).get("schemas", {}).pop("ValidationError", None)
    if not doc.get("components", {}).get("schemas"):
        doc.pop("components", None)
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            statuses = _STATUSES.get((path, method))
            if statuses is not None:
                operation["responses"] = {s: _PAGES[s] for s in statuses}
                if path == "/o/{token}":
                    operation["responses"]["200"] = {
                        "description": "A transparent 1x1 GIF",
                        "content": {"image/gif": {"schema": {"type": "string",
                                                             "format": "binary"}}}}
                for parameter in operation.get("parameters", []):
                    if parameter["name"] == "token":
                        parameter["schema"] = {"type": "string", "minLength": 1,
                                               "maxLength": MAX_TOKEN}
            elif path in ("/healthz", "/readyz"):
                operation["responses"] = {"200": {"description": "Up", "content": {
                    "application/json": {"schema": _HEALTH}}}}
                if path == "/readyz":
                    operation["responses"]["503"] = {
                        "description": "The broker does not answer", "headers": _RETRY_AFTER,
                        "content": {"application/json": {"schema": _HEALTH}}}
    return doc


def document(app: FastAPI) -> dict[str, Any]:
    """The hooks app's OpenAPI document."""
    return complete(get_openapi(title=app.title, version=app.version or "1",
                                description="Signed links in mail: actions, one-click "
                                "unsubscribe (RFC 8058), open pixel.", routes=app.routes))
