"""The `mailbus` command: runs each service and the operator's tasks."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from mailbus import apikeys, db, logs, replay_cli
from mailbus.errors import MailbusError
from mailbus.settings import PostgresSettings, ServiceSettings

app = typer.Typer(help="mailbus: a self-hosted email pipeline on Kafka.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
setup_app = typer.Typer(help="Provision Kafka and PostgreSQL.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(setup_app, name="setup")
console = Console()


def _logging(settings: ServiceSettings) -> None:
    logs.setup(settings.log_level, settings.log_format)


def _admin() -> ServiceSettings:
    return ServiceSettings(service_name="admin")


# Each service's one entry point: `mailbus <name>` imports it only when run, so
# a command never loads the other services (cli is the one core module that
# names them).
SERVICES = {
    "ingest": ("mailbus.ingest.workers:main", "Run the ingest API."),
    "sender": ("mailbus.sender.app:main",
               "Run the sender: deliver email.requested through each account's transport."),
    "confirm": ("mailbus.confirm.stream:main",
                "Run the confirm stream (Faust): sent + delivered -> email.confirmed."),
    "projector": ("mailbus.confirm.projector:main",
                  "Run the projector: every event into PostgreSQL, for status and reports."),
    "hooks": ("mailbus.hooks.app:main",
              "Run the public hooks service: action links, one-click unsubscribe."),
    "webhooks": ("mailbus.webhooks.app:main",
                 "Run the webhooks service: every outcome, signed, to its key's HTTPS"
                 " endpoints."),
    "replies": ("mailbus.replies.app:main",
                "Run the mailbox reader: replies, bounces, complaints into Kafka."),
}


def service_main(name: str) -> Callable[[], None]:
    """The `main` of service `name`, imported now."""
    module, _, function = SERVICES[name][0].partition(":")
    main: Callable[[], None] = getattr(importlib.import_module(module), function)
    return main


def _service_command(name: str) -> None:
    def command() -> None:
        service_main(name)()

    command.__doc__ = SERVICES[name][1]
    app.command(name)(command)


for _name in SERVICES:
    _service_command(_name)


@app.command()
def verify(
    count: Annotated[int, typer.Option(help="How many messages to send.", min=1)] = 300,
    to: Annotated[list[str] | None, typer.Option(
        help="Recipient (repeat for several); default: the development mailbox.")] = None,
    deadline: Annotated[float, typer.Option(help="Seconds to wait for confirmations.")]
    = 300.0,
    sender: Annotated[str | None, typer.Option("--from", help="Account id or pool:NAME.")]
    = None,
    api: Annotated[str, typer.Option(help="Base URL of the API.")] = "http://127.0.0.1:8080",
    key_file: Annotated[Path | None, typer.Option(help="File holding the API key.")] = None,
) -> None:
    """Send COUNT messages through the API and wait until each is confirmed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from mailbus import verify as v

    key_path = key_file or _admin().var_dir / "dev-api-key"
    token = os.environ.get("MAILBUS_API_KEY") or key_path.read_text().strip()
    verifier = v.Verifier(api, token)
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("confirming", total=count)
            outcome = v.run(verifier, count=count, recipients=to or ["verify@example.com"],
                            deadline=deadline, sender=sender,
                            progress=lambda done, total: progress.update(task, completed=done))
    finally:
        verifier.close()
    counts = outcome.count()
    table = Table("requested", "confirmed", "failed", "bounced", "unconfirmed", "pending",
                  "send s", "wait s")
    pending = counts["queued"] + counts["sent"] + counts["delivered"]
    table.add_row(str(count), str(counts["confirmed"]), str(counts["failed"]),
                  str(counts["bounced"]), str(counts["unconfirmed"]), str(pending),
                  f"{outcome.send_seconds:.1f}", f"{outcome.wait_seconds:.1f}")
    console.print(table)
    lat = v.percentiles(outcome.latencies_ms)
    if lat:
        console.print("request-to-delivery latency ms: " + ", ".join(
            f"{k} {val:.0f}" for k, val in lat.items()))
    if not outcome.ok:
        console.print(f"[red]{count - counts['confirmed']} of {count} not confirmed[/red]")
        raise typer.Exit(1)
    console.print(f"[green]all {count} confirmed[/green]")


