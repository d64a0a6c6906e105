"""Which headers a caller may set on a message (docs/api.md, "Custom headers").

An allow-list: X- names, minus prefixes that mailbus, mail providers or
receiving filters own or trust, plus a few standard fields whose values are
keywords. The API refuses anything else with a 422 naming the header; the
sender checks again, because a producer may bypass the API. Both read the
rules from here.
"""

from __future__ import annotations

import re

MAX_HEADERS = 20
MAX_NAME = 64
MAX_VALUE = 1000
MAX_BYTES = 8192  # every name and value, UTF-8
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
DENIED_PREFIXES = (
    "x-mailbus-",  # ours
    # what receiving systems read as their own verdicts or as routing facts
    "x-ms-exchange-", "x-microsoft-", "x-forefront-", "x-spam", "x-virus", "x-google-",
    "x-gm-", "x-received", "x-origin", "x-envelope-", "x-authenticat", "x-auth-",
    "x-sender", "x-apple-", "x-forwarded-", "x-delivered-to", "x-rcpt-to", "x-beenthere",
    "x-report-abuse", "x-complaints-to",
    # other mail services' control headers
    "x-smtpapi", "x-sg-", "x-ses-", "x-mailgun-", "x-mc-", "x-pm-",
)
KEYWORDS = {  # standard fields a caller may set, and their allowed values
    "precedence": frozenset({"bulk", "list", "junk"}),
    "auto-submitted": frozenset({"no", "auto-generated", "auto-replied", "auto-notified"}),
}


def name_problem(name: object) -> str | None:
    """Why a caller may not set a header of this name, or None when it may."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
        return f"a header name has 1 to {MAX_NAME} characters"
    if not _NAME.fullmatch(name):
        return "a header name has ASCII letters, digits and hyphens only, starting with a letter"
    lower = name.lower()
    if lower in KEYWORDS:
        return None
    if not lower.startswith("x-") or len(lower) == 2:
        return ("only X-... names, Precedence and Auto-Submitted may be set; mailbus writes "
                "every other header itself")
    if lower.startswith(DENIED_PREFIXES):
        return "this X- name is reserved: mailbus or receiving systems own it"
    return None
