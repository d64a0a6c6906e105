"""The text/plain part of a message whose request gave html alone. Pure.

HTMLParser is quadratic on some malformed markup ("<a" repeated) and raises
AssertionError on others ("<![foo[ x ]]>"): the sender calls this in its
content processes, under a deadline (sandbox.py), and a parser error fails the
message with ComposeFailed naming the html.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from mailbus.sender.headers import ComposeFailed


class _TextOfHtml(HTMLParser):
    _SKIP = frozenset({"script", "style", "head", "title", "template"})
    _BLOCK = frozenset({"p", "div", "br", "tr", "table", "ul", "ol", "li", "blockquote", "pre",
                        "hr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
                        "header", "footer", "main", "nav", "aside", "dl", "dt", "dd"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self.skip += 1
        elif tag in self._BLOCK:
            self.out.append("\n- " if tag == "li" else "\n")
        elif tag == "a":
            href = dict(attrs).get("href") or ""
            self.href = href if href.startswith(("http://", "https://", "mailto:")) else None

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self._BLOCK and tag not in ("br", "hr", "li"):  # <br/> ends at once
            self.out.append("\n")
        elif tag == "a" and self.href:
            if not self.out or self.href not in self.out[-1]:
                self.out.append(f" <{self.href}>")
            self.href = None

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.out.append(data)


def html_to_text(html: str) -> str:
    """A plain-text rendering of an HTML body: text, line breaks at blocks, link targets."""
    parser = _TextOfHtml()
    try:
        parser.feed(html)
        parser.close()
    except Exception as exc:  # HTMLParser raises AssertionError on e.g. "<![foo[ x ]]>"
        raise ComposeFailed(f"html: the HTML parser gave up on it "
                            f"({type(exc).__name__}: {str(exc)[:100]})") from exc
    lines = [" ".join(line.split()) for line in "".join(parser.out).splitlines()]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return text + "\n" if text else ""