@app.command()
def devsmtp(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 2525,
) -> None:
    """Run the development SMTP server, storing mail under var/devmail."""
    from mailbus import devsmtp as dev

    settings = _admin()
    _logging(settings)
    dev.serve(settings.var_dir / "devmail", port=port)


@app.command()
def devmail(
    show: Annotated[str | None, typer.Argument(help="A file name from the list to print.")]
    = None,
    last: Annotated[int, typer.Option(help="How many of the newest to list.")] = 20,
) -> None:
    """List (or show one of) the messages the development SMTP server received."""
    from mailbus import devsmtp as dev

    folder = _admin().var_dir / "devmail"
    if show is not None:
        path = folder / Path(show).name  # a bare name: no path may leave the folder
        if not path.is_file():
            console.print(f"no message {show}")
            raise typer.Exit(1)
        print(path.read_bytes().decode("utf-8", "replace"))
        return
    table = Table("file", "date", "from", "to", "subject")
    for path in dev.stored(folder)[-last:]:
        head = dev.summary(path)
        table.add_row(path.name, head["Date"], head["From"], head["To"], head["Subject"])
    console.print(table)


# Each service's settings class: its principal names and whether it has a
# database role. By name, so a command imports only the service it runs.
SERVICE_SETTINGS = {
    "ingest": "mailbus.ingest.settings:IngestSettings",
    "sender": "mailbus.sender.settings:SenderSettings",
    "confirm": "mailbus.confirm.settings:ConfirmSettings",
    "projector": "mailbus.confirm.projector:ProjectorSettings",
    "replies": "mailbus.replies.settings:RepliesSettings",
    "hooks": "mailbus.hooks.settings:HooksSettings",
    "webhooks": "mailbus.webhooks.settings:WebhooksSettings",
}


def service_settings(service: str) -> ServiceSettings:
    """The settings the service itself would build from this environment."""
    module, _, name = SERVICE_SETTINGS[service].partition(":")
    cls: type[ServiceSettings] = getattr(importlib.import_module(module), name)
    return cls()


@app.command()
def doctor(
    dns_server: Annotated[str | None, typer.Option(
        help="Resolve SPF, DKIM and DMARC through this server (HOST or HOST:PORT);"
             " default: the system's resolver.")] = None,
    service: Annotated[list[str] | None, typer.Option(
        help="Check Kafka and PostgreSQL as this service (repeat); default: all.")] = None,
    skip_infra: Annotated[bool, typer.Option(
        help="Check only the accounts and their domains.")] = False,
) -> None:
    """Check the installation: every row a verdict and a fix; exit 1 if any row fails."""
    from mailbus import doctor as d

    unknown = set(service or ()) - set(SERVICE_SETTINGS)
    if unknown:
        raise typer.BadParameter(f"--service must be among {', '.join(SERVICE_SETTINGS)}")
    checks = d.run(services=tuple(service or SERVICE_SETTINGS), settings_of=service_settings,
                   dns_server=dns_server, check_infra=not skip_infra)
    wide = Console(width=max(console.width, 160))
    if not d.render(checks, wide):
        raise typer.Exit(1)


accounts_app = typer.Typer(help="Sender accounts.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")


@accounts_app.command("list")
def accounts_list() -> None:
    """Each account with its quota, used and left in the rolling 24 h."""
    from mailbus.accounts import load_accounts
    from mailbus.sender.usage import usage

    settings = _admin()
    assert settings.accounts_file is not None
    directory = load_accounts(settings.accounts_file)
    with psycopg.connect(settings.postgres.conninfo()) as conn:
        counts = usage(conn, settings.kafka.topic_prefix)
    used, queued = counts.sent_last_day, counts.queued
    table = Table("account", "kind", "from", "pools", "quota/24h", "used", "left", "queued",
                  "rate/s")
    for a in directory.by_id.values():
        n = used.get(a.id, 0)
        table.add_row(a.id, a.kind, a.from_address, ",".join(a.pools), str(a.daily_quota),
                      str(n), str(max(0, a.daily_quota - n)), str(queued.get(a.id, 0)),
                      f"{a.rate_per_second:g}")
    console.print(table)


