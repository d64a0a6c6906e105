"""`Key`: the API key a request was made with, as a route dependency.

The Gate middleware (`gate.py`) has checked the token before a route runs and
left the key in the request's scope; a route reached without it (a test
client that skips the middleware) authenticates here. Every router of the
API depends on this module, and this module on none of them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mailbus.ingest.gate import STATE_KEY, bearer_token
from mailbus.ingest.handlers import ApiKey

# Declares the Bearer scheme in the OpenAPI document; the Gate has checked the
# token by the time a route runs.
_BEARER = HTTPBearer(auto_error=False, description="mbk_<key id>.<secret>")


async def _key(request: Request,
               _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> ApiKey:
    key = request.scope.get("state", {}).get(STATE_KEY)
    if isinstance(key, ApiKey):
        return key
    ingestor = request.app.state.ingestor
    return await ingestor.authenticate(bearer_token(request.scope["headers"]))  # type: ignore[no-any-return]


Key = Annotated[ApiKey, Depends(_key)]
