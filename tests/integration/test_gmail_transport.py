"""The Gmail API transport, through the real google-api-python-client and google-auth,
against the local Gmail emulator over a real socket. Nothing here may reach Google."""

from __future__ import annotations

import asyncio
import email.policy
import json
import socket
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from googleapiclient.errors import HttpError
from httplib2 import Response

from mailbus.accounts import Account, GmailAccount
from mailbus.errors import ConfigError
from mailbus.gmail import GOOGLE_API_ENDPOINT, GOOGLE_TOKEN_URI, RATE_WAIT, RATE_WAIT_CAP, SCOPES
from mailbus.sender.gmail import GmailTransport, classify_api_error
from mailbus.sender.transport import (
    AccountExhausted,
    Outgoing,
    PermanentError,
    TransientError,
)
from tests.support.gmail_emulator import FakeClock, GmailEmulator

ME, REFRESH, BOSS = "me@example.test", "1//refresh-me", "boss@example.test"
SA_EMAIL = "sender@project.iam.gserviceaccount.test"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
run = asyncio.run


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any name lookup for a host other than loopback fails the test (httplib2 resolves all)."""
    attempts: list[str] = []
    real = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in LOOPBACK:
            attempts.append(str(host))
            raise socket.gaierror(f"test blocked a lookup of {host}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield
    assert attempts == [], f"something tried to reach {attempts}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def emu(clock: FakeClock) -> Iterator[GmailEmulator]:
    with GmailEmulator(now=clock) as emulator:
        yield emulator


def write_token(path: Path, emu: GmailEmulator, token: str, expiry: datetime | None = None,
                scopes: tuple[str, ...] = SCOPES) -> Path:
    info = {"token": token, "refresh_token": REFRESH, "client_id": "client-id",
            "client_secret": "client-secret", "token_uri": emu.token_uri,
            "scopes": list(scopes), "account": "", "universe_domain": "googleapis.com"}
    if expiry:
        info["expiry"] = expiry.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    path.write_text(json.dumps(info))
    return path


def gmail_account(**gmail: Any) -> Account:
    return Account(id="g1", kind="gmail", from_address=ME, gmail=GmailAccount(**gmail))


@pytest.fixture
def connect(emu: GmailEmulator, clock: FakeClock) -> Iterator[Callable[[Account], GmailTransport]]:
    made: list[GmailTransport] = []

    def make(account: Account) -> GmailTransport:
        made.append(GmailTransport.from_account(account, api_endpoint=emu.api_endpoint,
                                                token_uri=emu.token_uri, clock=clock))
        return made[-1]

    yield make
    for transport in made:
        run(transport.close())


@pytest.fixture
def transport_for(emu: GmailEmulator, connect: Callable[[Account], GmailTransport],
                  tmp_path: Path) -> Callable[..., GmailTransport]:
    """A user account with a valid access token; keyword arguments set the user's quotas."""

    def make(**quotas: Any) -> GmailTransport:
        emu.add_user(ME, refresh_token=REFRESH, **quotas)
        path = write_token(tmp_path / "token.json", emu, emu.issue_token(ME),
                           expiry=datetime.now(UTC) + timedelta(hours=1))
        return connect(gmail_account(token_file=path))

    return make


def outgoing(to: str = "you@example.test", bcc: tuple[str, ...] = (),
             message_id: str | None = None) -> Outgoing:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"], msg["To"], msg["Subject"] = ME, to, "Quarterly figures"
    msg["Message-ID"] = message_id or make_msgid(domain="example.test")
    msg.set_content("Hello,\n\nthe figures are attached in spirit.\n")
    recipients = [a.strip() for a in to.split(",") if "@" in a]
    return Outgoing(ME, [*recipients, *bcc], msg.as_bytes(), msg["Message-ID"])


def test_send_hands_over_exactly_the_raw_message_as_me(
        emu: GmailEmulator, transport_for: Callable[..., GmailTransport]) -> None:
    transport, message = transport_for(), outgoing()
    accepted = run(transport.send(message))
    [stored] = emu.messages(ME)
    assert stored.raw == message.raw
    assert emu.sent(ME)[0]["Subject"] == "Quarterly figures"  # "me" was the token's user
    assert "the figures are attached" in stored.message.get_content()
    assert accepted.provider_message_id == stored.id and len(stored.id) == 16
    assert accepted.recipients == ["you@example.test"] and accepted.response is None
    assert emu.log[-1][:2] == ("POST", "/gmail/v1/users/me/messages/send")
    assert emu.requests == {"send": 1}


