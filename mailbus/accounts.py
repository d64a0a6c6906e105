"""Accounts and pools, from one TOML file: how each sends, which mailbox it reads, and
which account sends a message."""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mailbus.errors import ConfigError

ACCOUNT_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
MAX_ACCOUNTS = 1000


class SmtpAccount(BaseModel):
    """Where and how an SMTP account submits mail."""

    model_config = ConfigDict(extra="forbid")
    host: str
    port: int = 587
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    username: str | None = None
    password_file: Path | None = None
    # CA bundle for a relay with a private certificate; the system's otherwise.
    ca_file: Path | None = None
    # Connections kept open to the server; each carries one transaction at a time,
    # two chained when the server offers PIPELINING.
    connections: int = Field(default=3, ge=1, le=50)
    timeout_seconds: float = Field(default=30.0, gt=0)
    dkim_selector: str | None = None
    dkim_domain: str | None = None
    dkim_key_file: Path | None = None


class ImapAccount(BaseModel):
    """The mailbox the replies service reads for an account, over IMAP."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field(min_length=1)
    port: int = Field(default=993, ge=1, le=65535)
    # implicit: TLS from the first byte (port 993); starttls: upgrade on 143; none: loopback only.
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    # Default: the account's from_address.
    username: str | None = None
    password_file: Path
    # CA bundle for a server with a private certificate; the system's otherwise.
    ca_file: Path | None = None
    mailbox: str = Field(default="INBOX", min_length=1)
    # Move each processed message there. Unset: the mailbox is never altered
    # (it is opened read-only and read with BODY.PEEK, so not even \Seen is set).
    processed_folder: str | None = Field(default=None, min_length=1)
    # Wait for new mail with IDLE when the server offers it; else poll.
    idle: bool = True
    poll_seconds: float = Field(default=60.0, ge=1, le=3600)
    # Messages fetched per round trip.
    batch: int = Field(default=100, ge=1, le=1000)
    timeout_seconds: float = Field(default=30.0, gt=0, le=600)


class GmailAccount(BaseModel):
    """Which Google credentials a Gmail API account uses, and whether its inbox is read."""

    model_config = ConfigDict(extra="forbid")
    token_file: Path | None = None
    service_account_file: Path | None = None
    delegated_user: str | None = None
    # The replies service reads the INBOX through users.history.list; unless
    # processed_label is set it only reads (gmail.readonly suffices).
    read_inbox: bool = False
    # Gmail offers no IDLE to API clients (push needs Cloud Pub/Sub): history is polled.
    poll_seconds: float = Field(default=30.0, ge=1, le=3600)
    # Messages fetched per page of history or of a full sync.
    batch: int = Field(default=100, ge=1, le=500)
    # Add this user label (created when missing) to each message once it was handled;
    # nothing else changes: it stays in INBOX, read state untouched. Needs the
    # gmail.modify scope. Unset: the mailbox is never changed.
    processed_label: str | None = Field(default=None, min_length=1, max_length=225)

    @field_validator("processed_label")
    @classmethod
    def _label_name(cls, name: str | None) -> str | None:
        # Gmail's label names neither begin nor end with blanks.
        if name is not None and name != name.strip():
            raise ValueError("processed_label must not begin or end with a space")
        return name


class Account(BaseModel):
    """One sender account: its identity, its limits and its pools."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=ACCOUNT_ID_PATTERN)
    kind: Literal["smtp", "gmail"]
    from_address: str
    from_name: str | None = None
    # Gmail Workspace allows 2,000 per rolling 24 h, consumer Gmail 500.
    daily_quota: int = Field(default=500, ge=1)
    # Gmail API: about 2.5 sends per second per user.
    rate_per_second: float = Field(default=2.5, gt=0)
    pools: tuple[str, ...] = ("default",)
    # What proves delivery for this account: the accepting SMTP server is the
    # final destination (smtp_final), a delivery status notification (dsn),
    # or the message seen in a verification mailbox (mailbox).
    evidence: Literal["smtp_final", "dsn", "mailbox"] = "dsn"
    # A sent message with no delivery evidence after this long is unconfirmed.
    confirm_within_seconds: int = Field(default=3600, ge=1)
    # Reply-To from_address+<signed tag> when a request names no reply_to, so
    # replies thread even when a client drops In-Reply-To and References. The
    # mailbox must take plus-addressed mail (Gmail and most servers do).
    reply_tags: bool = False
    smtp: SmtpAccount | None = None
    gmail: GmailAccount | None = None
    # The mailbox the replies service reads (DSNs, replies, auto-replies).
    imap: ImapAccount | None = None

    @model_validator(mode="after")
    def _transport_matches_kind(self) -> Account:
        if self.kind == "smtp" and self.smtp is None:
            raise ValueError("an smtp account needs an [accounts.smtp] table")
        if self.kind == "gmail" and self.gmail is None:
            raise ValueError("a gmail account needs an [accounts.gmail] table")
        return self

    @property
    def reads_mailbox(self) -> bool:
        """Whether the replies service reads a mailbox of this account."""
        return self.imap is not None or bool(self.gmail and self.gmail.read_inbox)


class AccountsFile(BaseModel):
    """The accounts file as a whole."""

    model_config = ConfigDict(extra="forbid")
    accounts: list[Account] = Field(default_factory=list, max_length=MAX_ACCOUNTS)

    @model_validator(mode="after")
    def _unique_ids(self) -> AccountsFile:
        seen: set[str] = set()
        for account in self.accounts:
            if account.id in seen:
                raise ValueError(f"account id {account.id!r} appears twice")
            seen.add(account.id)
        return self


class Directory:
    """The configured accounts, by id and by pool."""

    def __init__(self, accounts: Iterable[Account]):
        self.by_id: dict[str, Account] = {a.id: a for a in accounts}
        self.pools: dict[str, tuple[str, ...]] = {}
        for account in self.by_id.values():
            for pool in account.pools:
                self.pools[pool] = (*self.pools.get(pool, ()), account.id)

    def __len__(self) -> int:
        return len(self.by_id)


def load_accounts(path: Path) -> Directory:
    """Read and validate the accounts file; ConfigError says what and where."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"accounts file {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"accounts file {path}: {exc}") from exc
    try:
        parsed = AccountsFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"accounts file {path}: {exc}") from exc
    return Directory(parsed.accounts)


def pick_account(candidates: Sequence[str], recipient: str) -> str:
    """Choose the pool member for a recipient by rendezvous hashing.

    The same recipient lands on the same account while that account stays in
    the pool, so replies thread; adding or removing an account moves only the
    recipients that hashed to it.
    """
    if not candidates:
        raise ValueError("no candidate accounts")
    key = recipient.strip().lower().encode()

    def weight(account_id: str) -> bytes:
        return hashlib.blake2b(account_id.encode() + b"\0" + key, digest_size=8).digest()

    return max(sorted(candidates), key=weight)
