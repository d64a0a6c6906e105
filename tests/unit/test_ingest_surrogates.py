"""Unpaired UTF-16 surrogate escapes in a request body are found before any parse
that would carry them into an encoder, and named by field."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from mailbus.ingest.limits import unpaired_surrogate

TEXT = st.text()  # hypothesis' text() never holds a surrogate
DOCUMENT = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20)


@given(DOCUMENT, st.booleans())
def test_text_of_any_shape_passes(document, ascii_only):
    # ensure_ascii writes every non-BMP character as a surrogate pair: all paired.
    assert unpaired_surrogate(json.dumps(document, ensure_ascii=ascii_only).encode()) is None


@given(st.integers(0xD800, 0xDFFF), TEXT, TEXT)
def test_any_lone_surrogate_is_named(code, before, after):
    body = json.dumps({"to": [{"email": "a@example.com", "name": before + chr(code) + after}]})
    assert unpaired_surrogate(body.encode()) == "to[0].name"


def test_where_it_sits():
    assert unpaired_surrogate(b'{"text": "\\ud83d\\ude00 paired"}') is None
    assert unpaired_surrogate(b'{"text": "\\ude00\\ud83d reversed"}') == "text"
    assert unpaired_surrogate(b'{"text": "\\uDC00"}') == "text"
    assert unpaired_surrogate(b'{"messages": [{}, {"subject": "\\udbff"}]}') == (
        "messages[1].subject")
    # A broken key cannot name itself: its object is named.
    assert unpaired_surrogate(b'{"metadata": {"\\ud800": "v"}}') == "metadata"
    assert unpaired_surrogate(b'["\\ud800"]') == "[0]"
    # An escaped backslash before `ud800` is six plain characters, not an escape.
    assert unpaired_surrogate(b'{"text": "\\\\ud800"}') is None
    # Not JSON: left to the app's parser, which names the body.
    assert unpaired_surrogate(b'{"text": "\\ud800') is None


def test_deep_nesting_is_not_a_recursion():
    depth = 50_000
    body = b"[" * depth + b'"\\ud800"' + b"]" * depth
    # json.loads refuses that depth itself; nothing here recurses per level either.
    assert unpaired_surrogate(body) is None
    body = b'{"a": ' * 500 + b'"\\ud800"' + b"}" * 500
    assert unpaired_surrogate(body) == ".".join(["a"] * 500)