def test_blind_copies_travel_in_a_bcc_header(
        emu: GmailEmulator, transport_for: Callable[..., GmailTransport]) -> None:
    message = outgoing(bcc=("hidden@example.test",))
    run(transport_for().send(message))
    [stored] = emu.messages(ME)
    assert stored.recipients == ["you@example.test", "hidden@example.test"]
    assert stored.raw == b"Bcc: hidden@example.test\r\n" + message.raw


def test_expired_token_is_refreshed_and_written_back_private(
        emu: GmailEmulator, connect: Callable[[Account], GmailTransport], tmp_path: Path) -> None:
    emu.add_user(ME, refresh_token=REFRESH)
    path = write_token(tmp_path / "token.json", emu, "ya29.stale",
                       expiry=datetime.now(UTC) - timedelta(hours=1))
    path.chmod(0o644)
    run(connect(gmail_account(token_file=path)).send(outgoing()))
    assert emu.requests == {"token": 1, "send": 1}  # refreshed before sending, no 401
    saved = json.loads(path.read_text())
    assert saved["token"].startswith("ya29.emu-") and saved["refresh_token"] == REFRESH
    assert datetime.fromisoformat(saved["expiry"]) > datetime.now(UTC)
    assert saved["universe_domain"] == "googleapis.com"  # other fields kept
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["token.json"]  # no temp file left


def test_token_the_server_no_longer_knows_is_refreshed_after_its_401(
        emu: GmailEmulator, connect: Callable[[Account], GmailTransport], tmp_path: Path) -> None:
    emu.add_user(ME, refresh_token=REFRESH)
    path = write_token(tmp_path / "token.json", emu, "ya29.forgotten",
                       expiry=datetime.now(UTC) + timedelta(hours=1))
    run(connect(gmail_account(token_file=path)).send(outgoing()))
    assert emu.requests == {"send": 2, "token": 1}
    assert json.loads(path.read_text())["token"] != "ya29.forgotten"


def test_revoked_grant_keeps_the_message_for_later(
        emu: GmailEmulator, transport_for: Callable[..., GmailTransport]) -> None:
    transport = transport_for()
    emu.revoke(REFRESH)
    with pytest.raises(TransientError) as caught:
        run(transport.send(outgoing()))
    assert caught.value.code == 401 and "re-authorize" in caught.value.reason
    assert emu.messages(ME) == []


def test_token_without_the_readonly_scope_is_refused_up_front(
        emu: GmailEmulator, tmp_path: Path) -> None:
    path = write_token(tmp_path / "t.json", emu, "x", scopes=(SCOPES[0],))
    with pytest.raises(ConfigError, match=r"gmail\.readonly"):
        GmailTransport.from_account(gmail_account(token_file=path), token_uri=emu.token_uri)


@pytest.fixture(scope="module")
def sa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def sa_file(path: Path, key: rsa.RSAPrivateKey) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "p", "private_key_id": "k1",
        "private_key": pem, "client_email": SA_EMAIL, "client_id": "1",
        "token_uri": GOOGLE_TOKEN_URI}))  # as Google issues it; the transport overrides
    return path


def test_service_account_sends_as_the_delegated_user(
        emu: GmailEmulator, connect: Callable[[Account], GmailTransport], tmp_path: Path,
        sa_key: rsa.RSAPrivateKey) -> None:
    emu.add_user(BOSS)
    emu.add_service_account(SA_EMAIL, sa_key.public_key(), delegates={BOSS})
    account = gmail_account(service_account_file=sa_file(tmp_path / "sa.json", sa_key),
                            delegated_user=BOSS)
    accepted = run(connect(account).send(outgoing()))
    assert [s.id for s in emu.messages(BOSS)] == [accepted.provider_message_id]
    assert emu.requests == {"token": 1, "send": 1}


@pytest.mark.parametrize(("problem", "google_says"), [
    ("not delegated", "unauthorized_client"), ("wrong key", "Invalid JWT Signature")])
def test_service_account_refused_by_google_is_transient(
        problem: str, google_says: str, emu: GmailEmulator,
        connect: Callable[[Account], GmailTransport], tmp_path: Path,
        sa_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey) -> None:
    emu.add_user(BOSS)
    emu.add_user(ME)
    registered = other_key if problem == "wrong key" else sa_key
    emu.add_service_account(SA_EMAIL, registered.public_key(), delegates={ME})
    account = gmail_account(service_account_file=sa_file(tmp_path / "sa.json", sa_key),
                            delegated_user=BOSS)
    with pytest.raises(TransientError, match="re-authorize") as caught:
        run(connect(account).send(outgoing()))
    assert google_says in caught.value.reason
    assert emu.messages(BOSS) == []


