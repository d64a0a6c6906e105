"""What `mailbus doctor` found: one row per checked thing, with its verdict and its fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Verdict = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    """One checked property: what was found and, unless ok, how to fix it."""

    verdict: Verdict
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Check:
    """A finding about one subject (a service, an account, a domain) in one area."""

    area: str
    subject: str
    finding: Finding

    @property
    def failed(self) -> bool:
        """True when the installation is broken in this respect."""
        return self.finding.verdict == "fail"