@setup_app.command("kafka")
def setup_kafka(
    prefix: Annotated[str, typer.Option(help="Namespace prefix for topics and groups.")] = "",
) -> None:
    """Create topics, service principals (SCRAM) and their ACLs."""
    from mailbus.provision import provision

    settings = _admin()
    _logging(settings)
    result = provision(settings.kafka.client_config(), settings.var_dir / "secrets", prefix)
    console.print(f"kafka: topics created {result['topics_created'] or 'none'}, "
                  f"{result['acls']} ACL bindings in place")


@setup_app.command("db")
def setup_db() -> None:
    """Create roles and database (as the superuser), then apply migrations (as the owner)."""
    settings = _admin()
    _logging(settings)
    secrets = settings.var_dir / "secrets"
    base = settings.postgres
    superuser = PostgresSettings(
        host=base.host, port=base.port, dbname="postgres",
        sslmode=base.sslmode, sslrootcert=base.sslrootcert,
        user=os.environ.get("MAILBUS_PG_SUPERUSER", "postgres"),
        password_file=Path(os.environ.get("MAILBUS_PG_SUPERUSER_PASSWORD_FILE",
                                          secrets / "postgres-superuser.password")),
    )
    db.bootstrap(superuser.model_copy(update={"dbname": base.dbname}), secrets)
    owner = base.model_copy(update={
        "user": db.OWNER_ROLE, "password": None,
        "password_file": secrets / f"postgres-{db.OWNER_ROLE}.password"})
    applied = db.migrate(owner)
    console.print(f"postgres: migrations applied {applied or 'none (up to date)'}")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: send, read, admin.")] = "send,read",
    accounts: Annotated[str | None, typer.Option(help="Comma-separated account ids.")] = None,
    default_pool: Annotated[str | None, typer.Option(help="Pool used when `from` is absent.")]
    = None,
    output: Annotated[Path | None, typer.Option(help="Write the token to this file (0600).")]
    = None,
) -> None:
    """Create an API key and print its token once; only its hash is stored."""
    wanted = [s.strip() for s in scopes.split(",") if s.strip()]
    unknown = set(wanted) - set(apikeys.SCOPES)
    if unknown or not wanted:
        raise typer.BadParameter(f"scopes must be among {', '.join(apikeys.SCOPES)}")
    allowed = [a.strip() for a in accounts.split(",")] if accounts else None
    key = apikeys.generate()
    with psycopg.connect(_admin().postgres.conninfo()) as conn:
        conn.execute(
            "INSERT INTO api_keys (id, name, secret_sha256, scopes, accounts, default_pool)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (key.key_id, name, key.secret_sha256, wanted, allowed, default_pool),
        )
    _hand_over(key.token, output, f"key {key.key_id} created")


