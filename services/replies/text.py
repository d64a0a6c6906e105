"""Text out of hostile mail: charsets, encoded words, html to plain text, quoted history.

Everything here is total: any input gives a string, never an exception, because
one malformed message must not stop a mailbox reader.
"""

from __future__ import annotations

import base64
import binascii
import re
from html.parser import HTMLParser

# Labels that mail says but means something wider (what browsers do too): 8-bit
# text declared ASCII is nearly always UTF-8, ISO-8859-1 is nearly always cp1252.
_CHARSET_FIXES = {"us-ascii": "utf-8", "ascii": "utf-8", "iso-8859-1": "cp1252",
                  "latin1": "cp1252", "gb2312": "gb18030", "gbk": "gb18030"}
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)[ \t]+(?==\?)")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Anything a careless consumer could render as markup: "<" opening a tag, comment or PI.
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode with the declared charset; unknown or unusable charsets fall back to UTF-8."""
    label = (charset or "utf-8").strip().strip('"').lower()
    label = _CHARSET_FIXES.get(label, label)
    try:
        return data.decode(label, errors="replace")
    except (LookupError, UnicodeError, ValueError):
        # "x-unknown" has no codec, "base64" is no text encoding, idna refuses "replace".
        return data.decode("utf-8", errors="replace")


def decode_raw_header(raw: str) -> str:
    """A header value as the parser kept it (8-bit bytes as surrogates) to readable text."""
    data = raw.encode("utf-8", errors="surrogateescape")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")
    text = re.sub(r"\r?\n[ \t]*", " ", text)  # unfold
    return _CONTROL.sub("", _decode_words(text)).strip()


def _decode_words(text: str) -> str:
    # RFC 2047: whitespace between two encoded words is not part of the text.
    return _ENCODED_WORD.sub(_decode_word, _BETWEEN_WORDS.sub(r"\1", text))


def _decode_word(match: re.Match[str]) -> str:
    charset, encoding, payload = match.group(1).split("*")[0], match.group(2), match.group(3)
    try:
        if encoding in "bB":
            data = base64.b64decode(payload + "=" * (-len(payload) % 4))
        else:
            data = binascii.a2b_qp(payload.replace("_", " ").encode("ascii", "replace"))
    except (binascii.Error, ValueError):
        return match.group(0)
    return decode_bytes(data, charset)


def sanitise(text: str) -> str:
    """Unix line ends, no control characters but tab and newline, no trailing blanks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in _CONTROL.sub("", text).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def cap(text: str, limit: int) -> str:
    """Cut to at most `limit` characters, on a word boundary when one is near."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ", max(0, limit - 80))
    return (cut[:space] if space > 0 else cut).rstrip()


class _TextExtractor(HTMLParser):
    """Keeps the text of an html body; drops scripts, styles and quoted history."""

    # Their content is never text a reader saw (or is the history we strip).
    SKIP = frozenset({"script", "style", "head", "title", "template", "noscript", "blockquote",
                      "svg", "math", "object", "iframe"})
    QUOTE_CLASSES = frozenset({"gmail_quote", "yahoo_quoted", "moz-cite-prefix"})
    QUOTE_IDS = frozenset({"divrplyfwdmsg"})  # Outlook's "From: ... Sent: ..." block
    BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
                       "table", "ul", "ol", "pre", "section", "article", "header", "footer"})
    VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "wbr", "area", "base", "col",
                      "embed", "source", "track", "param"})
    MAX_STACK = 256  # deeper nesting is flattened; bounds the work of each end tag

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, skips its content)

    def _skipping(self) -> bool:
        return any(skip for _, skip in self.stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "body":  # an unclosed <head> must not swallow the body
            self.stack = [entry for entry in self.stack if entry[0] != "head"]
        if tag in self.VOID or len(self.stack) >= self.MAX_STACK:
            return
        values = dict(attrs)
        classes = set((values.get("class") or "").lower().split())
        skip = (tag in self.SKIP or bool(classes & self.QUOTE_CLASSES)
                or (values.get("id") or "").lower() in self.QUOTE_IDS)
        self.stack.append((tag, skip))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.BLOCK:
            self.parts.append("\n")
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index][0] == tag:  # closes this one and any left unclosed inside
                del self.stack[index:]
                return

    def handle_data(self, data: str) -> None:
        if not self._skipping():
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Plain text of an html body: no markup, no script or style content, entities decoded."""
    parser = _TextExtractor()
    try:
        parser.feed(html)
        parser.close()
    except (AssertionError, ValueError):  # html.parser's own errors on broken declarations
        pass
    lines = (line.strip() for line in "".join(parser.parts).split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    # Entities like &lt;script&gt; decode to text that looks like markup; keep it inert.
    return _TAG_START.sub("\u2039", text)


# Attribution lines carry a date or an address, so each one needs a digit,
# unless a quoted line follows at once (`_ATTRIBUTION_LOOSE`).
_ATTRIBUTION_BODY = (
    r"\s*(?:"
    r"On\b.{1,300}\bwrote:"  # English
    r"|Am\b.{1,300}\bschrieb\b.{0,300}:"  # German
    r"|Le\b.{1,300}\ba\s+écrit\s*:"  # French
    r"|El\b.{1,300}\bescribió:"  # Spanish
    r"|Il\b.{1,300}\bha\s+scritto:"  # Italian
    r"|Op\b.{1,300}\bschreef\b.{0,300}:"  # Dutch
    r"|Em\b.{1,300}\bescreveu:"  # Portuguese
    r"|Den\b.{1,300}\bskrev\b.{0,300}:"  # Swedish, Danish, Norwegian
    r"|.{1,300}\bпишет:"  # Russian  # noqa: RUF001
    r"|\d{4}年\d{1,2}月\d{1,2}日.{1,300}[:：]"  # Japanese  # noqa: RUF001
    r"|.{1,300}写道[:：]"  # Chinese  # noqa: RUF001
    r")\s*$"
)
_ATTRIBUTION = re.compile(r"^(?=.*\d)" + _ATTRIBUTION_BODY, re.IGNORECASE)
_ATTRIBUTION_LOOSE = re.compile("^" + _ATTRIBUTION_BODY, re.IGNORECASE)
_ATTRIBUTION_START = re.compile(r"^\s*(?:On|Am|Le|El|Il|Op|Em|Den)\s", re.IGNORECASE)
_SEPARATOR = re.compile(
    r"^\s*(?:-{2,}\s*(?:Original Message|Ursprüngliche Nachricht|Message d'origine"
    r"|Mensaje original|Messaggio originale|Oorspronkelijk bericht)\s*-{2,}"
    r"|_{10,}|-{5,}\s*Forwarded message\s*-{5,})\s*$",
    re.IGNORECASE,
)
_HEADER_FROM = re.compile(r"^\s*\*?(?:From|Von|De|Da|Van|Från|От)\s*:\*?\s", re.IGNORECASE)
_HEADER_SENT = re.compile(
    r"^\s*\*?(?:Sent|Date|Gesendet|Datum|Envoyé|Enviado|Inviato|Verzonden|Skickat|Отправлено)"
    r"\s*:\*?\s", re.IGNORECASE)
_SIGNATURE = re.compile(
    r"^(?:--\s*|Sent from my \S.*|Sent from (?:Outlook|Mail|Yahoo Mail)\b.*"
    r"|Get Outlook for \S.*|Von meinem \S.* gesendet|Envoyé de mon \S.*"
    r"|Enviado desde mi \S.*|Inviato da \S.*)$",
    re.IGNORECASE,
)


def _quote_follows(lines: list[str], start: int) -> bool:
    """Whether the next non-blank line (within two) is a quoted one."""
    for line in lines[start:start + 3]:
        if line.strip():
            return line.lstrip().startswith(">")
    return False


def strip_reply(text: str) -> str:
    """The new text of a reply: quoted history, attribution lines and signature removed."""
    lines = text.split("\n")
    kept: list[str] = []
    for index, line in enumerate(lines):
        # Clients wrap long attribution lines ("On ..., Ada <\nada@example.org> wrote:").
        joined = line + " " + lines[index + 1] if index + 1 < len(lines) else line
        if _ATTRIBUTION.match(line) or (_ATTRIBUTION_START.match(line)
                                        and _ATTRIBUTION.match(joined)):
            break
        if _ATTRIBUTION_LOOSE.match(line) and _quote_follows(lines, index + 1):
            break
        if _SEPARATOR.match(line) or _SIGNATURE.match(line):
            break
        if _HEADER_FROM.match(line) and any(_HEADER_SENT.match(nxt)
                                            for nxt in lines[index + 1:index + 4]):
            break
        if line.lstrip().startswith(">"):
            continue  # interleaved quotes go, the answers between them stay
        kept.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
