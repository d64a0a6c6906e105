"""Text out of hostile mail: charsets, encoded words, html to plain text, quoted history.

Everything here is total: any input gives a string, never an exception, because
one malformed message must not stop a mailbox reader.
"""

from __future__ import annotations

import base64
import binascii
import html
import re

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


# Tokens of html, matched with possessive quantifiers (Python 3.11): no
# backtracking, each attempt is one forward scan. html.parser is not linear:
# it rescans the rest of the document for each unclosed "<a" or "<!--"
# (20 KB of "<a": 2 s).
_TAG = re.compile(r"""<(/?)([A-Za-z][^\s/<>]{0,63}+)((?:[^<>"']++|"[^"]*+"|'[^']*+')*+)>""")
_COMMENT_END = re.compile(r"--!?>")
_DECLARATION = re.compile(r"<[!?][^<>]*+>")
_ATTRIBUTE = re.compile(
    r"""([^\s=/<>"']{1,64}+)(?:\s*+=\s*+("[^"]*+"?|'[^']*+'?|[^\s"'<>]*+))?""")
_SPACES = re.compile(r"\s+")
# Elements whose content is never text a reader saw (or is the history we strip).
_SKIP = frozenset({"script", "style", "head", "title", "template", "noscript", "blockquote",
                   "svg", "math", "object", "iframe"})
_RAW_TEXT = frozenset({"script", "style", "textarea", "title", "xmp", "noscript"})
_QUOTE_CLASSES = frozenset({"gmail_quote", "yahoo_quoted", "moz-cite-prefix"})
_QUOTE_IDS = frozenset({"divrplyfwdmsg"})  # Outlook's "From: ... Sent: ..." block
_BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
                    "table", "ul", "ol", "pre", "section", "article", "header", "footer"})
_VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "wbr", "area", "base", "col",
                   "embed", "source", "track", "param"})
MAX_STACK = 256  # deeper nesting is flattened; bounds the work of each end tag
MAX_ATTRIBUTES = 64  # class and id come early; the rest of a huge list is not looked at


def _unescape(text: str) -> str:
    try:
        return html.unescape(text)
    except ValueError:  # "&#" and more digits than int() converts
        return text


def _skips(tag: str, attrs: str) -> bool:
    if tag in _SKIP:
        return True
    for count, found in enumerate(_ATTRIBUTE.finditer(attrs)):
        if count >= MAX_ATTRIBUTES:
            break
        name, value = found.group(1).lower(), _unescape((found.group(2) or "").strip("\"'"))
        if ((name == "class" and set(value.lower().split()) & _QUOTE_CLASSES)
                or (name == "id" and value.lower() in _QUOTE_IDS)):
            return True
    return False


