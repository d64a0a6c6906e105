"""What a file attached to a message may be: its name, its type, its first bytes.

A deny list of what runs or mounts on a click (docs/api.md, "Attachments"),
and the rules that keep a name, a type or a content id from writing a header.
The API refuses a file that breaks them with a 422 naming the field; the
sender checks again, because a producer may bypass the API. Both read the
rules from here.
"""

from __future__ import annotations

import re

MAX_FILENAME = 255
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
MIME_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")
# RFC 2392 content ids as they appear after "cid:" (no brackets, no spaces).
CONTENT_ID = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]{1,128}$")
# Controls (TAB included), DEL, C1, Unicode line and paragraph separators, and the
# bidirectional overrides that make "invoice\u202efdp.exe" read as "invoiceexe.pdf".
_NAME_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e"
                            r"\u2066-\u2069]")


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
    if "<" in name or ">" in name:
        # Readers unquote "<...>" as if it were an address (Python's email package does).
        return "must not contain < or >"
    if name != name.strip():
        # Mail readers and file systems drop them: the name saved would not be the name sent.
        return "must not start or end with whitespace"
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
    if not MIME_TYPE.fullmatch(value):
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


def content_id_problem(value: str) -> str | None:
    """Why a content id may not be sent, or None."""
    if not CONTENT_ID.fullmatch(value):
        return ("must be 1 to 128 characters of an RFC 2392 content id"
                " (letters, digits, .@-_ and the like; no <>, spaces or controls)")
    return None
