"""`mailbus doctor`'s checks of each account's way out (SMTP, Gmail) and mailbox (IMAP, Gmail).

Each check does what the service would do first (connect, TLS as
configured, log in, open the folder) and reports what worked; a password is
only ever said to be set or accepted, never shown.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import aiosmtplib
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from mailbus.accounts import Account
from mailbus.errors import ConfigError
from mailbus.findings import Finding


def _context(ca_file: Path | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def _password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"password_file {path}: {exc.strerror}") from exc


def reason(exc: BaseException) -> str:
    """An error as one line, without anything but its type and message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


async def _smtp(account: Account) -> Finding:
    cfg = account.smtp
    assert cfg is not None
    where = f"{cfg.host}:{cfg.port}"
    try:
        password = _password(cfg.password_file)
    except ConfigError as exc:
        return Finding("fail", str(exc), "make the password file readable by the sender")
    if cfg.username and password is None:
        return Finding("fail", f"username {cfg.username} but no password_file",
                       "set smtp.password_file")
    client = aiosmtplib.SMTP(hostname=cfg.host, port=cfg.port, timeout=cfg.timeout_seconds,
                             use_tls=cfg.tls == "implicit", start_tls=cfg.tls == "starttls",
                             tls_context=_context(cfg.ca_file))
    try:
        await client.connect()
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        tls = " or the TLS handshake" if cfg.tls != "none" else ""
        return Finding("fail", f"cannot connect to {where}{tls}: {reason(exc)}",
                       "check smtp.host, smtp.port, smtp.tls and smtp.ca_file")
    try:
        steps = [f"connected to {where}",
                 {"implicit": "TLS verified", "starttls": "STARTTLS verified",
                  "none": "no TLS"}[cfg.tls]]
        if cfg.username:
            try:
                await client.login(cfg.username, password or "")
            except aiosmtplib.SMTPAuthenticationError as exc:
                return Finding("fail", f"login as {cfg.username} refused (password set): "
                               f"{exc.code} {' '.join(exc.message.split())}",
                               "check smtp.username and the password in smtp.password_file")
            except aiosmtplib.SMTPException as exc:
                return Finding("fail", f"login as {cfg.username}: {reason(exc)}",
                               "the server offers no AUTH here: check smtp.tls and smtp.port")
            steps.append(f"login as {cfg.username} accepted (password set)")
        else:
            steps.append("no login configured")
        await client.quit()
    except (aiosmtplib.SMTPException, OSError) as exc:
        return Finding("fail", f"{where}: {reason(exc)}", "check the relay's log")
    finally:
        client.close()
    if cfg.tls == "none":
        return Finding("warn", ", ".join(steps), "use tls = \"starttls\" or \"implicit\" "
                       "unless the relay is on this host")
    return Finding("ok", ", ".join(steps))


def smtp_transport(account: Account) -> Finding:
    """Connect, TLS as configured, log in: what the sender does before its first send."""
    return asyncio.run(_smtp(account))


def imap_mailbox(account: Account) -> Finding:
    """Connect, TLS, log in, open the folder, look for IDLE: what the replies service does."""
    cfg = account.imap
    assert cfg is not None
    where, user = f"{cfg.host}:{cfg.port}", cfg.username or account.from_address
    try:
        password = _password(cfg.password_file) or ""
    except ConfigError as exc:
        return Finding("fail", str(exc), "make imap.password_file readable by replies")
    context = _context(cfg.ca_file)
    try:
        client = IMAPClient(cfg.host, port=cfg.port, ssl=cfg.tls == "implicit",
                            ssl_context=context, timeout=cfg.timeout_seconds)
    except (OSError, ssl.SSLError) as exc:
        return Finding("fail", f"cannot connect to {where}: {reason(exc)}",
                       "check imap.host, imap.port, imap.tls and imap.ca_file")
    steps = [f"connected to {where}"]
    try:
        if cfg.tls == "starttls":
            client.starttls(context)
        steps.append({"implicit": "TLS verified", "starttls": "STARTTLS verified",
                      "none": "no TLS"}[cfg.tls])
        try:
            client.login(user, password)
        except LoginError as exc:
            return Finding("fail", f"login as {user} refused (password set): {reason(exc)}",
                           "check imap.username and the password in imap.password_file")
        steps.append(f"login as {user} accepted")
        if not client.folder_exists(cfg.mailbox):
            return Finding("fail", f"{', '.join(steps)}; no folder {cfg.mailbox!r}",
                           "set imap.mailbox to an existing folder")
        client.select_folder(cfg.mailbox, readonly=True)
        steps.append(f"folder {cfg.mailbox} opened")
        idle = b"IDLE" in client.capabilities()
        steps.append("IDLE offered" if idle else "no IDLE")
    except Exception as exc:  # noqa: BLE001 - any protocol or socket failure is the finding
        return Finding("fail", f"{', '.join(steps)}; then {reason(exc)}",
                       "check the IMAP server's log and imap.tls")
    finally:
        try:
            client.logout()
        except Exception:  # noqa: BLE001, S110 - the check is done; the socket goes either way
            pass
    if cfg.idle and not idle:
        return Finding("warn", ", ".join(steps),
                       f"new mail is found by polling every {cfg.poll_seconds:g} s; "
                       "lower imap.poll_seconds for quicker replies")
    if cfg.tls == "none":
        return Finding("warn", ", ".join(steps), "use tls = \"implicit\" or \"starttls\" "
                       "unless the server is on this host")
    return Finding("ok", ", ".join(steps))


def _gmail(account: Account, api_endpoint: str | None, token_uri: str | None) -> Any:
    from mailbus.gmail import GmailClient  # the sender's and the inbox's credential handling

    return GmailClient.from_account(account, api_endpoint=api_endpoint, token_uri=token_uri,
                                    timeout=15.0)


def gmail_account(account: Account, api_endpoint: str | None = None,
                  token_uri: str | None = None) -> tuple[Finding, Finding | None]:
    """Credentials valid with the scopes needed; history readable when the inbox is read."""
    from googleapiclient.errors import HttpError

    try:
        transport = _gmail(account, api_endpoint, token_uri)
    except ConfigError as exc:
        return Finding("fail", str(exc), "create a token with gmail.send and gmail.readonly "
                       "(or fix service_account_file)"), None
    users = transport.service.users()
    try:
        profile = users.getProfile(userId="me").execute()
    except HttpError as exc:
        return Finding("fail", f"Gmail refused the credentials: {reason(exc)}",
                       "renew the token (or the service account's delegation)"), None
    except Exception as exc:  # noqa: BLE001 - google-auth raises RefreshError and others
        return Finding("fail", f"cannot obtain an access token: {reason(exc)}",
                       "renew the token (or the service account's delegation)"), None
    sending = Finding("ok", f"token accepted for {profile.get('emailAddress')}, "
                      "scopes gmail.send and gmail.readonly granted")
    if not (account.gmail and account.gmail.read_inbox):
        return sending, None
    try:
        users.history().list(userId="me", startHistoryId=str(profile["historyId"]),
                             maxResults=1).execute()
    except Exception as exc:  # noqa: BLE001 - HttpError or a transport failure
        return sending, Finding("fail", f"history.list refused: {reason(exc)}",
                                "grant gmail.readonly (gmail.modify with processed_label)")
    return sending, Finding("ok", f"history readable from {profile['historyId']}")
