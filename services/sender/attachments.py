"""Attachments in the sent message: fetched by hash, checked, and composed as MIME parts.

email.requested (v3) names each file by its SHA-256 (`attachments`); the bytes
live in attachment_blobs (mailbus/migrations/0017_attachments.sql). `fetch` is
the I/O; the rest is pure and runs where compose() runs.

Structure (RFC 2046, RFC 2387): the text or multipart/alternative body, wrapped
in multipart/related with the inline parts (those with a content_id, which the
html names as cid:...), wrapped in multipart/mixed with the other files. Each
file travels base64 in 76-character lines; its name per RFC 2231 (UTF-8,
percent-encoded, split into continuations that keep every line short).

Nothing from the event is trusted: the API's rules (mailbus/filerules.py: the
deny list, and what keeps a name, type or content id from writing a header)
hold again, the bytes must hash to the name they were fetched by, and each
part's header block is parsed back and must say exactly what was built.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from email import policy
from email.parser import BytesHeaderParser
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from mailbus import filerules
from mailbus.errors import UnavailableError
from mailbus.sender import metrics
from mailbus.sender.headers import ComposeFailed

FETCH = "SELECT sha256, content FROM attachment_blobs WHERE sha256 = ANY(%(sha256s)s)"
# A name sent as a plain quoted string: printable ASCII without quote or backslash.
_PLAIN_NAME = re.compile(r'[\x20\x21\x23-\x5b\x5d-\x7e]{1,60}')
_PARSER = BytesHeaderParser(policy=policy.default)
CONTINUATION = 60  # characters of an encoded name per header line
_BLOCK = 57 * 1024  # bytes encoded at a time: 1,024 whole lines of 76 characters


class AttachmentMissing(ComposeFailed):
    """A file the message names is not stored (expired, or never stored): it fails for good."""


class StoreUnavailable(UnavailableError):
    """The files could not be read (PostgreSQL down): the message is tried again later."""


class BlobCache:
    """Recently read files by SHA-256, so that messages sharing one file (a batch,
    a campaign) read it from PostgreSQL once rather than once per message.

    Content-addressed bytes never change, so a kept copy is never stale; it is
    kept at most `ttl` seconds all the same, so a file pruned from the store
    stops being sent soon after, as it would without the cache. Least recently
    used files go first past `max_bytes`; a file over a quarter of it is not
    kept. Messages composed at the same time wait for one read of a file
    rather than each starting its own.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, ttl: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.ttl, self.clock = max_bytes, ttl, clock
        self._files: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._reading: dict[str, asyncio.Future[dict[str, bytes]]] = {}
        self.size = 0

    def get(self, sha256: str) -> bytes | None:
        kept = self._files.get(sha256)
        if kept is None:
            return None
        if self.clock() - kept[0] > self.ttl:
            self._drop(sha256)
            return None
        self._files.move_to_end(sha256)
        return kept[1]

    def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.max_bytes // 4 or sha256 in self._files:
            return
        self._files[sha256] = (self.clock(), data)
        self.size += len(data)
        while self.size > self.max_bytes:
            self._drop(next(iter(self._files)))

    def _drop(self, sha256: str) -> None:
        self.size -= len(self._files.pop(sha256)[1])

    async def fetch(self, pool: AsyncConnectionPool, wanted: Sequence[str]) -> dict[str, bytes]:
        """The files of `wanted` that are stored: kept, being read, or read now."""
        found: dict[str, bytes] = {}
        waiting: dict[str, asyncio.Future[dict[str, bytes]]] = {}
        mine: list[str] = []
        for sha in wanted:
            kept = self.get(sha)
            if kept is not None:
                found[sha] = kept
            elif sha in self._reading:
                waiting[sha] = self._reading[sha]
            else:
                mine.append(sha)
        metrics.ATTACHMENT_FILES.labels("cache").inc(len(found) + len(waiting))
        if mine:
            read: asyncio.Future[dict[str, bytes]] = asyncio.get_running_loop().create_future()
            self._reading.update(dict.fromkeys(mine, read))
            try:
                rows = await _read(pool, mine)
            except BaseException as exc:
                # Those waiting for this read end as its own message does; if this
                # task was cancelled, they try again later.
                if not read.done():
                    read.set_exception(exc if isinstance(exc, Exception) else StoreUnavailable(
                        "attachments: the read was stopped"))
                    read.exception()  # retrieved: nobody may be waiting
                raise
            finally:
                for sha in mine:
                    self._reading.pop(sha, None)
            if not read.done():
                read.set_result(rows)
            for sha, data in rows.items():
                # Kept only when it is what its name says (checked() checks every use).
                if hashlib.sha256(data).hexdigest() == sha:
                    self.put(sha, data)
            found.update(rows)
        for sha, other in waiting.items():
            # Shielded: a waiter cancelled must not cancel the read the others share.
            rows = await asyncio.shield(other)
            if sha in rows:
                found[sha] = rows[sha]
        return found


