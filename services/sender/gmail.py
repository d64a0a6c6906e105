"""The Gmail API transport: one account's mail goes out through users.messages.send.

Credentials come from the account's [accounts.gmail] table: either an
authorized-user token file (as google-auth-oauthlib writes it; refreshed
tokens are written back, atomically, mode 600) or a service-account key with
domain-wide delegation to `delegated_user` (default: the account's address).
Scopes: https://www.googleapis.com/auth/gmail.send to send and
https://www.googleapis.com/auth/gmail.readonly for find_sent's search
(gmail.modify or https://mail.google.com/ cover both).

google-api-python-client is synchronous and its httplib2 connections are not
thread-safe, so each call runs in a worker thread with that thread's own
AuthorizedHttp; the service object itself is only a request factory.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import google.auth.exceptions
import httplib2
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account
from google_auth_httplib2 import AuthorizedHttp
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

from mailbus.accounts import Account
from mailbus.errors import ConfigError
from mailbus.logs import Health
from mailbus.sender.transport import (
    Accepted,
    AccountExhausted,
    Ambiguous,
    Outgoing,
    PermanentError,
    SendError,
    TransientError,
)

log = logging.getLogger(__name__)

GOOGLE_API_ENDPOINT = "https://gmail.googleapis.com/"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a secret
AUTH = "https://www.googleapis.com/auth/"
SCOPES = (AUTH + "gmail.send", AUTH + "gmail.readonly")
_COVERS = {AUTH + "gmail.send": {AUTH + "gmail.compose", AUTH + "gmail.modify",
                                 "https://mail.google.com/"},
           AUTH + "gmail.readonly": {AUTH + "gmail.modify", "https://mail.google.com/"}}
# Without a retry time, re-probe a full sending quota hourly rather than parking the
# account for a day: the window is rolling, so room returns as the oldest sends age out.
DAILY_PARK = timedelta(hours=1)
RATE_WAIT = 1.0  # seconds, when a per-user rate error carries no "Retry after"
# A per-user rate limit clears within seconds; a "Retry after" further out than this
# says more about a clock's skew than about the limit, and must not park the account
# (and the pool's failover to it) for hours.
RATE_WAIT_CAP = 60.0
_RETRY_AFTER = re.compile(r"Retry after (\S+)")


class GmailTransport:
    """One Gmail account's way out (the Transport protocol)."""

    def __init__(self, credentials: Any, *, account_id: str,
                 api_endpoint: str = GOOGLE_API_ENDPOINT, token_file: Path | None = None,
                 timeout: float = 30.0, clock: Callable[[], datetime] | None = None):
        self.account_id, self.credentials = account_id, credentials
        self._token_file, self._timeout = token_file, timeout
        self._clock = clock or (lambda: datetime.now(UTC))
        self._saved_token = credentials.token
        self._lock = threading.Lock()
        self._local = threading.local()
        self._https: list[AuthorizedHttp] = []
        self._closed = False
        # Connected (the first call through), failed (why), recovered: one log line each.
        self.health = Health(log, f"account {account_id}: Gmail transport",
                             account=account_id, endpoint=api_endpoint,
                             credentials=type(credentials).__module__.rpartition(".")[2])
        self.service = build("gmail", "v1", http=self._new_http(), static_discovery=True,
                             cache_discovery=False, client_options={"api_endpoint": api_endpoint})

    @classmethod
    def from_account(cls, account: Account, *, api_endpoint: str | None = None,
                     token_uri: str | None = None, **kwargs: Any) -> GmailTransport:
        """Credentials from the account's files; endpoints default to Google's own."""
        gmail = account.gmail
        if gmail is None:
            raise ConfigError(f"account {account.id} has no [accounts.gmail] table")
        endpoint = api_endpoint or GOOGLE_API_ENDPOINT
        if gmail.token_file is not None:
            info = _read_json(gmail.token_file, account.id)
            granted = info.get("scopes") or list(SCOPES)
            granted = granted.split() if isinstance(granted, str) else list(granted)
            missing = [s for s in SCOPES if s not in granted and not _COVERS[s] & set(granted)]
            if missing:
                raise ConfigError(f"account {account.id}: token lacks scopes {missing}")
            try:
                creds = user_credentials.Credentials.from_authorized_user_info(info, granted)
            except ValueError as exc:
                raise ConfigError(f"account {account.id}: {gmail.token_file}: {exc}") from exc
            # google-auth ignores the file's token_uri and always uses Google's (a hardening
            # against token files that send refresh tokens elsewhere); override explicitly.
            # with_token_uri's copy drops the expiry: keep it, or a stale token goes out once.
            expiry, creds = creds.expiry, creds.with_token_uri(token_uri or GOOGLE_TOKEN_URI)
            creds.expiry = expiry
            return cls(creds, account_id=account.id, api_endpoint=endpoint,
                       token_file=gmail.token_file, **kwargs)
        if gmail.service_account_file is not None:
            info = _read_json(gmail.service_account_file, account.id)
            info.setdefault("token_uri", GOOGLE_TOKEN_URI)
            try:
                key = service_account.Credentials.from_service_account_info(info, scopes=SCOPES)
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"account {account.id}: {gmail.service_account_file}: "
                                  f"{exc!r}") from exc
            creds = key.with_subject(gmail.delegated_user or account.from_address)
            if token_uri:
                creds = creds.with_token_uri(token_uri)
            return cls(creds, account_id=account.id, api_endpoint=endpoint, **kwargs)
        raise ConfigError(f"account {account.id}: set token_file or service_account_file")

    async def send(self, message: Outgoing) -> Accepted:
        raw = base64.urlsafe_b64encode(_with_bcc(message)).decode()
        users = self.service.users()
        try:
            result = await self._run(lambda: users.messages().send(userId="me",
                                                                   body={"raw": raw}))
        except TransientError as exc:
            if isinstance(exc.__cause__, (TimeoutError, OSError, httplib2.HttpLib2Error,
                                          google.auth.exceptions.TransportError)):
                # The request may have reached Gmail: the retry looks the message up by
                # its Message-ID first (find_sent) and is flagged if it sends again.
                raise Ambiguous(exc.reason, code=exc.code) from exc
            raise
        return Accepted(recipients=list(message.recipients), response=None,
                        provider_message_id=result.get("id"))

    async def find_sent(self, message_id_header: str) -> Accepted | None:
        """Search the account's sent mail; raises TransientError when Gmail cannot tell."""
        wanted = message_id_header.strip().strip("<>")
        messages = self.service.users().messages()
        found = await self._run(lambda: messages.list(
            userId="me", q=f"rfc822msgid:{wanted} in:sent", maxResults=1))
        if not found.get("messages"):
            return None
        gmail_id = found["messages"][0]["id"]
        meta = await self._run(lambda: messages.get(
            userId="me", id=gmail_id, format="metadata", metadataHeaders=["To", "Cc", "Bcc"]))
        headers = meta.get("payload", {}).get("headers", [])
        return Accepted(recipients=[a for _, a in getaddresses([h["value"] for h in headers])],
                        provider_message_id=gmail_id)

    async def close(self) -> None:
        self._closed = True
        with self._lock:
            https, self._https = self._https, []
        for http in https:
            http.close()

    async def _run(self, make_request: Callable[[], Any]) -> dict[str, Any]:
        """Execute in a worker thread; every failure comes out as a SendError."""
        if self._closed:
            raise TransientError(f"Gmail transport for {self.account_id} is closed")
        try:
            result = await asyncio.to_thread(self._execute, make_request)
        except Exception as exc:  # the scheduler understands SendError only
            error = classify_api_error(exc, self._clock())
            # Credentials refused, Gmail unreachable or failing: the account's way out
            # is down. A message refused or a rate limit says nothing about it.
            if isinstance(error, TransientError):
                self.health.down(error.reason)
            raise error from exc
        if self.health.failing or not self.health.connected:
            self.health.up()
        return result

    def _execute(self, make_request: Callable[[], Any]) -> dict[str, Any]:
        http = getattr(self._local, "http", None)
        if http is None:
            http = self._local.http = self._new_http()
        try:
            return make_request().execute(http=http, num_retries=0)  # type: ignore[no-any-return]
        finally:  # a refresh may have happened even if the call then failed
            self._save_token()

    def _new_http(self) -> AuthorizedHttp:
        http = AuthorizedHttp(self.credentials, http=httplib2.Http(timeout=self._timeout))
        with self._lock:
            self._https.append(http)
        return http

    def _save_token(self) -> None:
        if self._token_file is None:
            return
        with self._lock:
            if self.credentials.token == self._saved_token:
                return
            try:
                _write_token(self._token_file, json.loads(self.credentials.to_json()))
                self._saved_token = self.credentials.token
            except (OSError, ValueError) as exc:
                log.warning("account %s: could not save the refreshed token to %s: %s",
                            self.account_id, self._token_file, exc)


