"""A local emulator of Google's Gmail REST API and OAuth token endpoint — for tests only.

Google is not reachable from the test environment, so this stands in for
gmail.googleapis.com and oauth2.googleapis.com on 127.0.0.1. It is not Google:
it keeps the request shapes the real google-api-python-client / google-auth
send, the quota arithmetic and the error bodies, as documented publicly:

* usage limits (developers.google.com/gmail/api/reference/quota): messages.send
  costs 100 units, messages.list/get 5; per-user rate 250 units/s as a moving
  average that allows short bursts (modelled as a token bucket holding 1 s).
  Google now also documents 15,000 units/user/minute; units_per_second covers it.
* over the rate: 429 rateLimitExceeded "User-rate limit exceeded.  Retry after
  <RFC 3339>" as Google sends it (seen in GAM-team issue #337, gmail-tester #23),
  or with rate_status=403 the documented 403 userRateLimitExceeded body
  (developers.google.com/gmail/api/guides/handle-errors).
* sending limits (same guide, "Mail sending limits"): 429 "User-rate limit
  exceeded" "(Mail sending)" with a time to retry, over a rolling 24 h window.
* 400 "Invalid To header" / "Recipient address required" (invalidArgument), 401
  authError, 403 insufficientPermissions, token endpoint invalid_grant: the
  shapes the Google front end returns for every API.
* the mailbox's history (developers.google.com/gmail/api/guides/sync): every
  change raises the user's historyId; users.getProfile reports it,
  users.history.list returns the records after startHistoryId (filtered by
  historyTypes and labelId, paged by maxResults/pageToken) with the current
  historyId, and answers 404 notFound once startHistoryId is older than the
  history kept (expire_history). users.messages.insert puts mail into the
  inbox as delivery would (deliver() does the same without HTTP).
* labels (developers.google.com/gmail/api/reference/rest/v1/users.labels):
  users.labels.list answers the system labels and the user's own; a name
  already taken, ignoring case, is 409 "Label name exists or conflicts" as
  users.labels.create answers it (gauteh/lieer issues #29, #207).
  users.messages.modify adds and removes label ids: 404 notFound for an
  unknown message, 400 "labelId not found" for an unknown label (seen in
  celorodovalho/phpdfbot #24), "Invalid label: SENT" for SENT and DRAFT,
  "No label add or removes specified" for an empty body. A change is one
  labelAdded / labelRemoved history record, never a messageAdded one.
* message size (users.messages.send reference: "Maximum file size: 35MB",
  Accepted Media MIME types message/*): a raw message over MAX_MESSAGE_BYTES
  is refused, 413 with Google's error envelope (the exact text Google sends
  for it is not documented; this one is the emulator's).
Not emulated: uploads (/upload/...), drafts, labels.get/update/delete and
batchModify, threading by References, search operators other than
rfc822msgid:, in:sent, in:inbox, after:/before: (epoch seconds),
recipient-count limits, From rewriting for send-as aliases, label name
rules beyond "not empty", history types messageDeleted.
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import email.utils
import json
import re
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import getaddresses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import SHUT_RDWR
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

AUTH = "https://www.googleapis.com/auth/"
MAX_MESSAGE_BYTES = 35 * 1024 * 1024  # users.messages.send, of the decoded RFC 822 message
SEND_SCOPES = {AUTH + "gmail.send", AUTH + "gmail.compose", AUTH + "gmail.modify",
               "https://mail.google.com/"}
READ_SCOPES = {AUTH + "gmail.readonly", AUTH + "gmail.modify", "https://mail.google.com/"}
INSERT_SCOPES = {AUTH + "gmail.insert", AUTH + "gmail.modify", "https://mail.google.com/"}
MODIFY_SCOPES = {AUTH + "gmail.modify", "https://mail.google.com/"}
LABEL_SCOPES = {AUTH + "gmail.labels"} | MODIFY_SCOPES
SCOPES_NEEDED = {"send": SEND_SCOPES, "insert": INSERT_SCOPES, "modify": MODIFY_SCOPES,
                 "labels.create": LABEL_SCOPES,
                 "labels.list": READ_SCOPES | LABEL_SCOPES | {AUTH + "gmail.metadata"}}
# Quota units per method (developers.google.com/gmail/api/reference/quota).
READ_COSTS = {"get": 5, "list": 5, "history": 2, "profile": 1, "labels.list": 1,
              "labels.create": 5, "modify": 5}
SYSTEM_LABELS = ("CHAT", "SENT", "INBOX", "IMPORTANT", "TRASH", "DRAFT", "SPAM",
                 "CATEGORY_FORUMS", "CATEGORY_UPDATES", "CATEGORY_PERSONAL",
                 "CATEGORY_PROMOTIONS", "CATEGORY_SOCIAL", "STARRED", "UNREAD")
FIXED_LABELS = {"SENT", "DRAFT"}  # modify refuses to add or remove these
# historyTypes values and the record fields they select.
HISTORY_TYPES = {"messageAdded": "messagesAdded", "labelAdded": "labelsAdded",
                 "labelRemoved": "labelsRemoved"}
NOT_FOUND = "Requested entity was not found."
DEFAULT_SCOPES = (AUTH + "gmail.send", AUTH + "gmail.readonly")
WINDOW = timedelta(hours=24)
STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
          404: "NOT_FOUND", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
          503: "UNAVAILABLE"}
FAULTS = {400: ("invalidArgument", "Invalid argument", "global"),
          403: ("dailyLimitExceeded", "Daily Limit Exceeded", "usageLimits"),
          429: ("rateLimitExceeded", "Resource has been exhausted (e.g. check quota).", "global"),
          500: ("backendError", "Backend Error", "global"),
          503: ("backendError", "The service is currently unavailable.", "global")}
BAD_TOKEN = ("Request had invalid authentication credentials. Expected OAuth 2 access token,"
             " login cookie or other valid authentication credential. See"
             " https://developers.google.com/identity/sign-in/web/devconsole-project.")
BAD_JWT = ("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable"
           " timeframe. Check your iat and exp values in the assertion and use a clock with"
           " skew to account for clock differences between systems.")
Reply = tuple[int, dict[str, Any]]  # HTTP status, JSON body


def google_error(code: int, message: str, reason: str, domain: str = "global",
                 status: str | None = None, **where: str) -> dict[str, Any]:
    """Google's JSON error envelope, as every googleapis.com front end returns it."""
    detail = {"message": message, "domain": domain, "reason": reason, **where}
    return {"error": {"code": code, "message": message, "errors": [detail],
                      "status": status or STATUS.get(code, "UNKNOWN")}}


