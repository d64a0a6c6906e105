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
MAX_FILENAME = 255
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

# Gmail's list of file types it refuses to send or receive (support.google.com,
# "File types blocked in Gmail"): executables, scripts, installers, shortcuts and
# disk images, which run or mount on a click.
DENIED_EXTENSIONS = frozenset("""
ade adp apk appx appxbundle bat cab chm cmd com cpl diagcab diagcfg diagpack dll dmg ex ex_
exe hta img ins iso isp jar jnlp js jse lib lnk mde mjs msc msi msix msixbundle msp mst nsh
pif ps1 psm1 scr sct shb sys vb vbe vbs vhd vhdx vxd wsc wsf wsh xll sh bash csh ksh command
app deb rpm reg
""".split())
# The same kinds by declared type; a file that says it is one of these is refused
# whatever its name.
DENIED_TYPES = frozenset("""
application/x-msdownload application/x-msdos-program application/x-ms-installer
application/x-msi application/x-dosexec application/x-executable application/x-sharedlib
application/vnd.microsoft.portable-executable application/x-ms-shortcut application/hta
application/x-sh application/x-csh application/x-shellscript text/x-shellscript
application/x-bat application/bat application/x-powershell
application/javascript application/x-javascript application/ecmascript text/javascript
text/ecmascript text/jscript text/vbscript application/x-vbscript
application/java-archive application/x-java-archive application/x-java-jnlp-file
application/vnd.android.package-archive application/x-apple-diskimage
application/x-iso9660-image application/vnd.ms-cab-compressed application/x-msdos-windows
application/x-ms-application application/x-mach-binary application/x-elf
""".split())
# The first bytes of executables, whatever the file is called: DOS/Windows (MZ),
# ELF, Mach-O (both byte orders, 32 and 64 bit, universal) and scripts (#!).
DENIED_MAGIC = (b"MZ", b"\x7fELF", b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf",
                b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe", b"#!")
# RFC 2045 token characters; parameters (";") are not taken: the part's header
# is written by the sender, from a bare type.
_MIME_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")
# RFC 2392 content ids as they appear after "cid:" (no brackets, no spaces).
_CONTENT_ID = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]{1,128}$")
# Controls (TAB included), DEL, C1, Unicode line and paragraph separators, and the
# bidirectional overrides that make "invoice\u202efdp.exe" read as "invoiceexe.pdf".
_NAME_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e"
                            r"\u2066-\u2069]")


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


def filename_problem(name: str) -> str | None:
    """Why a file name may not be sent, or None."""
    if _NAME_CONTROLS.search(name):
        return ("must not contain control characters, line separators or"
                " bidirectional overrides")
    start = name.find("=?")
    if start >= 0 and name.find("?=", start + 2) >= 0:
        return "must not contain an RFC 2047 encoded word (=?...?=)"
    if "/" in name or "\\" in name:
        return "must be a name, not a path"
    # Windows drops trailing dots and spaces: "run.exe. " opens as run.exe.
    stem = name.rstrip(". ")
    if not stem:
        return "must name a file"
    extension = stem.rpartition(".")[2].lower() if "." in stem else ""
    if extension in DENIED_EXTENSIONS:
        return f"files of type .{extension} may not be sent (docs/api.md, Attachments)"
    return None


def content_type_problem(value: str) -> str | None:
    """Why a declared MIME type may not be sent, or None (`value` lower-cased)."""
    if not _MIME_TYPE.fullmatch(value):
        return "must be a MIME type, type/subtype, without parameters"
    if value.startswith(("multipart/", "message/")):
        return "must not be a multipart or message type"
    if value in DENIED_TYPES:
        return f"{value} may not be sent (docs/api.md, Attachments)"
    return None


def bytes_problem(data: bytes) -> str | None:
    """Why these bytes may not be sent, or None: executables by their first bytes."""
    if data.startswith(DENIED_MAGIC):
        return "an executable or a script may not be sent (docs/api.md, Attachments)"
    return None


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
        if value is not None and not _CONTENT_ID.fullmatch(value):
            raise ValueError("must be 1 to 128 characters of an RFC 2392 content id"
                             " (letters, digits, .@-_ and the like; no <>, spaces or controls)")
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