class _Converter:
    """One pass over an html document; keeps the text outside skipped elements."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, skips its content)
        # Open elements by tag, and how many skip: an end tag of nothing open costs
        # nothing, and a matching one walks only over what it closes.
        self.open: dict[str, int] = {}
        self.skipping = 0

    def data(self, text: str) -> None:
        if text and not self.skipping:
            self.parts.append(_SPACES.sub(" ", _unescape(text)))

    def start(self, tag: str, attrs: str) -> None:
        if tag in _BLOCK:
            self.parts.append("\n")
        if tag == "body" and self.open.get("head"):  # an unclosed <head> must not hide the body
            self.end("head", block=False)
        if tag in _VOID or len(self.stack) >= MAX_STACK:
            return
        skip = _skips(tag, attrs)
        self.stack.append((tag, skip))
        self.open[tag] = self.open.get(tag, 0) + 1
        self.skipping += skip

    def end(self, tag: str, *, block: bool = True) -> None:
        if block and tag in _BLOCK:
            self.parts.append("\n")
        if not self.open.get(tag):
            return
        while self.stack:  # closes this one and any left unclosed inside
            name, skip = self.stack.pop()
            self.open[name] -= 1
            self.skipping -= skip
            if name == tag:
                return

    def feed(self, html_text: str) -> None:
        pos, size = 0, len(html_text)
        while pos < size:
            lt = html_text.find("<", pos)
            if lt < 0:
                self.data(html_text[pos:])
                return
            self.data(html_text[pos:lt])
            pos = self._markup(html_text, lt)

    def _markup(self, text: str, lt: int) -> int:
        """Handle the markup at text[lt] == "<"; returns where the data resumes."""
        if text.startswith("<!--", lt):
            found = _COMMENT_END.search(text, lt + 4)
            return found.end() if found else len(text)
        tag = _TAG.match(text, lt)
        if tag is None:
            declaration = _DECLARATION.match(text, lt)
            if declaration:
                return declaration.end()
            self.data("<")  # a lone "<" is text (made inert at the end)
            return lt + 1
        name, attrs = tag.group(2).lower(), tag.group(3)
        if tag.group(1):
            self.end(name)
            return tag.end()
        self.start(name, attrs)
        if name in _RAW_TEXT:  # no markup inside: skip (or keep) up to its end tag
            close = re.compile(rf"</{re.escape(name)}[\s/>]", re.I).search(text, tag.end())
            stop = close.start() if close else len(text)
            if name not in _SKIP:
                self.data(text[tag.end():stop])
            return stop
        return tag.end()


def html_to_text(html_text: str) -> str:
    """Plain text of an html body: no markup, no script or style content, entities decoded."""
    converter = _Converter()
    converter.feed(html_text)
    lines = (line.strip() for line in "".join(converter.parts).split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    # Entities like &lt;script&gt; decode to text that looks like markup; keep it inert.
    return _TAG_START.sub("\u2039", text)


# Attribution lines carry a date or an address, so each one needs a digit,
# unless a quoted line follows at once (`_ATTRIBUTION_LOOSE`).
# Leading and trailing blanks are possessive (\s*+): a line of 800,000 U+2028
# (whitespace to \s) made a plain \s* give them back one by one to the .{1,300}
# alternatives after it, for 30 s.
_ATTRIBUTION_BODY = (
    r"\s*+(?:"
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
    r")\s*+$"
)
_ATTRIBUTION = re.compile(r"^(?=.*\d)" + _ATTRIBUTION_BODY, re.IGNORECASE)
_ATTRIBUTION_LOOSE = re.compile("^" + _ATTRIBUTION_BODY, re.IGNORECASE)
_ATTRIBUTION_START = re.compile(r"^\s*+(?:On|Am|Le|El|Il|Op|Em|Den)\s", re.IGNORECASE)
_SEPARATOR = re.compile(
    r"^\s*+(?:-{2,}+\s*+(?:Original Message|Ursprüngliche Nachricht|Message d'origine"
    r"|Mensaje original|Messaggio originale|Oorspronkelijk bericht)\s*-{2,}"
    r"|_{10,}|-{5,}\s*Forwarded message\s*-{5,})\s*$",
    re.IGNORECASE,
)
_HEADER_FROM = re.compile(r"^\s*+\*?(?:From|Von|De|Da|Van|Från|От)\s*:\*?\s", re.IGNORECASE)
_HEADER_SENT = re.compile(
    r"^\s*+\*?(?:Sent|Date|Gesendet|Datum|Envoyé|Enviado|Inviato|Verzonden|Skickat|Отправлено)"
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


# Lines of a reply looked at: each costs a dozen pattern matches, and what
# someone wrote in answer comes long before line 5,000.
MAX_REPLY_LINES = 5000


def strip_reply(text: str, limit: int | None = None) -> str:
    """The new text of a reply: quoted history, attribution lines and signature removed.

    Stops after MAX_REPLY_LINES lines, or once `limit` characters are kept.
    """
    lines = text.split("\n", MAX_REPLY_LINES)[:MAX_REPLY_LINES]
    kept: list[str] = []
    size = 0
    for index, line in enumerate(lines):
        if limit is not None and size >= limit:
            break
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
        size += len(line) + 1
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