def classify_api_error(exc: BaseException, now: datetime) -> SendError:
    """What a failed Gmail call means for the scheduler."""
    if isinstance(exc, SendError):
        return exc
    if isinstance(exc, google.auth.exceptions.RefreshError):
        # A revoked or expired grant is the account's problem, not the message's: never fail
        # the message, and do not park it as if a quota ran out — retry once re-authorized.
        return TransientError(f"Gmail credentials rejected, re-authorize the account: {exc}",
                              code=401)
    if isinstance(exc, (OSError, httplib2.HttpLib2Error, google.auth.exceptions.TransportError)):
        return TransientError(f"Gmail unreachable: {exc!r}")
    if not isinstance(exc, HttpError):
        return TransientError(f"unexpected Gmail client failure: {exc!r}")
    status, (reasons, message) = exc.status_code, _error_details(exc)
    retry_at = _retry_at(message, exc.resp, now)
    if "(Mail sending)" in message or "dailyLimitExceeded" in reasons \
            or "sending limit" in message.lower():
        # Google's "User-rate limit exceeded ... (Mail sending)": the rolling 24 h quota. A
        # retry time already past (clock skew) must not turn into a tight retry loop.
        until = (retry_at if retry_at > now else now + timedelta(minutes=1)) if retry_at \
            else now + DAILY_PARK
        return AccountExhausted(f"Gmail sending limit: {message}", until=until)
    if status == 429 or reasons & {"rateLimitExceeded", "userRateLimitExceeded"}:
        wait = (retry_at - now).total_seconds() if retry_at else RATE_WAIT
        return AccountExhausted(f"Gmail rate limit: {message}",
                                retry_after=min(max(wait, 0.0), RATE_WAIT_CAP))
    if (status == 400 and "failedPrecondition" not in reasons) or status == 413:
        return PermanentError(f"Gmail refused the message: {message}", code=status)
    # 401 after google-auth's own refresh-and-retry, 403 permissions, 400 failedPrecondition
    # (no mailbox / no delegation), 404, 5xx: nothing wrong with the message.
    return TransientError(f"Gmail error {status}: {message}", code=status)


