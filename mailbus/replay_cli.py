"""`mailbus record` and `mailbus replay`: the operator's side of recordings."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn
from rich.table import Table

from mailbus import recording, replay, topics
from mailbus.provision import provision
from mailbus.recording import Recorded
from mailbus.settings import ServiceSettings

console = Console(stderr=True)
ALL_TOPICS = ",".join(spec.name for spec in topics.TOPICS)


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    known = {spec.name for spec in topics.TOPICS}
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        raise typer.BadParameter(f"topics must be among {ALL_TOPICS}")
    return names


def _progress() -> Progress:
    return Progress(SpinnerColumn(), "[progress.description]{task.description}",
                    MofNCompleteColumn(), TimeElapsedColumn(), console=console)


def _live(settings: ServiceSettings, names: list[str], since: str,
          until: str | None, progress: Progress, label: str) -> Iterator[Recorded]:
    task = progress.add_task(label, total=None)
    return recording.read_topics(
        settings.kafka.client_config(), settings.kafka.topic_prefix, names,
        since_ms=recording.since_from(since),
        until_ms=recording.since_from(until) if until else None,
        progress=lambda n: progress.advance(task, n))


def _counts(title: str, counts: Counter[str], extra: dict[str, Counter[str]] | None = None
            ) -> None:
    table = Table("topic", title, *(extra or {}), title="")
    for name in sorted(set(counts) | {k for c in (extra or {}).values() for k in c}):
        table.add_row(name, str(counts[name]), *(str(c[name]) for c in (extra or {}).values()))
    table.add_row("[b]all[/b]", str(sum(counts.values())),
                  *(str(sum(c.values())) for c in (extra or {}).values()))
    console.print(table)


def record(
    since: Annotated[str, typer.Option(help="From this time: ISO 8601 with a zone, or 30m, "
                                            "2h, 7d ago.")],
    out: Annotated[Path, typer.Option(help="The recording to write (Avro container file).")],
    until: Annotated[str | None, typer.Option(help="Up to this time (default: now).")] = None,
    topic_names: Annotated[str, typer.Option("--topics", help="Comma-separated topics.")]
    = ALL_TOPICS,
) -> None:
    """Record the events of some topics and a time range into one file, bytes unchanged."""
    settings = ServiceSettings(service_name="admin")
    names = _names(topic_names)
    counts: Counter[str] = Counter()
    meta = {"mailbus.topics": ",".join(names), "mailbus.since": since,
            "mailbus.until": until or "", "mailbus.recorded_at": str(int(time.time() * 1000)),
            "mailbus.source_prefix": settings.kafka.topic_prefix}

    def counted(records: Iterator[Recorded]) -> Iterator[Recorded]:
        for r in records:
            counts[r.topic] += 1
            yield r

    partial = out.with_name(out.name + ".partial")
    with _progress() as progress, partial.open("wb") as fh:
        recording.write(fh, counted(_live(settings, names, since, until, progress,
                                          "recording")), meta)
    partial.replace(out)  # a recording is whole or absent
    _counts("recorded", counts)
    console.print(f"wrote {sum(counts.values())} record(s) to {out}")


def replay_command(
    namespace: Annotated[str, typer.Option(help="Replay into topics prefixed `NAMESPACE.`.")],
    source: Annotated[Path | None, typer.Argument(help="A recording; without it, the live "
                                                       "topics from --since.")] = None,
    since: Annotated[str | None, typer.Option(help="Live topics from this time.")] = None,
    until: Annotated[str | None, typer.Option(help="Live topics up to this time.")] = None,
    topic_names: Annotated[str | None, typer.Option(
        "--topics", help="Only these topics (default: every topic of the source).")] = None,
    speed: Annotated[str, typer.Option(help="recorded, max, or a factor such as 10x.")]
    = "max",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be written."
                                          )] = False,
    into_live: Annotated[bool, typer.Option(
        "--into-live-namespace",
        help="Write into the live topics the real senders read. Dangerous.")] = False,
) -> None:
    """Replay a recording (or live topics) into a namespace; run again to resume."""
    settings = ServiceSettings(service_name="admin")
    prefix = replay.target_prefix(namespace, settings.kafka.topic_prefix, into_live=into_live)
    pace = replay.parse_speed(speed)
    if (source is None) == (since is None):
        raise typer.BadParameter("give a recording, or --since for the live topics")
    with _progress() as progress:
        if source is not None:
            meta, records = recording.read(source)
            names = _names(topic_names or meta.get("mailbus.topics", "") or ALL_TOPICS)
        else:
            assert since is not None
            names = _names(topic_names or ALL_TOPICS)
            if prefix == settings.kafka.topic_prefix:
                raise replay.ReplayRefused("replaying the live topics into themselves")
            records = _live(settings, names, since, until, progress, "reading")
        if not dry_run:
            provision(settings.kafka.client_config(), settings.var_dir / "secrets", prefix,
                      users=False)
        task = progress.add_task("dry run" if dry_run else f"replaying into {prefix}",
                                 total=None)
        outcome = replay.run(records, settings.kafka.client_config(), prefix, names=names,
                             speed=pace, dry_run=dry_run,
                             progress=lambda _r, _w: progress.advance(task, 1))
    _counts("would write" if dry_run else "written", outcome.written,
            {"already there": outcome.skipped})


def rewind(
    consumer: Annotated[str, typer.Argument(help="The consumer to rewind: projector.")],
) -> None:
    """Rebuild a consumer's state from the topics: the projector's tables, for this namespace."""
    from mailbus.rewind import rewind_projector

    if consumer != "projector":
        raise typer.BadParameter("only the projector can be rewound")
    settings = ServiceSettings(service_name="admin")
    deleted = rewind_projector(settings.kafka.client_config(), settings.postgres.conninfo(),
                               settings.kafka.topic_prefix)
    console.print("deleted " + ", ".join(f"{n} from {t}" for t, n in deleted.items())
                  + "; the projector rebuilds them from the topics when it next runs")


def replay_report(
    namespace: Annotated[str, typer.Option(help="The namespace a replay was run in.")],
    against: Annotated[str | None, typer.Option(
        help="The namespace of the original (default: this installation's).")] = None,
    show: Annotated[int, typer.Option(help="How many differing messages to list.")] = 20,
) -> None:
    """Compare the outcome of every replayed message with the original's; exit 1 on a change."""
    from mailbus.replay_report import report

    settings = ServiceSettings(service_name="admin")
    original = settings.kafka.topic_prefix if against is None else f"{against}."
    found = report(settings.postgres.conninfo(), original, f"{namespace}.")
    table = Table("account", "status", "original", "replay")
    for account, status in sorted(set(found.original) | set(found.replayed),
                                  key=lambda k: (k[0] or "", k[1])):
        table.add_row(account or "", status, str(found.original[(account, status)]),
                      str(found.replayed[(account, status)]))
    console.print(table)
    for message_id, before, after in found.differing[:show]:
        console.print(f"{message_id}: {before[1] if before else 'not in the original'} -> "
                      f"{after[1]}")
    if not found.same:
        console.print(f"[red]{len(found.differing)} message(s) ended differently[/red]")
        raise typer.Exit(1)
    console.print(f"[green]all {sum(found.replayed.values())} replayed message(s) ended as "
                  "the original[/green]")