async def _read(pool: AsyncConnectionPool, wanted: Sequence[str]) -> dict[str, bytes]:
    try:
        async with pool.connection() as conn:
            # Binary results: bytea as bytes, not as hex text decoded on our side.
            cur = await conn.execute(FETCH, {"sha256s": list(wanted)}, binary=True)
            rows = {sha: bytes(content) for sha, content in await cur.fetchall()}
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise StoreUnavailable(f"attachments: {exc}") from exc
    metrics.ATTACHMENT_FILES.labels("database").inc(len(rows))
    return rows


async def fetch(pool: AsyncConnectionPool, files: Sequence[dict[str, Any]],
                cache: BlobCache | None = None) -> dict[str, bytes]:
    """The stored bytes of the files an event names, by hash (missing ones left out)."""
    wanted = sorted({f["sha256"] for f in files})
    return await (cache.fetch(pool, wanted) if cache is not None else _read(pool, wanted))


def _field(i: int, name: str) -> str:
    return f"attachments[{i}].{name}"


def checked(files: Sequence[dict[str, Any]], found: dict[str, bytes]) -> list[bytes]:
    """Each file's bytes in order; ComposeFailed naming the first that is unsafe, missing
    or not what its hash says."""
    out = []
    for i, f in enumerate(files):
        name, ctype, cid = (f.get("filename") or "", f.get("content_type") or "",
                            f.get("content_id"))
        # The API's own rules (mailbus/filerules.py), again: a producer may bypass it.
        for field, problem in (
                ("filename", filerules.filename_problem(name) if 0 < len(name) <= (
                    filerules.MAX_FILENAME) else "must be 1 to 255 characters"),
                ("content_type", filerules.content_type_problem(ctype)),
                ("content_id", None if cid is None else filerules.content_id_problem(cid))):
            if problem:
                raise ComposeFailed(f"{_field(i, field)}: {problem}")
        data = found.get(f.get("sha256", ""))
        if data is None:
            raise AttachmentMissing(f"{_field(i, 'id')}: file {f.get('sha256')} is no longer"
                                    " stored")
        if hashlib.sha256(data).hexdigest() != f["sha256"] or len(data) != f.get("size"):
            raise ComposeFailed(f"{_field(i, 'id')}: the stored bytes do not match their hash")
        problem = filerules.bytes_problem(data)
        if problem:
            raise ComposeFailed(f"{_field(i, 'id')}: {problem}")
        out.append(data)
    return out


def filename_params(name: str) -> str:
    """Content-Disposition's filename parameter(s), RFC 2231 beyond plain ASCII."""
    if _PLAIN_NAME.fullmatch(name):
        return f'filename="{name}"'
    encoded = quote(name.encode("utf-8"), safe="")
    chunks, at = [], 0
    while at < len(encoded):
        end = min(at + CONTINUATION, len(encoded))
        while end < len(encoded) and "%" in encoded[end - 2:end]:
            end -= 1  # never split a %XX triplet
        chunks.append(encoded[at:end])
        at = end
    if len(chunks) == 1:
        return f"filename*=utf-8''{chunks[0]}"
    return ";\r\n ".join(f"filename*{n}*={'utf-8' + chr(39) * 2 if n == 0 else ''}{c}"
                         for n, c in enumerate(chunks))


