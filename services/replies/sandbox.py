"""Classification under a deadline, in worker processes the service can abandon.

classify_inbound() is linear on any input we know of, but it is CPU-bound Python over
hostile bytes, and the standard library parser it leans on has had quadratic
corners before. A mail that still finds one must cost one mail, not the
mailbox: each classification runs in a `mailbus.deadline` pool with
`deadline` seconds, and a mail that runs past it (or kills its worker) is
kept as unmatched, with the reason, and the reader moves past it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import partial

from mailbus.deadline import DeadlinePool, Died, Late, Unavailable
from mailbus.errors import MailbusError
from mailbus.replies.classify import Inbound, classify_inbound

# classify_inbound(raw, domains=...) or a stand-in of the same shape
Classify = Callable[..., Inbound]


class WorkerFailed(MailbusError):
    """A classifier worker could not be started; the mail is handed over again later."""


def quarantine(reason: str, header: Inbound | None = None) -> Inbound:
    """An unmatched verdict for mail that was not (fully) classified, keeping what is known."""
    if header is None:
        return Inbound(kind="unmatched", reason=reason, quarantined=True)
    return Inbound(kind="unmatched", header_message_id=header.header_message_id,
                   sender=header.sender, subject=header.subject, date=header.date,
                   reason=reason, quarantined=True)


def _classify_job(target: Classify, job: tuple[bytes, tuple[str, ...]]) -> Inbound:
    raw, domains = job
    return target(raw, domains=domains)


class Sandbox:
    """`workers` classifier processes, each mail under `deadline` seconds of wall time."""

    def __init__(self, deadline: float, workers: int = 2, target: Classify = classify_inbound):
        self.deadline, self.target = deadline, target
        self._pool = DeadlinePool(partial(_classify_job, target), deadline=deadline,
                                  processes=workers, name="mailbus-classify")

    @property
    def abandoned(self) -> int:
        """Mails past the deadline or whose worker died (for tests and logs)."""
        return self._pool.abandoned

    async def classify_inbound(self, raw: bytes, *, domains: Collection[str] = ()) -> Inbound:
        """classify_inbound() in a worker; past the deadline an unmatched verdict saying so."""
        try:
            found = await self._pool.run((raw, tuple(domains)))
        except Unavailable as exc:
            raise WorkerFailed(str(exc)) from exc
        if isinstance(found, Late):
            return quarantine(f"classification did not finish within {found.seconds:g} s")
        if isinstance(found, Died) or not isinstance(found, Inbound):
            return quarantine("the classifier worker died")
        return found

    def close(self) -> None:
        """Stop every worker."""
        self._pool.close()
