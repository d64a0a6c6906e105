"""The HTML the hooks service answers with: small, accessible, no script, every value escaped.

The one inline style sheet is allowed by its hash in the Content-Security-Policy,
so the policy needs no 'unsafe-inline' and nothing else may style or script the page.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from html import escape
from urllib.parse import urlsplit

STYLE = ("body{font-family:system-ui,-apple-system,'Segoe UI',Arial,sans-serif;margin:0;"
         "padding:2rem 1rem;background:#f6f7f9;color:#1f2328;line-height:1.5}"
         "main{max-width:32rem;margin:0 auto;background:#fff;border:1px solid #d0d7de;"
         "border-radius:8px;padding:1.5rem 2rem}h1{font-size:1.4rem;margin-top:0}"
         "button{font:inherit;font-weight:600;padding:.6rem 1.2rem;border:0;border-radius:6px;"
         "background:#1a56db;color:#fff;cursor:pointer}"
         "button:focus{outline:3px solid #1f2328;outline-offset:2px}")
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
_ORIGIN = re.compile(r"https?://[a-z0-9.-]+(?::[0-9]{1,5})?")


def csp(form_target: str | None = None) -> str:
    """The pages' policy; `form_target` also lets the form's POST redirect to that origin.

    Browsers apply form-action to the redirects that follow a submission, so
    the page of an action with a signed URL must name the URL's origin.
    """
    targets = "'self'" + (f" {form_target}" if form_target else "")
    return (f"default-src 'none'; form-action {targets}; frame-ancestors 'none'; "
            f"base-uri 'none'; style-src 'sha256-{_STYLE_HASH}'")


def origin(url: str) -> str | None:
    """scheme://host[:port] of an http(s) URL, the host in ASCII; None if it has none."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").encode("idna").decode("ascii")
        port = f":{parts.port}" if parts.port else ""
    except (ValueError, UnicodeError):
        return None
    found = f"{parts.scheme.lower()}://{host}{port}"
    return found if _ORIGIN.fullmatch(found) else None


CSP = csp()
# On every response, pages and errors alike; Set-Cookie is stripped.
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", CSP),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    # Pages behind bearer links must not end up in search engines.
    ("X-Robots-Tag", "noindex, nofollow"),
)
# A transparent 1x1 GIF89a.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


@dataclass(frozen=True)
class Page:
    """One answer: status, HTML body and headers beyond the security ones."""

    status: int
    html: str
    headers: dict[str, str] = field(default_factory=dict)


def _page(status: int, title: str, body: str, headers: dict[str, str] | None = None) -> Page:
    html = ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<meta name="robots" content="noindex, nofollow">\n'
            f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<main>\n<h1>{escape(title)}</h1>\n{body}</main>\n</body>\n</html>\n")
    return Page(status, html, headers or {})


def _form(target: str, button: str, hidden: dict[str, str] | None = None) -> str:
    # A relative action: the form posts back to the page's own URL, without its
    # query string, whatever path prefix a proxy serves the service under.
    inputs = "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">\n'
                     for k, v in (hidden or {}).items())
    return (f'<form method="post" action="{escape(target)}">\n{inputs}'
            f'<button type="submit">{escape(button)}</button>\n</form>\n')


def confirm_action(token: str, action_id: str, url: str | None = None) -> Page:
    """Shown by GET /a/: the choice and a button that records it (then goes to `url`)."""
    body = (f"<p>You chose <strong>{escape(action_id)}</strong>. "
            "Press the button to send your answer.</p>\n"
            + _form(token, f"Confirm: {action_id}"))
    target = origin(url) if url else None
    return _page(200, "Confirm your answer", body,
                 {"Content-Security-Policy": csp(target)} if target else None)


def action_recorded(action_id: str) -> Page:
    """After POST /a/ when the action has no redirect."""
    return _page(200, "Thanks, recorded",
                 f"<p>Your answer <strong>{escape(action_id)}</strong> has been recorded."
                 " You can close this page.</p>\n")


def confirm_unsubscribe(token: str, recipient: str) -> Page:
    """Shown by GET /u/: the address and a button that unsubscribes it."""
    body = (f"<p>Stop emails like this one to <strong>{escape(recipient)}</strong>?</p>\n"
            + _form(token, "Unsubscribe", {"List-Unsubscribe": "One-Click"}))
    return _page(200, "Unsubscribe", body)


def unsubscribed(recipient: str) -> Page:
    """After POST /u/."""
    return _page(200, "You are unsubscribed",
                 f"<p><strong>{escape(recipient)}</strong> will not receive these emails"
                 " any more.</p>\n")


def refused(status: int) -> Page:
    """A token that is not accepted: expired (410) or not genuine (400)."""
    if status == 410:
        return _page(410, "This link has expired",
                     "<p>The link is too old to be used. Nothing was recorded.</p>\n")
    return _page(status, "This link is not valid",
                 "<p>The link is incomplete or damaged; try copying the whole link from the"
                 " email. Nothing was recorded.</p>\n")


def unavailable(retry_after: int) -> Page:
    """Kafka did not take the event: nothing recorded, the reader should try again."""
    return _page(503, "Please try again",
                 "<p>We could not record this right now. Nothing was recorded; please try"
                 " again in a moment.</p>\n", {"Retry-After": str(retry_after)})


def rate_limited(retry_after: str) -> Page:
    """Too many requests from one address."""
    return _page(429, "Too many requests",
                 "<p>Please wait a moment before trying again.</p>\n",
                 {"Retry-After": retry_after})


_ERRORS = {
    404: ("Not found", "There is nothing at this address."),
    405: ("Method not allowed", "This address does not take that kind of request."),
    413: ("Request too large", "The request carried more data than this page accepts."),
    500: ("Something went wrong", "Nothing was recorded; please try again later."),
}


def error(status: int, headers: dict[str, str] | None = None) -> Page:
    """Any other HTTP error, as a page."""
    title, text = _ERRORS.get(status, ("Request not accepted", "The request was not accepted."))
    return _page(status, title, f"<p>{escape(text)}</p>\n", headers)
