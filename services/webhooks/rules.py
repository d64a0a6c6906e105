"""What the webhooks service decides, as pure functions: retries, giving up.

No Kafka, no database, no HTTP: `intake.py` and `dispatch.py` do the I/O
around them. The event types and payloads the API shares are the core's
(`mailbus/webhook_events.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

# Seconds to wait after each failed attempt: 11 attempts over 27.7 hours, so
# an endpoint that is down for a day still receives everything.
DEFAULT_SCHEDULE: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 43200)
# The live lane of every endpoint; each replay has its own lane id.
LIVE_LANE = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to, as the dispatcher records it."""

    delivered: bool
    state: str  # pending (retry later), delivered, failed (retries exhausted)
    next_attempt_at: datetime | None


def after_attempt(attempt: int, succeeded: bool, now: datetime,
                  schedule: Sequence[float] = DEFAULT_SCHEDULE) -> Outcome:
    """The delivery's state after its `attempt`-th attempt (1-based)."""
    if succeeded:
        return Outcome(True, "delivered", None)
    if attempt > len(schedule):
        return Outcome(False, "failed", None)
    return Outcome(False, "pending", now + timedelta(seconds=schedule[attempt - 1]))


def succeeded(status_code: int | None) -> bool:
    """Only a 2xx counts: redirects are not followed, so a 3xx is a failure too."""
    return status_code is not None and 200 <= status_code < 300


def should_disable(last_success_at: datetime | None, failing_since: datetime) -> bool:
    """An endpoint is disabled when a delivery ran out of retries and nothing
    reached it since that delivery's first attempt: it has been failing for
    the whole schedule (over a day by default)."""
    return last_success_at is None or last_success_at < failing_since
