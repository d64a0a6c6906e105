"""The local stack's SMTP server: accepts everything on loopback and keeps it under var/devmail.

It plays the final destination for the development account (as Mailpit does
in the compose stack), so a fresh `make up` delivers without credentials.
Each message is one `.eml` file, written atomically, newest last by name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session

log = logging.getLogger(__name__)
# Anything larger is refused with 552 before it is stored.
MAX_MESSAGE_BYTES = 25 * 1024 * 1024


class MaildirHandler:
    """aiosmtpd handler: one file per accepted message."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.eml"
        header = (f"X-Mailbus-Envelope-From: {envelope.mail_from}\r\n"
                  f"X-Mailbus-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n").encode()
        tmp = self.folder / f".{name}.tmp"
        tmp.write_bytes(header + data)
        os.replace(tmp, self.folder / name)
        return f"250 2.0.0 Ok: stored as {name}"


def serve(folder: Path, host: str = "127.0.0.1", port: int = 2525) -> None:
    """Run until interrupted."""
    controller = Controller(MaildirHandler(folder), hostname=host, port=port,
                            data_size_limit=MAX_MESSAGE_BYTES)
    controller.start()
    log.info("development SMTP server on %s:%d, storing in %s", host, port, folder)
    try:
        asyncio.run(_forever())
    finally:
        controller.stop()


async def _forever() -> None:
    await asyncio.Event().wait()


def stored(folder: Path) -> list[Path]:
    """Stored messages, oldest first."""
    return sorted(folder.glob("*.eml")) if folder.exists() else []


def summary(path: Path) -> dict[str, str]:
    """The headers worth listing for a stored message."""
    with path.open("rb") as fh:
        msg = BytesParser(policy=policy.default).parse(fh, headersonly=True)
    return {k: str(msg.get(k, "")) for k in ("Date", "From", "To", "Subject", "Message-ID")}