def _error_details(exc: HttpError) -> tuple[set[str], str]:
    try:
        error = json.loads(exc.content)["error"]
        return {e.get("reason", "") for e in error.get("errors", [])}, str(error["message"])
    except (ValueError, KeyError, TypeError):
        return set(), str(exc.reason)


def _retry_at(message: str, resp: Any, now: datetime) -> datetime | None:
    """Gmail puts the time in the message; other Google front ends use a Retry-After header."""
    match = _RETRY_AFTER.search(message)
    header = resp.get("retry-after") if hasattr(resp, "get") else None
    try:
        if match:
            return datetime.fromisoformat(match[1])
        return now + timedelta(seconds=float(header)) if header else None
    except ValueError:
        return None


def _with_bcc(message: Outgoing) -> bytes:
    """Gmail takes recipients from the To/Cc/Bcc headers only, with no separate envelope.

    Envelope recipients the headers do not name (blind copies) go in a Bcc header, which
    Gmail strips from the copies it delivers.
    """
    headers = BytesHeaderParser(policy=compat32).parsebytes(message.raw)
    named = {a.lower() for _, a in getaddresses(
        [str(v) for h in ("To", "Cc", "Bcc") for v in headers.get_all(h, [])])}
    extra = [r for r in message.recipients if r.lower() not in named]
    if not extra:
        return message.raw
    return b"Bcc: " + ",\r\n ".join(extra).encode() + b"\r\n" + message.raw


def _read_json(path: Path, account_id: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"account {account_id}: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"account {account_id}: {path} is not a JSON object")
    return data


def _write_token(path: Path, fresh: dict[str, Any]) -> None:
    """Update the token fields in place of the file, atomically, readable by the owner only."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update({k: fresh[k] for k in ("token", "refresh_token", "expiry") if fresh.get(k)})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