@keys_app.command("ensure")
def keys_ensure(
    output: Annotated[Path, typer.Option(help="Token file to check or write (0600).")],
    name: Annotated[str, typer.Option()] = "development",
    scopes: Annotated[str, typer.Option()] = "send,read,admin",
) -> None:
    """Keep a working key in a file: create one unless the file holds a live key."""
    if output.exists():
        parsed = apikeys.parse(output.read_text().strip())
        if parsed is not None:
            with psycopg.connect(_admin().postgres.conninfo()) as conn:
                row = conn.execute("SELECT secret_sha256 FROM api_keys WHERE id = %s"
                                   " AND revoked_at IS NULL", (parsed[0],)).fetchone()
            if row is not None and apikeys.matches(parsed[1], row[0]):
                console.print(f"key {parsed[0]} in {output} is live")
                return
    keys_create(name=name, scopes=scopes, accounts=None, default_pool=None, output=output)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key; requests with it are refused (401) from now on."""
    with psycopg.connect(_admin().postgres.conninfo()) as conn:
        cur = conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s"
                           " AND revoked_at IS NULL", (key_id,))
    if cur.rowcount == 0:
        console.print(f"no live key {key_id}")
        raise typer.Exit(1)
    console.print(f"key {key_id} revoked")


MAX_ROTATION_GRACE = 7 * 24 * 3600


@keys_app.command("rotate")
def keys_rotate(
    key_id: str,
    grace: Annotated[int, typer.Option(
        help="Seconds the replaced secret keeps working (0: none, at most 7 days).",
        min=0, max=MAX_ROTATION_GRACE)] = 24 * 3600,
    output: Annotated[Path | None, typer.Option(help="Write the token to this file (0600).")]
    = None,
) -> None:
    """Give a key a new secret and print its token once. The key keeps its id, scopes
    and everything that belongs to it; the old secret works for --grace seconds."""
    fresh = apikeys.hash_secret(secret := apikeys.new_secret())
    with psycopg.connect(_admin().postgres.conninfo()) as conn:
        # A second rotation within the grace replaces the older secret at once:
        # two secrets at most are ever valid.
        row = conn.execute(
            "UPDATE api_keys SET previous_secret_sha256 = CASE WHEN %(grace)s > 0"
            " THEN secret_sha256 END, previous_valid_until = CASE WHEN %(grace)s > 0"
            " THEN now() + make_interval(secs => %(grace)s) END, secret_sha256 = %(fresh)s"
            " WHERE id = %(id)s AND revoked_at IS NULL RETURNING previous_valid_until",
            {"grace": grace, "fresh": fresh, "id": key_id}).fetchone()
    if row is None:
        console.print(f"no live key {key_id}")
        raise typer.Exit(1)
    # An ingest keeping keys (MAILBUS_KEY_CACHE_SECONDS) sees the change within that time.
    until = (f"the old secret works until {row[0]:%Y-%m-%d %H:%M:%S %Z}" if row[0]
             else "the old secret no longer works (within MAILBUS_KEY_CACHE_SECONDS"
                  " where the API keeps keys)")
    _hand_over(apikeys.token(key_id, secret), output, f"key {key_id} rotated; {until}")


def _hand_over(token: str, output: Path | None, done: str) -> None:
    """Write a token to a 0600 file, or print it once."""
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        os.chmod(output, 0o600)
        console.print(f"{done}; token written to {output}")
    else:
        console.print(f"{done}. Token (shown once):")
        print(token)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (never their secrets)."""
    with psycopg.connect(_admin().postgres.conninfo()) as conn:
        rows = conn.execute("SELECT id, name, scopes, accounts, default_pool, created_at,"
                            " revoked_at, CASE WHEN previous_valid_until > now()"
                            " THEN previous_valid_until END"
                            " FROM api_keys ORDER BY created_at").fetchall()
    table = Table("name", "scopes", "accounts", "default pool", "created", "revoked",
                  "old secret until")
    # The id is what every other command takes: never wrapped or cut.
    table.add_column("id", no_wrap=True, min_width=10)
    table.columns.insert(0, table.columns.pop())
    for r in rows:
        revoked = f"{r[6]:%Y-%m-%d %H:%M}" if r[6] else ""
        table.add_row(r[0], r[1], ",".join(r[2]), ",".join(r[3]) if r[3] else "all",
                      r[4] or "", f"{r[5]:%Y-%m-%d %H:%M}", revoked,
                      f"{r[7]:%Y-%m-%d %H:%M}" if r[7] else "")
    console.print(table)


app.command("record")(replay_cli.record)
app.command("replay")(replay_cli.replay_command)
app.command("rewind")(replay_cli.rewind)
app.command("replay-report")(replay_cli.replay_report)


def main() -> None:
    """Entry point of the console script; MailbusError becomes a one-line message."""
    try:
        app()
    except MailbusError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from None
