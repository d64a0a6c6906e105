"""What a file attached to a message may be: names, types, bytes and sizes. Pure.

A message names each file by its bytes (`content`, base64) or by the content
address an upload answered (`id`, the hex SHA-256); attachments.py does the
storing and the looking up. Everything here is decided from the request alone.
"""

from __future__ import annotations

import binascii
import hashlib
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from mailbus.filerules import (
    MAX_FILENAME,
    bytes_problem,
    content_id_problem,
    content_type_problem,
    filename_problem,
)

MAX_ATTACHMENTS = 20  # files per message
# The files of one message together, uploaded or inline: 25 MiB, Gmail's own
# limit for the attachments of a message it sends.
MAX_TOTAL_BYTES = 25 * 1024 * 1024
MAX_FILE_BYTES = MAX_TOTAL_BYTES  # one upload (POST /v1/attachments)
# The files carried inline, base64 in the JSON of one message: larger files go
# through POST /v1/attachments, whose body is the raw bytes (no base64, a
# third smaller, and sent once for any number of messages).
MAX_INLINE_BYTES = 10 * 1024 * 1024
INLINE_BODY_BYTES = 4 * math.ceil(MAX_INLINE_BYTES / 3)  # the same, as base64
# Gmail API, users.messages.send: "Maximum file size: 35MB" (of the RFC 822
# message). The sender hands the whole message over in one request.
TRANSPORT_MAX_BYTES: dict[str, int] = {"gmail": 35 * 1024 * 1024}
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _base64(value: Any) -> Any:
    """Strict base64 (RFC 4648 alphabet, padded; whitespace allowed between lines).

    binascii reads an ASCII str in place: no bytes copy of megabytes of text first.
    """
    if not isinstance(value, str):
        return value
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        pass
    compact = "".join(value.split())  # a copy only for text broken into lines
    try:
        if compact != value:
            return binascii.a2b_base64(compact, strict_mode=True)
    except (binascii.Error, ValueError):
        pass
    raise ValueError("must be base64 (RFC 4648, with padding)")


Base64Bytes = Annotated[bytes, BeforeValidator(_base64),
                        WithJsonSchema({"type": "string", "contentEncoding": "base64"})]


class Attachment(BaseModel):
    """One file of a message: its bytes (`content`) or an uploaded file's `id`."""

    model_config = ConfigDict(extra="forbid")
    filename: str = Field(min_length=1, max_length=MAX_FILENAME)
    content_type: str = Field(max_length=200, examples=["application/pdf"])
    # Excluded from dumps (the request digest): `id` carries the bytes' hash instead.
    content: Base64Bytes | None = Field(default=None, exclude=True)
    encoding: Literal["base64"] = "base64"
    id: str | None = Field(default=None, pattern=SHA256_HEX.pattern,
                           description="The id POST /v1/attachments answered")
    content_id: str | None = Field(
        default=None, description="For an inline part: the html refers to it as cid:<content_id>")
    _size: int | None = PrivateAttr(default=None)  # known once stored or looked up

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str) -> str:
        problem = filename_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("content_type")
    @classmethod
    def _content_type(cls, value: str) -> str:
        value = value.strip().lower()
        problem = content_type_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("content")
    @classmethod
    def _content(cls, value: bytes | None) -> bytes | None:
        if value is not None:
            if len(value) > MAX_INLINE_BYTES:
                raise ValueError(f"inline files may hold at most {MAX_INLINE_BYTES} bytes;"
                                 " upload larger ones to POST /v1/attachments")
            problem = bytes_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("content_id")
    @classmethod
    def _content_id(cls, value: str | None) -> str | None:
        problem = None if value is None else content_id_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Attachment:
        if (self.content is None) == (self.id is None):
            raise ValueError("give either content (base64) or the id of an uploaded file")
        if self.content is not None:
            self.id = hashlib.sha256(self.content).hexdigest()
            self._size = len(self.content)
        return self

    @property
    def size(self) -> int | None:
        """Length of the file in bytes; None for an id not looked up yet."""
        return self._size

    def record(self) -> dict[str, Any]:
        """The mailbus.Attachment of email.requested (v3)."""
        assert self.id is not None and self._size is not None, "stored before it is produced"
        return {"sha256": self.id, "size": self._size, "filename": self.filename,
                "content_type": self.content_type, "content_id": self.content_id}


def message_problems(files: list[Attachment], has_html: bool) -> list[tuple[str, str]]:
    """(field, message) for rules across a message's files, from the request alone."""
    problems: list[tuple[str, str]] = []
    inline = sum(len(a.content) for a in files if a.content is not None)
    if inline > MAX_INLINE_BYTES:
        problems.append(("attachments", f"inline files together exceed {MAX_INLINE_BYTES}"
                         " bytes; upload them to POST /v1/attachments and name their ids"))
    seen: set[str] = set()
    for i, a in enumerate(files):
        if a.content_id is None:
            continue
        if a.content_id.lower() in seen:
            problems.append((f"attachments[{i}].content_id", "given twice in this message"))
        seen.add(a.content_id.lower())
        if not has_html:
            problems.append((f"attachments[{i}].content_id",
                             "an inline part needs an html body that refers to it"))
    return problems


def encoded_size(file_sizes: list[int], content_bytes: int) -> int:
    """An upper bound of the composed message's size: base64 files in 76-character
    lines, bodies quoted-printable at worst (3 bytes a byte), 64 KiB of headers and
    1 KiB of part headers per file."""
    files = sum(4 * math.ceil(n / 3) for n in file_sizes)
    return files + 2 * math.ceil(files / 76) + 3 * content_bytes + 65_536 + 1024 * len(
        file_sizes)


def size_problem(file_sizes: list[int], content_bytes: int, kinds: set[str]) -> str | None:
    """Why a message's files are too large, in all or for one of its possible transports."""
    total = sum(file_sizes)
    if total > MAX_TOTAL_BYTES:
        return f"the files of a message may hold at most {MAX_TOTAL_BYTES} bytes together"
    estimate = encoded_size(file_sizes, content_bytes)
    for kind in sorted(kinds):
        limit = TRANSPORT_MAX_BYTES.get(kind)
        if limit is not None and estimate > limit:
            return (f"the message would be about {estimate} bytes once encoded, over the"
                    f" {limit} bytes its {kind} account accepts")
    return None
