"""A message's content work (template rendering, text derived from html) under a deadline.

Templates and html come from API clients. Rendering counts loop steps and output
and checks the clock as it goes (templates.py), but that deadline is
cooperative: one sandboxed filter call (a sort of 50,000 strings in a loop that
prints nothing) runs between two checks, and a template was seen holding the
CPU for 27 s before its 2 s deadline was noticed. html_to_text() leans on
HTMLParser, which is quadratic on some malformed markup ("<a" repeated). On the
event loop either would stall every account of the sender; in a thread it would
still hold the GIL and could not be stopped.

So compose.content() runs in a `mailbus.deadline` pool of content processes:
past the hard deadline the process is killed, the message fails permanently
with "deadline exceeded", and a fresh process is started for the next one.
Messages without a template or html-only body never come here: their content
is cheap and computed in the worker itself.
"""

from __future__ import annotations

from typing import Any

from mailbus.deadline import DeadlinePool, Died, Late, Unavailable
from mailbus.errors import MailbusError, UnavailableError
from mailbus.sender.compose import ComposeFailed, Content, content
from mailbus.sender.templates import DEADLINE_SECONDS, TemplateFailed

# Above the cooperative deadline, so a template that honours it gets its own reason.
HARD_DEADLINE = DEADLINE_SECONDS + 1.0
MEMORY_LIMIT = 1 << 30  # address space of a content process: a runaway render gets MemoryError
_FIELDS = ("subject", "text", "html", "template")


class SandboxUnavailable(UnavailableError):
    """No content process could be started; the message is tried again later."""


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):  # not on this platform, or already lower
        pass


def _content_job(fields: dict[str, Any]) -> Content | tuple[str, str]:
    """In the content process: Content, or ("template"|"compose", reason)."""
    try:
        return content(fields)
    except TemplateFailed as exc:
        return ("template", str(exc))
    except MailbusError as exc:
        return ("compose", str(exc))
    except Exception as exc:  # noqa: BLE001 - hostile input can reach any corner
        return ("compose", f"unexpected {type(exc).__name__}")


def compose_failure(exc: BaseException) -> str:
    """The email.failed reason for a message whose content or composing failed.

    Our own errors say what is wrong with the message; anything else is named by
    its type alone, since its text might quote configuration or key material.
    """
    if isinstance(exc, TemplateFailed):
        return f"template: {exc}"
    if isinstance(exc, MailbusError):
        return f"compose: {exc}"
    return f"compose: unexpected {type(exc).__name__}"


def failure(event: dict[str, Any], reason: str) -> MailbusError:
    """The error for a content job that did not finish, by what the job was doing."""
    if event.get("template"):
        return TemplateFailed(reason)
    return ComposeFailed(f"html: {reason}")


class ContentSandbox:
    """`processes` content processes; each message's content under `deadline` seconds."""

    def __init__(self, deadline: float = HARD_DEADLINE, processes: int = 2):
        self.deadline = deadline
        self._pool = DeadlinePool(_content_job, deadline=deadline, processes=processes,
                                  name="mailbus-content", setup=_limit_memory)

    async def content(self, event: dict[str, Any]) -> Content:
        """compose.content(event) in a process; raises TemplateFailed or ComposeFailed."""
        try:
            reply = await self._pool.run({name: event.get(name) for name in _FIELDS})
        except Unavailable as exc:
            raise SandboxUnavailable(str(exc)) from exc
        if isinstance(reply, Content):
            return reply
        if isinstance(reply, Late):
            raise failure(event, f"deadline exceeded: stopped after {reply.seconds:g} s")
        if isinstance(reply, Died) or not isinstance(reply, tuple):
            raise failure(event, "the content process died while working on it")
        kind, reason = reply
        raise TemplateFailed(reason) if kind == "template" else ComposeFailed(reason)

    def close(self) -> None:
        """Stop every process."""
        self._pool.close()