def _part(file: dict[str, Any], data: bytes, i: int) -> list[bytes]:
    """One file as a MIME part (its pieces), its header block checked by parsing it back."""
    name, ctype, cid = file["filename"], file["content_type"], file.get("content_id")
    disposition = "inline" if cid else "attachment"
    head = (f"Content-Type: {ctype}\r\n"
            f"Content-Disposition: {disposition};\r\n {filename_params(name)}\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            + (f"Content-ID: <{cid}>\r\n" if cid else "")).encode("ascii")
    parsed = _PARSER.parsebytes(head + b"\r\n")
    names = [n.lower() for n in parsed.keys()]
    want = ["content-type", "content-disposition", "content-transfer-encoding"] + (
        ["content-id"] if cid else [])
    if (names != want or parsed.get_content_type() != ctype or parsed.get_filename() != name
            or parsed.get_content_disposition() != disposition
            or (cid and str(parsed["Content-ID"]).strip() != f"<{cid}>")):
        raise ComposeFailed(f"{_field(i, 'filename')}: the part's headers do not read back"
                            " as built")
    # 76-character lines (RFC 2045 6.8), CRLF line ends, encoded a block at a time so
    # the file's base64 exists once, not once with LF and once more with CRLF.
    view = memoryview(data)
    return [head, b"\r\n", *(base64.encodebytes(view[at:at + _BLOCK]).replace(b"\n", b"\r\n")
                              for at in range(0, len(data), _BLOCK))]


def _boundary(text_parts: bytes) -> bytes:
    # "=_" never occurs in base64 or quoted-printable output; text bodies are searched.
    while True:
        boundary = b"=_mailbus_" + secrets.token_hex(16).encode("ascii")
        if boundary not in text_parts:
            return boundary


def _multipart(subtype: str, parts: list[list[bytes]], text_parts: bytes,
               extra: str = "") -> list[bytes]:
    """The pieces of a multipart part (its Content-Type, a blank line, its body) of
    `parts`; pieces, not one bytes, so megabytes of files are copied once, at the end."""
    boundary = _boundary(text_parts)
    out = [f"Content-Type: multipart/{subtype};{extra}\r\n boundary=\"".encode("ascii"),
           boundary, b'"\r\n', b"\r\n"]
    for part in parts:
        out += [b"--", boundary, b"\r\n", *part, b"\r\n"]
    out += [b"--", boundary, b"--\r\n"]
    return out


def wrap(mime_head: bytes, body: bytes, files: Sequence[dict[str, Any]],
         data: list[bytes]) -> tuple[list[str], bytes, list[bytes]]:
    """(header names, MIME header lines, body pieces) of the message body with its files.

    `mime_head`, `body`: what compose built for the text (its MIME-Version line first).
    The pieces are joined once, into the message, by the caller."""
    text_head = mime_head.removeprefix(b"MIME-Version: 1.0\r\n")
    inner = [text_head, b"\r\n", body]
    parts = [(f, _part(f, d, i)) for i, (f, d) in enumerate(zip(files, data, strict=True))]
    inline = [p for f, p in parts if f.get("content_id")]
    attached = [p for f, p in parts if not f.get("content_id")]
    if inline:
        first = re.match(rb"Content-Type: ([a-z/]+)", text_head)
        root = first.group(1).decode() if first else "text/plain"
        inner = _multipart("related", [inner, *inline], body, f' type="{root}";')
    if attached:
        inner = _multipart("mixed", [inner, *attached], body)
    # inner = [Content-Type lines..., blank line, body pieces...]: the top part's
    # header lines become the message's, after MIME-Version.
    blank = inner.index(b"\r\n", 1)
    return (["MIME-Version", "Content-Type"],
            b"MIME-Version: 1.0\r\n" + b"".join(inner[:blank]), inner[blank + 1:])
