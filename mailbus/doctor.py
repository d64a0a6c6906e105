"""`mailbus doctor`: check an installation end to end, one row per thing, each with its fix.

The rows: Kafka and PostgreSQL as each service's principal; the accounts
file; each account's transport and mailbox; SPF, DKIM and DMARC of each From
domain; the link keyring and the hooks base URL. Any failed row makes the
command exit 1. Nothing is sent and no mailbox is changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from rich.console import Console
from rich.table import Table

from mailbus import doctor_infra, doctor_mail, domaincheck
from mailbus.accounts import Account, load_accounts
from mailbus.db import OWNER_ROLE
from mailbus.errors import ConfigError
from mailbus.findings import Check, Finding
from mailbus.settings import ServiceSettings

STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}
# The settings a service itself would build from this environment, by service
# name. The command line, which knows the services, passes it in: the doctor
# is core and imports none of them.
SettingsOf = Callable[[str], ServiceSettings]


@runtime_checkable
class Outbound(Protocol):
    """What the doctor reads of the sender's settings: where links point, the Gmail endpoints."""

    hooks_base_url: str
    link_keys_file: Path | None
    gmail_api_endpoint: str | None
    gmail_token_uri: str | None


def outbound(settings_of: SettingsOf) -> Outbound:
    """The sender's settings, as far as the doctor reads them."""
    sender = settings_of("sender")
    if not isinstance(sender, Outbound):
        raise TypeError(f"{type(sender).__name__} lacks the sender's link and Gmail settings")
    return sender


def owner() -> ServiceSettings:
    """The schema owner's connection, as `mailbus setup db` makes it (its password under var/)."""
    admin = ServiceSettings(service_name="admin")
    admin.postgres = admin.postgres.model_copy(update={
        "user": OWNER_ROLE, "password": None,
        "password_file": admin.var_dir / "secrets" / f"postgres-{OWNER_ROLE}.password"})
    return admin


def infrastructure(services: tuple[str, ...], settings_of: SettingsOf) -> Iterator[Check]:
    """Kafka and PostgreSQL as each service, the schema, the keyring and the hooks URL."""
    for service in services:
        settings = settings_of(service)
        yield Check("kafka", service, doctor_infra.kafka(settings))
        if settings.uses_postgres:
            login = doctor_infra.postgres(settings)
            yield Check("postgres", service, login)
            if login.verdict != "fail":
                yield Check("postgres rights", service, doctor_infra.table_rights(settings))
    yield Check("postgres", "migrations", doctor_infra.migrations(owner()))
    sender = outbound(settings_of)
    yield Check("links", "link keys", doctor_infra.link_keys(sender))
    yield Check("links", "hooks base URL",
                doctor_infra.hooks_url(sender.hooks_base_url))


def accounts(directory: dict[str, Account], *, gmail_api_endpoint: str | None = None,
             gmail_token_uri: str | None = None) -> Iterator[Check]:
    """Each account's way out and, when the replies service reads one, its mailbox."""
    for account in directory.values():
        if account.kind == "smtp":
            yield Check("transport", account.id, doctor_mail.smtp_transport(account))
        else:
            sending, inbox = doctor_mail.gmail_account(account, gmail_api_endpoint,
                                                       gmail_token_uri)
            yield Check("transport", account.id, sending)
            if inbox is not None:
                yield Check("mailbox", account.id, inbox)
        if account.imap is not None:
            yield Check("mailbox", account.id, doctor_mail.imap_mailbox(account))


def domains(directory: dict[str, Account], dns_server: str | None) -> Iterator[Check]:
    """SPF, DKIM and DMARC for each From domain, with the DKIM key each account signs with."""
    res = domaincheck.resolver(dns_server)
    seen: set[tuple[str, str, tuple[object, ...] | None]] = set()
    for account in directory.values():
        domain = account.from_address.rpartition("@")[2].lower()
        smtp = account.smtp
        dkim = ((smtp.dkim_selector, smtp.dkim_domain or domain, smtp.dkim_key_file)
                if smtp is not None and smtp.dkim_selector else None)
        key = (domain, account.kind, dkim)
        if key in seen:
            continue
        seen.add(key)
        signer = f" ({account.id})" if dkim or account.kind == "gmail" else ""
        for what, finding in domaincheck.check_domain(res, domain, account.kind, dkim).items():
            yield Check(what, domain + (signer if what == "DKIM" else ""), finding)


def run(*, services: tuple[str, ...], settings_of: SettingsOf, dns_server: str | None,
        check_infra: bool = True) -> list[Check]:
    """Every check, in the order the table shows them."""
    checks: list[Check] = list(infrastructure(services, settings_of)) if check_infra else []
    admin = ServiceSettings(service_name="admin")
    assert admin.accounts_file is not None
    try:
        directory = load_accounts(admin.accounts_file).by_id
    except ConfigError as exc:
        checks.append(Check("accounts", str(admin.accounts_file),
                            Finding("fail", str(exc), "fix the file (docs/configuration.md)")))
        return checks
    checks.append(Check("accounts", str(admin.accounts_file),
                        Finding("ok", f"{len(directory)} account(s)")))
    sender = outbound(settings_of)
    checks += accounts(directory, gmail_api_endpoint=sender.gmail_api_endpoint,
                       gmail_token_uri=sender.gmail_token_uri)
    checks += domains(directory, dns_server)
    return checks


def render(checks: list[Check], console: Console) -> bool:
    """Print the table and the verdict; True when nothing failed."""
    table = Table("area", "subject", "verdict", "detail", "fix", show_lines=False)
    for c in checks:
        v = c.finding.verdict
        table.add_row(c.area, c.subject, f"[{STYLE[v]}]{v}[/{STYLE[v]}]", c.finding.detail,
                      c.finding.fix)
    console.print(table)
    failed = [c for c in checks if c.failed]
    warned = sum(c.finding.verdict == "warn" for c in checks)
    if failed:
        console.print(f"[red]FAIL: {len(failed)} of {len(checks)} checks failed"
                      f" ({warned} warning(s))[/red]")
        return False
    console.print(f"[green]OK: {len(checks)} checks passed ({warned} warning(s))[/green]")
    return True