def rfc3339(at: datetime) -> str:
    """Google's timestamp in "Retry after", rounded up to the millisecond (never early)."""
    at = at.astimezone(UTC) + timedelta(microseconds=-at.microsecond % 1000)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


class FakeClock:
    """A clock the test moves by hand; starts at the current time, to the millisecond."""

    def __init__(self, start: datetime | None = None):
        start = start or datetime.now(UTC)
        self.now = start.replace(microsecond=start.microsecond // 1000 * 1000)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 0.0, **delta: float) -> datetime:
        self.now += timedelta(seconds=seconds, **delta)
        return self.now


@dataclass
class Quota:
    """One user's per-second units (token bucket) and rolling 24 h message count."""

    daily_limit: int = 500
    units_per_second: float = 250.0
    sends: deque[datetime] = field(default_factory=deque)
    units: float | None = None  # None: a full bucket
    updated: datetime | None = None

    def take_units(self, cost: float, now: datetime) -> datetime | None:
        """Spend `cost` units now, or return when enough will have accrued (nothing spent)."""
        rate = self.units_per_second
        elapsed = max(0.0, (now - self.updated).total_seconds()) if self.updated else 0.0
        units = rate if self.units is None else min(rate, self.units + elapsed * rate)
        self.units, self.updated = units, now
        if units + 1e-6 < cost:
            return now + timedelta(seconds=(cost - units) / rate)
        self.units = max(0.0, units - cost)
        return None

    def sending_blocked_until(self, now: datetime) -> datetime | None:
        """When the oldest send in the window ages out, if the window is full."""
        while self.sends and self.sends[0] + WINDOW <= now:
            self.sends.popleft()
        return self.sends[0] + WINDOW if len(self.sends) >= self.daily_limit else None


@dataclass
class User:
    email: str
    quota: Quota
    send_cost: int = 100
    read_cost: int = 5
    rate_status: int = 429
    messages: list[Stored] = field(default_factory=list)
    # Gmail's history ids are large, increasing, not contiguous; here +1 per change.
    history_id: int = 100_000
    history: list[dict[str, Any]] = field(default_factory=list)
    history_floor: int = 100_000  # records before this are no longer kept
    labels: dict[str, dict[str, str]] = field(default_factory=dict)  # user labels by id

    def change(self, stored: Stored, kind: str = "messagesAdded",
               label_ids: list[str] | None = None) -> None:
        """A new history record of `kind` for the message, which carries its id."""
        self.history_id += 1
        stored.history_id = self.history_id
        ref = {"id": stored.id, "threadId": stored.thread_id}
        entry: dict[str, Any] = {"message": ref | {"labelIds": list(stored.label_ids)}}
        if label_ids is not None:
            entry["labelIds"] = label_ids
        self.history.append({"id": str(self.history_id), "messages": [ref], kind: [entry]})


@dataclass
class Stored:
    id: str
    thread_id: str
    raw: bytes
    message: EmailMessage
    recipients: list[str]  # from To, Cc and Bcc: Gmail has no separate envelope
    label_ids: list[str] = field(default_factory=lambda: ["SENT"])
    internal_date: datetime = field(default_factory=lambda: datetime.now(UTC))
    history_id: int = 0


@dataclass
class Fault:
    remaining: int
    body: dict[str, Any]


class _Reject(Exception):
    """Ends a request early with this status and Google-shaped body."""

    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(status)
        self.status, self.body = status, body


class GmailEmulator:
    """`with GmailEmulator(now=clock) as emu:` — base_url, token_uri and api_endpoint to use."""

    def __init__(self, *, now: Callable[[], datetime] | None = None, token_lifetime: int = 3600):
        self.now = now or (lambda: datetime.now(UTC))
        self.token_lifetime = token_lifetime
        self.requests: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, path, Host header)
        self._users: dict[str, User] = {}
        self._refresh: dict[str, tuple[str, str, str, frozenset[str]]] = {}
        self._service_accounts: dict[str, tuple[rsa.RSAPublicKey, set[str] | None]] = {}
        self._access: dict[str, tuple[str, frozenset[str], datetime]] = {}
        self._faults: dict[str, deque[Fault]] = {}
        self._lock = threading.RLock()
        self._conns: set[Any] = set()
        handler = type("Handler", (_Handler,), {"emulator": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.token_uri, self.api_endpoint = self.base_url + "/token", self.base_url + "/"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        daemon=True, name="gmail-emulator")

    # -- set-up and introspection, for tests --
    def add_user(self, address: str, *, refresh_token: str | None = None,
                 client_id: str = "client-id", client_secret: str = "client-secret",
                 scopes: tuple[str, ...] = DEFAULT_SCOPES, daily_limit: int = 500,
                 units_per_second: float = 250.0, send_cost: int = 100, read_cost: int = 5,
                 rate_status: int = 429) -> User:
        with self._lock:
            user = User(address, Quota(daily_limit, units_per_second), send_cost, read_cost,
                        rate_status)
            self._users[address.lower()] = user
            if refresh_token:
                self._refresh[refresh_token] = (address, client_id, client_secret,
                                                frozenset(scopes))
            return user

    def add_service_account(self, client_email: str, public_key: rsa.RSAPublicKey, *,
                            delegates: set[str] | None = None) -> None:
        """Domain-wide delegation to `delegates` (None: any registered user)."""
        self._service_accounts[client_email] = (public_key, delegates)

    def issue_token(self, principal: str, scopes: tuple[str, ...] = DEFAULT_SCOPES,
                    lifetime: int | None = None) -> str:
        token = "ya29.emu-" + secrets.token_urlsafe(24)
        expires = self.now() + timedelta(seconds=lifetime or self.token_lifetime)
        with self._lock:
            self._access[token] = (principal, frozenset(scopes), expires)
        return token

    def revoke(self, refresh_token: str) -> None:
        """Revoke a refresh token and every access token of its user, as Google does."""
        with self._lock:
            principal = self._refresh.pop(refresh_token)[0]
            self._access = {k: v for k, v in self._access.items() if v[0] != principal}

    def fail_next(self, status: int, reason: str | None = None, *, count: int = 1,
                  message: str | None = None, method: str = "send") -> None:
        """Make the next `count` authenticated calls of `method` fail with Google's body."""
        default = FAULTS.get(status, ("backendError", "Backend Error", "global"))
        domain = "usageLimits" if "Limit" in (reason or default[0]) else "global"
        body = google_error(status, message or default[1], reason or default[0], domain)
        with self._lock:
            self._faults.setdefault(method, deque()).append(Fault(count, body))

    def deliver(self, user: str, raw: bytes, labels: tuple[str, ...] = ("INBOX", "UNREAD"),
                received: datetime | None = None) -> Stored:
        """Mail arriving in the user's mailbox, as delivery (or users.messages.insert) puts it."""
        with self._lock:
            return self._store(self._users[user.lower()], raw, list(labels),
                               received or self.now())

    def expire_history(self, user: str) -> int:
        """Forget the user's history so far: older startHistoryIds now get 404. Returns it."""
        with self._lock:
            found = self._users[user.lower()]
            found.history.clear()
            found.history_floor = found.history_id
            return found.history_id

    def messages(self, user: str) -> list[Stored]:
        with self._lock:
            return list(self._users[user.lower()].messages)

    def sent(self, user: str) -> list[EmailMessage]:
        return [stored.message for stored in self.messages(user)]

    def labels(self, user: str) -> dict[str, str]:
        """The user's own labels: name -> id."""
        with self._lock:
            return {label["name"]: label_id
                    for label_id, label in self._users[user.lower()].labels.items()}

    def delete_label(self, user: str, label_id: str) -> None:
        """The user deletes one of their labels in Gmail: it leaves every message too."""
        with self._lock:
            found = self._users[user.lower()]
            del found.labels[label_id]
            for stored in found.messages:
                if label_id in stored.label_ids:
                    stored.label_ids = [i for i in stored.label_ids if i != label_id]

    # -- lifecycle --
    def __enter__(self) -> GmailEmulator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop listening and drop kept-alive connections, so clients see the network go."""
        if self._thread.is_alive():
            self._server.shutdown()
        with self._lock:
            for conn in list(self._conns):
                try:
                    conn.shutdown(SHUT_RDWR)
                except OSError:
                    pass
        self._server.server_close()

    # -- request handling --
    def handle(self, method: str, target: str, headers: Any, body: bytes) -> Reply:
        url, now = urlsplit(target), self.now()
        with self._lock:
            self.log.append((method, url.path, headers.get("Host", "")))
            try:
                return self._route(method, url.path, parse_qs(url.query), headers, body, now)
            except _Reject as rejected:
                return rejected.status, rejected.body

    def _route(self, method: str, path: str, query: dict[str, list[str]], headers: Any,
               body: bytes, now: datetime) -> Reply:
        if method == "POST" and path == "/token":
            self.requests["token"] += 1
            return self._token({k: v[0] for k, v in parse_qs(body.decode()).items()})
        match = re.fullmatch(r"/gmail/v1/users/([^/]+)/(messages|history|profile|labels)"
                             r"(?:/([^/]+))?(/modify)?", path)
        name = {("POST", "messages", "send"): "send", ("POST", "messages", None): "insert",
                ("GET", "messages", None): "list", ("GET", "history", None): "history",
                ("GET", "profile", None): "profile", ("GET", "labels", None): "labels.list",
                ("POST", "labels", None): "labels.create"}.get(
            (method, match[2], match[3]) if match and not match[4] else ("", "", ""), "")
        if match and not name and match[2] == "messages" and match[3]:
            name = {("GET", None): "get", ("POST", "/modify"): "modify"}.get(
                (method, match[4]), "")
        if not match or not name:
            raise _Reject(404, google_error(404, "Not Found", "notFound"))
        self.requests[name] += 1
        needed = SCOPES_NEEDED.get(name, READ_SCOPES)
        user = self._authorize(headers.get("Authorization", ""), match[1], needed, now)
        faults = self._faults.get(name)
        if faults:
            fault = faults[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                faults.popleft()
            return fault.body["error"]["code"], fault.body
        cost = user.send_cost if name in ("send", "insert") else \
            user.read_cost * READ_COSTS[name] // 5
        over = user.quota.take_units(cost, now)
        if over and user.rate_status == 403:
            raise _Reject(403, google_error(403, "User Rate Limit Exceeded",
                                            "userRateLimitExceeded", "usageLimits"))
        if over:
            text = f"User-rate limit exceeded.  Retry after {rfc3339(over)}"
            raise _Reject(429, google_error(429, text, "rateLimitExceeded", "usageLimits"))
        if name == "send":
            return self._send(user, body, now)
        if name == "insert":
            return self._insert(user, body, query, now)
        if name == "list":
            return self._list(user, query)
        if name == "history":
            return self._history(user, query)
        if name == "labels.list":
            return self._list_labels(user)
        if name == "labels.create":
            return self._create_label(user, body)
        if name == "modify":
            return self._modify(user, match[3], body)
        if name == "profile":
            return 200, {"emailAddress": user.email, "messagesTotal": len(user.messages),
                         "threadsTotal": len({m.thread_id for m in user.messages}),
                         "historyId": str(user.history_id)}
        return self._get(user, match[3], query)

    def _authorize(self, header: str, user_id: str, needed: set[str], now: datetime) -> User:
        found = self._access.get(header.removeprefix("Bearer ")) if header else None
        if not found or found[2] <= now:
            raise _Reject(401, google_error(401, BAD_TOKEN, "authError", location="Authorization",
                                            locationType="header"))
        principal, scopes, _ = found
        if user_id != "me" and user_id.lower() != principal.lower():
            raise _Reject(403, google_error(403, f"Delegation denied for {principal}", "forbidden"))
        if not scopes & needed:
            raise _Reject(403, google_error(403, "Request had insufficient authentication scopes.",
                                            "insufficientPermissions"))
        user = self._users.get(principal.lower())
        if user is None:  # a service account's own token: it has no mailbox
            raise _Reject(400, google_error(400, "Precondition check failed.",
                                            "failedPrecondition", status="FAILED_PRECONDITION"))
        return user

    def _token(self, form: dict[str, str]) -> Reply:
        grant = form.get("grant_type")
        if grant == "refresh_token":
            found = self._refresh.get(form.get("refresh_token", ""))
            if not found:
                raise _Reject(400, {"error": "invalid_grant",
                                    "error_description": "Token has been expired or revoked."})
            principal, client_id, secret, granted = found
            if (form.get("client_id"), form.get("client_secret")) != (client_id, secret):
                raise _Reject(401, {"error": "invalid_client", "error_description": "Unauthorized"})
            asked = frozenset(form["scope"].split()) if form.get("scope") else granted
            if not asked <= granted:
                raise _Reject(400, {"error": "invalid_scope", "error_description": "Bad Request"})
        elif grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            principal, asked = self._verify_jwt(form.get("assertion", ""))
        else:
            raise _Reject(400, {"error": "unsupported_grant_type",
                                "error_description": f"Invalid grant_type: {grant}"})
        token = self.issue_token(principal, tuple(asked))
        return 200, {"access_token": token, "expires_in": self.token_lifetime,
                     "scope": " ".join(sorted(asked)), "token_type": "Bearer"}

    def _verify_jwt(self, assertion: str) -> tuple[str, frozenset[str]]:
        def invalid(text: str, status: int = 400, error: str = "invalid_grant") -> _Reject:
            return _Reject(status, {"error": error, "error_description": text})

        try:
            head, payload, signature = assertion.split(".")
            claims = json.loads(_unb64(payload))
            key, delegates = self._service_accounts[claims["iss"]]
            key.verify(_unb64(signature), f"{head}.{payload}".encode(), padding.PKCS1v15(),
                       hashes.SHA256())
        except KeyError:
            raise invalid("Invalid grant: account not found") from None
        except (ValueError, InvalidSignature):
            raise invalid("Invalid JWT Signature.") from None
        # google-auth stamps iat/exp from the real clock, so they are checked against it; its
        # audience is Google's token endpoint whatever token_uri the credentials post to.
        iat, exp, wall = claims.get("iat", 0), claims.get("exp", 0), time.time()
        audiences = (self.token_uri, "https://oauth2.googleapis.com/token")
        if claims.get("aud") not in audiences or not iat - 300 <= wall < exp <= iat + 3600:
            raise invalid(BAD_JWT)
        subject, asked = claims.get("sub"), frozenset(claims.get("scope", "").split())
        if subject and subject.lower() not in self._users:
            raise invalid("Invalid email or User ID")
        if subject and delegates is not None and subject.lower() not in delegates:
            raise invalid("Client is unauthorized to retrieve access tokens using this method, or"
                          " client not authorized for any of the scopes requested.", 401,
                          "unauthorized_client")
        return subject or claims["iss"], asked

    def _send(self, user: User, body: bytes, now: datetime) -> Reply:
        def invalid(text: str, reason: str = "invalidArgument") -> _Reject:
            return _Reject(400, google_error(400, text, reason))

        try:
            data = json.loads(body or b"{}")
            encoded = data.get("raw") if isinstance(data, dict) else None
        except ValueError:
            raise invalid("Invalid JSON payload received.", "parseError") from None
        if not isinstance(encoded, str) or not encoded:
            raise invalid("'raw' RFC822 payload message string or uploading message via"
                          " /upload/* URL required")
        try:
            raw = _unb64(encoded)
        except ValueError:  # binascii.Error is a ValueError
            raise invalid("Invalid value at 'message.raw' (TYPE_BYTES), Base64 decoding failed",
                          "invalid") from None
        if len(raw) > MAX_MESSAGE_BYTES:
            raise _Reject(413, google_error(
                413, f"Message too large: {len(raw)} bytes, the limit is {MAX_MESSAGE_BYTES}",
                "uploadTooLarge"))
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        recipients = []
        for header in ("To", "Cc", "Bcc"):
            pairs = [p for p in getaddresses([str(v) for v in message.get_all(header, [])])
                     if any(p)]
            if any("@" not in addr for _, addr in pairs):
                raise invalid(f"Invalid {header} header")
            recipients += [addr for _, addr in pairs]
        if not recipients:
            raise invalid("Recipient address required")
        blocked = user.quota.sending_blocked_until(now)
        if blocked:
            text = f"User-rate limit exceeded.  Retry after {rfc3339(blocked)} (Mail sending)"
            raise _Reject(429, google_error(429, text, "rateLimitExceeded", "usageLimits"))
        stored = self._store(user, raw, ["SENT"], now, data.get("threadId"), message,
                             recipients)
        user.quota.sends.append(now)
        return 200, {"id": stored.id, "threadId": stored.thread_id, "labelIds": ["SENT"]}

    def _store(self, user: User, raw: bytes, labels: list[str], now: datetime,
               thread_id: str | None = None, message: EmailMessage | None = None,
               recipients: list[str] | None = None) -> Stored:
        if message is None:
            parsed = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            message = parsed
        if recipients is None:
            recipients = [a for _, a in getaddresses(
                [str(v) for h in ("To", "Cc", "Bcc") for v in message.get_all(h, [])]) if a]
        message_id = secrets.token_hex(8)
        # No threading by References here.
        stored = Stored(message_id, thread_id or message_id, raw, message, recipients, labels,
                        now)
        user.messages.append(stored)
        user.change(stored)
        return stored

    def _insert(self, user: User, body: bytes, query: dict[str, list[str]],
                now: datetime) -> Reply:
        """users.messages.insert: straight into the mailbox, like delivery, no sending."""
        try:
            data = json.loads(body or b"{}")
            raw = _unb64(data["raw"])
        except (ValueError, KeyError, TypeError):
            raise _Reject(400, google_error(400, "'raw' RFC822 payload message string or"
                                            " uploading message via /upload/* URL required",
                                            "invalidArgument")) from None
        labels = list(data.get("labelIds") or [])
        source = query.get("internalDateSource", ["receivedTime"])[0]
        received = now
        if source == "dateHeader":
            parsed = email.message_from_bytes(raw, policy=email.policy.default)
            with contextlib.suppress(TypeError, ValueError):
                received = email.utils.parsedate_to_datetime(str(parsed["Date"]))
        stored = self._store(user, raw, labels, received, data.get("threadId"))
        return 200, {"id": stored.id, "threadId": stored.thread_id, "labelIds": labels}

    def _history(self, user: User, query: dict[str, list[str]]) -> Reply:
        """users.history.list: what changed after startHistoryId, oldest first."""
        try:
            start = int(query["startHistoryId"][0])
        except (KeyError, ValueError):
            return 400, google_error(400, "Invalid startHistoryId", "invalidArgument")
        if start < user.history_floor:
            return 404, google_error(404, NOT_FOUND, "notFound")
        # Without historyTypes Google returns every type; the filter keeps the named ones.
        kinds = {HISTORY_TYPES.get(t, t) for t in query.get("historyTypes", [])} or \
            set(HISTORY_TYPES.values())
        label = query.get("labelId", [None])[0]
        records = []
        for record in user.history:
            if int(record["id"]) <= start:
                continue
            kept = {kind: [e for e in entries
                           if label is None or label in e["message"]["labelIds"]]
                    for kind, entries in record.items() if kind in kinds}
            if any(kept.values()):
                records.append({"id": record["id"], "messages": record["messages"]}
                               | {k: v for k, v in kept.items() if v})
        offset = int(query.get("pageToken", ["0"])[0])
        size = min(int(query.get("maxResults", ["100"])[0]), 500)
        page = records[offset: offset + size]
        out: dict[str, Any] = {"historyId": str(user.history_id)}
        if page:
            out["history"] = page
        if offset + size < len(records):
            out["nextPageToken"] = str(offset + size)
        return 200, out

    def _list_labels(self, user: User) -> Reply:
        system = [{"id": i, "name": i, "type": "system"} for i in SYSTEM_LABELS]
        return 200, {"labels": system + [label | {"id": i} for i, label in user.labels.items()]}

    def _create_label(self, user: User, body: bytes) -> Reply:
        try:
            data = json.loads(body or b"{}")
            name = data.get("name") if isinstance(data, dict) else None
        except ValueError:
            raise _Reject(400, google_error(400, "Invalid JSON payload received.",
                                            "parseError")) from None
        if not isinstance(name, str) or not name.strip():
            raise _Reject(400, google_error(400, "Invalid label name", "invalidArgument"))
        taken = [*SYSTEM_LABELS, *(label["name"] for label in user.labels.values())]
        if name.lower() in {t.lower() for t in taken}:
            raise _Reject(409, google_error(409, "Label name exists or conflicts", "aborted"))
        label = {"name": name, "type": "user",
                 "messageListVisibility": data.get("messageListVisibility", "show"),
                 "labelListVisibility": data.get("labelListVisibility", "labelShow")}
        label_id = f"Label_{len(user.labels) + 1}"
        user.labels[label_id] = label
        return 200, label | {"id": label_id}

    def _modify(self, user: User, message_id: str, body: bytes) -> Reply:
        """users.messages.modify: one history record per kind of change that happened."""
        stored = next((s for s in user.messages if s.id == message_id), None)
        if stored is None:
            raise _Reject(404, google_error(404, NOT_FOUND, "notFound"))
        try:
            data = json.loads(body or b"{}")
            add, remove = list(data.get("addLabelIds") or []), \
                list(data.get("removeLabelIds") or [])
        except (ValueError, AttributeError, TypeError):
            raise _Reject(400, google_error(400, "Invalid JSON payload received.",
                                            "parseError")) from None
        if not add and not remove:
            raise _Reject(400, google_error(400, "No label add or removes specified",
                                            "invalidArgument"))
        for label_id in add + remove:
            if label_id in FIXED_LABELS:
                raise _Reject(400, google_error(400, f"Invalid label: {label_id}",
                                                "invalidArgument"))
            if label_id not in SYSTEM_LABELS and label_id not in user.labels:
                raise _Reject(400, google_error(400, "labelId not found", "invalidArgument"))
        added = [i for i in dict.fromkeys(add) if i not in stored.label_ids]
        stored.label_ids = [*stored.label_ids, *added]
        if added:
            user.change(stored, "labelsAdded", added)
        removed = [i for i in dict.fromkeys(remove) if i in stored.label_ids]
        stored.label_ids = [i for i in stored.label_ids if i not in removed]
        if removed:
            user.change(stored, "labelsRemoved", removed)
        return 200, {"id": stored.id, "threadId": stored.thread_id,
                     "labelIds": list(stored.label_ids)}

    def _list(self, user: User, query: dict[str, list[str]]) -> Reply:
        found = [s for s in reversed(user.messages)
                 if all(label in s.label_ids for label in query.get("labelIds", []))]
        for term in " ".join(query.get("q", [])).split():
            op, _, value = term.lower().partition(":")
            if op == "rfc822msgid":
                want = value.strip("<>")
                found = [s for s in found
                         if s.message.get("Message-ID", "").strip().strip("<>").lower() == want]
            elif op in ("in", "label") and value in ("sent", "inbox"):
                found = [s for s in found if value.upper() in s.label_ids]
            elif op in ("after", "before") and value.isdigit():
                edge = datetime.fromtimestamp(int(value), UTC)
                found = [s for s in found
                         if (s.internal_date > edge if op == "after" else s.internal_date < edge)]
            else:
                return 400, google_error(400, f"Emulator: unsupported query term {term!r}",
                                         "invalidArgument")
        offset = int(query.get("pageToken", ["0"])[0])
        size = min(int(query.get("maxResults", ["100"])[0]), 500)
        page = found[offset: offset + size]
        listed = [{"id": s.id, "threadId": s.thread_id} for s in page]
        more = {"nextPageToken": str(offset + size)} if offset + size < len(found) else {}
        return 200, ({"messages": listed} if listed else {}) | more | {
            "resultSizeEstimate": len(found)}

    def _get(self, user: User, message_id: str, query: dict[str, list[str]]) -> Reply:
        stored = next((s for s in user.messages if s.id == message_id), None)
        if stored is None:
            return 404, google_error(404, NOT_FOUND, "notFound")
        out: dict[str, Any] = {"id": stored.id, "threadId": stored.thread_id,
                               "labelIds": stored.label_ids, "sizeEstimate": len(stored.raw),
                               "historyId": str(stored.history_id),
                               "internalDate": str(int(stored.internal_date.timestamp() * 1000))}
        form = query.get("format", ["full"])[0]
        self.requests[f"get.{form}"] += 1  # a test can tell a size check from a download
        if form == "minimal":  # as Gmail: ids, labels, size and date, no payload
            return 200, out
        if form == "raw":
            return 200, out | {"raw": base64.urlsafe_b64encode(stored.raw).decode()}
        wanted = {h.lower() for h in query.get("metadataHeaders", [])}
        headers = [{"name": k, "value": str(v)} for k, v in stored.message.items()
                   if form != "metadata" or not wanted or k.lower() in wanted]
        return 200, out | {"payload": {"mimeType": stored.message.get_content_type(),
                                       "headers": headers}}


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httplib2 expects of Google
    emulator: GmailEmulator

    def setup(self) -> None:
        super().setup()
        with self.emulator._lock:
            self.emulator._conns.add(self.connection)

    def finish(self) -> None:
        with self.emulator._lock:
            self.emulator._conns.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, reply = self.emulator.handle(self.command, self.path, self.headers, body)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="https://accounts.google.com/", '
                             'error="invalid_token"')
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _serve
