"""One delivery attempt over HTTP: to the checked address, no redirects, bounded in time and size.

The request goes to the address `webhook_guard.resolve` checked, with the URL's
host in `Host` and, for https, in the TLS server name (SNI) against which the
certificate is verified: the name is never resolved a second time. Each
endpoint has a client of its own, so a pooled connection is reused only for
the same host. Proxies from the environment are ignored (`trust_env=False`):
a proxy would resolve the name itself.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

import httpx

from mailbus.webhook_guard import (
    Policy,
    Refused,
    Resolver,
    Target,
    check_url,
    resolve,
    system_resolver,
)

USER_AGENT = "mailbus-webhooks/1"
# What an attempt keeps of the answer, for GET …/attempts.
SNIPPET_BYTES = 1024


@dataclass(frozen=True)
class Attempt:
    """What one attempt came to."""

    status_code: int | None
    latency_ms: int
    error: str | None
    response: str | None


@dataclass(frozen=True)
class Limits:
    """Bounds of one attempt."""

    timeout_seconds: float = 10.0
    max_response_bytes: int = 65536


def new_client(ca_file: str | None = None) -> httpx.AsyncClient:
    """The HTTP client of one endpoint."""
    verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=ca_file)
                                     if ca_file else True)
    return httpx.AsyncClient(follow_redirects=False, trust_env=False, verify=verify,
                             limits=httpx.Limits(max_connections=1,
                                                 max_keepalive_connections=1))


async def attempt(client: httpx.AsyncClient, url: str, policy: Policy, limits: Limits,
                  headers: dict[str, str], body: bytes,
                  resolver: Resolver = system_resolver) -> Attempt:
    """POST the body to the endpoint once; never raises for the endpoint's faults."""
    start = time.monotonic()

    def took() -> int:
        return int((time.monotonic() - start) * 1000)

    try:
        target = check_url(url, policy)
        address = await resolve(target, policy, resolver)
    except Refused as exc:
        return Attempt(None, took(), f"refused: {exc}", None)
    try:
        status, snippet = await asyncio.wait_for(
            _post(client, target, address, limits, headers, body), limits.timeout_seconds)
    except TimeoutError:
        return Attempt(None, took(), f"timed out after {limits.timeout_seconds:g} s", None)
    except httpx.HTTPError as exc:
        return Attempt(None, took(), f"{type(exc).__name__}: {exc}"[:500], None)
    return Attempt(status, took(), None, snippet)


async def _post(client: httpx.AsyncClient, target: Target, address: str, limits: Limits,
                headers: dict[str, str], body: bytes) -> tuple[int, str]:
    host = f"[{address}]" if ":" in address else address
    url = f"{target.scheme}://{host}:{target.port}{target.path}"
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    request = client.build_request(
        "POST", url, content=body, extensions=extensions,
        headers={**headers, "Host": target.host_header, "Content-Type": "application/json",
                 "User-Agent": USER_AGENT})
    response = await client.send(request, stream=True)
    try:
        kept = bytearray()
        async for chunk in response.aiter_raw():
            kept += chunk
            if len(kept) >= limits.max_response_bytes:
                break  # the rest is never read; the connection is closed
        return response.status_code, bytes(kept[:SNIPPET_BYTES]).decode("utf-8", "replace")
    finally:
        await response.aclose()
