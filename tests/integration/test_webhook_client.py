"""One delivery attempt against real HTTP(S) servers on real sockets: the SSRF guard at work.

No Kafka or PostgreSQL here: `client.attempt` is what the dispatcher calls
for every delivery, and these are its refusals and bounds.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailbus.webhook_guard import Policy
from mailbus.webhooks.client import SNIPPET_BYTES, Attempt, Limits, attempt, new_client
from tests.support.receiver import Receiver, https_receiver

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
LOCAL = Policy(allow_http=True, allowed_networks=LOOPBACK)
HEADERS = {"webhook-id": "e1", "webhook-timestamp": "1", "webhook-signature": "v1,x"}


def run(url: str, policy: Policy = LOCAL, limits: Limits | None = None,
        ca_file: str | None = None) -> Attempt:
    async def go() -> Attempt:
        async with new_client(ca_file) as client:
            return await attempt(client, url, policy, limits or Limits(timeout_seconds=5),
                                 HEADERS, b"{}")
    return asyncio.run(go())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    def answer(path: str, n: int) -> tuple[int, dict[str, str], bytes, float]:
        if path == "/redirect":
            return 302, {"Location": "/target"}, b"", 0.0
        if path == "/huge":
            return 200, {}, b"x" * (4 * 1024 * 1024), 0.0
        if path == "/slow":
            return 200, {}, b"late", 3.0
        return 200, {}, b"ok", 0.0

    with Receiver(answer) as r:
        yield r


def test_a_loopback_receiver_is_reached_only_when_the_operator_allows_loopback(
        receiver: Receiver) -> None:
    refused = run(receiver.url("/hook"), Policy(allow_http=True))
    assert refused.status_code is None
    assert refused.error is not None and "refused: address 127.0.0.1 is not public" in refused.error
    assert receiver.on("/hook") == []
    ok = run(receiver.url("/hook"))
    assert (ok.status_code, ok.response, ok.error) == (200, "ok", None)
    assert receiver.on("/hook")[0].headers["webhook-id"] == "e1"


def test_a_name_resolving_to_loopback_is_refused_and_the_checked_address_is_what_is_dialled(
        receiver: Receiver) -> None:
    url = f"http://localhost:{receiver.port}/hook"
    refused = run(url, Policy(allow_http=True))
    assert refused.error is not None and refused.error.startswith("refused: address")
    assert receiver.on("/hook") == []
    # Allowed: the request reaches the address that was checked, and still
    # names the host the URL named.
    assert run(url).status_code == 200
    assert receiver.on("/hook")[0].headers["host"] == f"localhost:{receiver.port}"


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/hook", "http://192.168.1.1/hook", "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/", "http://100.100.100.200/", "http://[::1]:9/",
    "http://0.0.0.0:9/", "http://[::ffff:10.0.0.1]/",
])
def test_private_link_local_and_metadata_addresses_are_never_dialled(url: str) -> None:
    # Refused before any connection: these addresses do not even exist here,
    # so anything but a refusal would be a timeout or a connection error.
    result = run(url, Policy(allow_http=True))
    assert result.status_code is None
    assert result.error is not None and result.error.startswith("refused:"), result.error


def test_plain_http_is_refused_unless_allowed(receiver: Receiver) -> None:
    result = run(receiver.url("/hook"), Policy(allowed_networks=LOOPBACK))
    assert result.error is not None and "must be https" in result.error
    assert receiver.on("/hook") == []


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    result = run(receiver.url("/redirect"))
    assert result.status_code == 302
    assert receiver.on("/target") == []


def test_a_huge_answer_is_cut_at_the_cap(receiver: Receiver) -> None:
    result = run(receiver.url("/huge"), limits=Limits(timeout_seconds=5,
                                                      max_response_bytes=65536))
    assert result.status_code == 200
    assert result.response is not None and len(result.response) == SNIPPET_BYTES


def test_a_slow_endpoint_times_out(receiver: Receiver) -> None:
    result = run(receiver.url("/slow"), limits=Limits(timeout_seconds=0.5))
    assert result.status_code is None
    assert result.error == "timed out after 0.5 s"


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[Receiver, Path]]:
    with https_receiver(tmp_path) as pair:
        yield pair


def test_https_is_verified_against_the_url_host_while_dialling_the_checked_address(
        tls_receiver: tuple[Receiver, Path]) -> None:
    receiver, ca = tls_receiver
    ok = run(f"https://localhost:{receiver.port}/hook", Policy(allowed_networks=LOOPBACK),
             ca_file=str(ca))
    assert (ok.status_code, ok.error) == (200, None)
    assert receiver.on("/hook")[0].headers["host"] == f"localhost:{receiver.port}"
    # The certificate names localhost, not 127.0.0.1: dialling the address
    # does not weaken the check of the name.
    wrong = run(f"https://127.0.0.1:{receiver.port}/hook", Policy(allowed_networks=LOOPBACK),
                ca_file=str(ca))
    assert wrong.status_code is None and wrong.error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in wrong.error or "certificate" in wrong.error.lower()
    # Without the test's CA, the system's CAs do not trust it.
    untrusted = run(f"https://localhost:{receiver.port}/hook", Policy(allowed_networks=LOOPBACK))
    assert untrusted.status_code is None
    assert len(receiver.on("/hook")) == 1


def test_the_name_is_resolved_once_and_the_checked_answer_is_the_one_dialled(
        receiver: Receiver) -> None:
    # DNS is out of reach here, so the resolver is a stand-in for it (the
    # HTTP server is real). `rebind.invalid` cannot be resolved by the
    # system at all: the request arrives only because the client dials the
    # address the guard checked and never resolves the name itself.
    answers = {"first": ["127.0.0.1"], "then": ["169.254.169.254"]}
    asked: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers["first" if len(asked) == 1 else "then"]

    async def go(url: str) -> Attempt:
        async with new_client() as client:
            return await attempt(client, url, LOCAL, Limits(timeout_seconds=5), HEADERS,
                                 b"{}", rebinding)

    url = f"http://rebind.invalid:{receiver.port}/hook"
    first = asyncio.run(go(url))
    assert (first.status_code, first.error) == (200, None)
    assert asked == ["rebind.invalid"]
    assert receiver.on("/hook")[0].headers["host"] == f"rebind.invalid:{receiver.port}"
    # The next attempt resolves again; the new answer is checked, refused,
    # and nothing is dialled.
    second = asyncio.run(go(url))
    assert second.error is not None and "169.254.169.254" in second.error
    assert asked == ["rebind.invalid"] * 2
    assert len(receiver.on("/hook")) == 1
