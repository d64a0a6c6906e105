"""The sandboxed template renderer lives in the core (mailbus/templates.py), where the
ingest API compiles a stored template with it; the sender renders with the same one."""

from __future__ import annotations

from mailbus.templates import (
    DEADLINE_SECONDS,
    MAX_SOURCE,
    MAX_SUBJECT,
    MAX_VARIABLES,
    Rendered,
    TemplateFailed,
    one_line_subject,
    render,
)

__all__ = ["DEADLINE_SECONDS", "MAX_SOURCE", "MAX_SUBJECT", "MAX_VARIABLES", "Rendered",
           "TemplateFailed", "one_line_subject", "render"]