def test_sending_faster_than_the_user_rate_parks_the_account_briefly(
        emu: GmailEmulator, transport_for: Callable[..., GmailTransport],
        clock: FakeClock) -> None:
    transport = transport_for()
    run(transport.send(outgoing()))
    run(transport.send(outgoing()))  # 250 units allow a burst of two 100-unit sends
    with pytest.raises(AccountExhausted) as caught:
        run(transport.send(outgoing()))
    assert caught.value.retry_after == pytest.approx(0.2, abs=0.001)
    assert caught.value.until is None and "rate limit" in caught.value.reason
    clock.advance(0.2)
    run(transport.send(outgoing()))
    assert len(emu.messages(ME)) == 3


def test_a_rate_limit_retry_time_hours_away_parks_the_account_a_minute_at_most(
        emu: GmailEmulator, clock: FakeClock, tmp_path: Path) -> None:
    # The server's clock runs two hours ahead of the sender's: its "Retry after" of
    # a fraction of a second reads as two hours here, a skew, not a rate limit's wait.
    emu.add_user(ME, refresh_token=REFRESH)
    path = write_token(tmp_path / "token.json", emu, emu.issue_token(ME),
                       expiry=datetime.now(UTC) + timedelta(hours=1))
    transport = GmailTransport.from_account(
        gmail_account(token_file=path), api_endpoint=emu.api_endpoint,
        token_uri=emu.token_uri, clock=lambda: clock() - timedelta(hours=2))
    try:
        run(transport.send(outgoing()))
        run(transport.send(outgoing()))  # 250 units allow a burst of two 100-unit sends
        with pytest.raises(AccountExhausted) as caught:
            run(transport.send(outgoing()))
    finally:
        run(transport.close())
    assert caught.value.retry_after == RATE_WAIT_CAP
    assert caught.value.until is None and "rate limit" in caught.value.reason


def test_sending_at_the_documented_rate_never_errors(
        emu: GmailEmulator, transport_for: Callable[..., GmailTransport],
        clock: FakeClock) -> None:
    transport = transport_for()
    for _ in range(12):
        run(transport.send(outgoing()))
        clock.advance(0.4)  # 2.5 sends a second, 250 units
    assert len(emu.messages(ME)) == 12


def test_403_user_rate_limit_without_retry_time_waits_the_default(
        transport_for: Callable[..., GmailTransport]) -> None:
    transport = transport_for(units_per_second=100, rate_status=403)
    run(transport.send(outgoing()))
    with pytest.raises(AccountExhausted) as caught:
        run(transport.send(outgoing()))
    assert caught.value.retry_after == RATE_WAIT


def test_daily_limit_parks_the_account_until_the_rolling_window_frees(
        emu: GmailEmulator, transport_for: Callable[..., GmailTransport],
        clock: FakeClock) -> None:
    transport, first = transport_for(daily_limit=5), clock()
    for _ in range(5):
        run(transport.send(outgoing()))
        clock.advance(1)
    with pytest.raises(AccountExhausted) as caught:
        run(transport.send(outgoing()))
    assert not isinstance(caught.value, PermanentError | TransientError)
    assert caught.value.until == first + timedelta(hours=24)
    assert "Mail sending" in caught.value.reason
    clock.now = first + timedelta(hours=24) - timedelta(milliseconds=1)
    with pytest.raises(AccountExhausted):
        run(transport.send(outgoing()))
    clock.now = first + timedelta(hours=24)  # the first send ages out, exactly
    run(transport.send(outgoing()))  # its access token expired meanwhile: refreshed on 401
    clock.advance(0.5)  # clear of the per-second rate: this is about the day
    with pytest.raises(AccountExhausted) as caught:
        run(transport.send(outgoing()))
    assert caught.value.until == first + timedelta(hours=24, seconds=1)
    assert len(emu.messages(ME)) == 6 and emu.requests["token"] == 1


@pytest.mark.parametrize("status", [500, 503])
def test_backend_errors_are_transient(
        status: int, emu: GmailEmulator, transport_for: Callable[..., GmailTransport]) -> None:
    transport = transport_for()
    emu.fail_next(status)
    with pytest.raises(TransientError) as caught:
        run(transport.send(outgoing()))
    assert caught.value.code == status
    run(transport.send(outgoing()))


@pytest.mark.parametrize(("to", "bcc", "text"), [
    ("not an address", (), "Invalid To header"),
    ("", (), "Recipient address required"),
])
def test_messages_gmail_rejects_fail_permanently(
        to: str, bcc: tuple[str, ...], text: str, emu: GmailEmulator,
        transport_for: Callable[..., GmailTransport]) -> None:
    with pytest.raises(PermanentError) as caught:
        run(transport_for().send(outgoing(to=to, bcc=bcc)))
    assert caught.value.code == 400 and text in caught.value.reason
    assert emu.messages(ME) == []


def test_network_down_is_transient(
        emu: GmailEmulator, transport_for: Callable[..., GmailTransport]) -> None:
    transport = transport_for()
    run(transport.send(outgoing()))  # leaves a kept-alive connection behind
    emu.stop()
    with pytest.raises(TransientError, match="unreachable"):
        run(transport.send(outgoing()))


def test_find_sent_by_message_id(
        emu: GmailEmulator, transport_for: Callable[..., GmailTransport]) -> None:
    transport = transport_for()
    message = outgoing(to="a@example.test, b@example.test", bcc=("c@example.test",),
                       message_id="<q3.figures@example.test>")
    accepted = run(transport.send(message))
    found = run(transport.find_sent("<q3.figures@example.test>"))
    assert found is not None and found.provider_message_id == accepted.provider_message_id
    assert sorted(found.recipients) == ["a@example.test", "b@example.test", "c@example.test"]
    assert run(transport.find_sent("<never.sent@example.test>")) is None
    emu.fail_next(500, method="list")
    with pytest.raises(TransientError):  # "cannot tell" must not read as "not sent"
        run(transport.find_sent("<q3.figures@example.test>"))


def test_concurrent_sends_share_one_transport_safely(
        emu: GmailEmulator, transport_for: Callable[..., GmailTransport]) -> None:
    transport = transport_for(units_per_second=100_000)

    async def burst() -> set[str | None]:
        sent = await asyncio.gather(*(transport.send(outgoing()) for _ in range(16)))
        return {a.provider_message_id for a in sent}

    assert len(run(burst())) == 16 == len(emu.messages(ME))
    assert len(transport._https) > 2  # one AuthorizedHttp per worker thread, not shared


def test_every_request_went_to_the_loopback_emulator(
        emu: GmailEmulator, transport_for: Callable[..., GmailTransport]) -> None:
    transport = transport_for()
    assert transport.service._baseUrl == emu.api_endpoint
    assert transport.credentials.token_uri == emu.token_uri
    assert emu.base_url.startswith("http://127.0.0.1:")
    run(transport.send(outgoing()))
    run(transport.find_sent(outgoing().message_id_header))
    assert {host for _, _, host in emu.log} == {emu.base_url.removeprefix("http://")}
    assert sum(emu.requests.values()) == len(emu.log) == 2


def test_defaults_point_at_google_without_contacting_it(
        emu: GmailEmulator, tmp_path: Path) -> None:
    path = write_token(tmp_path / "t.json", emu, "x")  # its token_uri is ignored by google-auth
    transport = GmailTransport.from_account(gmail_account(token_file=path))
    assert transport.service._baseUrl == GOOGLE_API_ENDPOINT
    assert transport.credentials.token_uri == GOOGLE_TOKEN_URI
    run(transport.close())
    with pytest.raises(TransientError, match="closed"):
        run(transport.send(outgoing()))


def google_http_error(status: int, reason: str, message: str) -> HttpError:
    body = {"error": {"code": status, "message": message,
                      "errors": [{"message": message, "domain": "usageLimits",
                                  "reason": reason}]}}
    return HttpError(Response({"status": status}), json.dumps(body).encode())


@pytest.mark.parametrize(("error", "kind"), [
    (google_http_error(403, "rateLimitExceeded", "Quota exceeded for quota metric 'Queries'"
                       " and limit 'Queries per minute per user'"), AccountExhausted),
    (google_http_error(403, "dailyLimitExceeded", "Daily Limit Exceeded"), AccountExhausted),
    (google_http_error(400, "failedPrecondition", "Precondition check failed."), TransientError),
    (google_http_error(403, "insufficientPermissions", "Insufficient Permission"),
     TransientError),
    (google_http_error(413, "uploadTooLarge", "Request Entity Too Large"), PermanentError),
    (HttpError(Response({"status": 502}), b"<html>Bad Gateway</html>"), TransientError),
    (ValueError("surprise"), TransientError),
])
def test_classification_of_other_google_answers(error: Exception, kind: type) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    result = classify_api_error(error, now)
    assert type(result) is kind
    if "Daily" in str(error):
        assert isinstance(result, AccountExhausted) and result.until == now + timedelta(hours=1)


def test_retry_hints_outside_the_message_and_in_the_past() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    error = google_http_error(429, "rateLimitExceeded", "Too many concurrent requests for user")
    error.resp["retry-after"] = "7"
    assert classify_api_error(error, now).retry_after == 7  # type: ignore[attr-defined]
    stale = google_http_error(429, "rateLimitExceeded", "User-rate limit exceeded.  Retry after"
                              " 2029-12-31T23:00:00.000Z (Mail sending)")
    assert classify_api_error(stale, now).until == now + timedelta(minutes=1)  # type: ignore[attr-defined]
