"""Attachments without I/O: the request's rules (ingest) and the MIME the sender builds."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import hashlib
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mailbus import filerules
from mailbus.accounts import Account, SmtpAccount
from mailbus.ingest import attachment_rules
from mailbus.ingest.models import MessageRequest, cross_field_problems
from mailbus.ingest.problems import from_pydantic
from mailbus.sender import attachments
from mailbus.sender.compose import ComposeFailed, compose

NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
ACCOUNT = Account(id="billing", kind="smtp", from_address="billing@example.com",
                  smtp=SmtpAccount(host="127.0.0.1"))
PDF = b"%PDF-1.7\n" + bytes(range(256)) * 40 + b"\r\n\x00=_mailbus_ --\n%%EOF"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(reversed(range(256))) * 7


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request(*files: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"to": ["ada@example.org"], "subject": "Invoice", "text": "attached",
            "attachments": list(files)} | extra


def pdf(**extra: Any) -> dict[str, Any]:
    return {"filename": "invoice.pdf", "content_type": "application/pdf",
            "content": b64(PDF)} | extra


def refused(body: dict[str, Any]) -> list[dict[str, str]]:
    with pytest.raises(ValidationError) as info:
        MessageRequest.model_validate(body)
    return from_pydantic(info.value.errors())


# The request's rules.

def test_an_inline_file_is_named_by_its_hash_and_dumped_without_its_bytes() -> None:
    req = MessageRequest.model_validate(request(pdf()))
    [a] = req.attachments
    assert a.id == hashlib.sha256(PDF).hexdigest() and a.size == len(PDF)
    dumped = req.model_dump(mode="json", by_alias=True)["attachments"][0]
    assert "content" not in dumped and dumped["id"] == a.id
    assert a.record() == {"sha256": a.id, "size": len(PDF), "filename": "invoice.pdf",
                          "content_type": "application/pdf", "content_id": None}


@pytest.mark.parametrize(("item", "field"), [
    (pdf(content="JVBERi0xLjc=="), "attachments[0].content"),  # bad padding
    (pdf(content="JVBER*i0x"), "attachments[0].content"),  # outside the alphabet
    (pdf(content="JVBERi0xLjc-"), "attachments[0].content"),  # base64url is not base64
    (pdf(encoding="uuencode"), "attachments[0].encoding"),
    (pdf(filename="run.exe"), "attachments[0].filename"),
    (pdf(filename="invoice.pdf.JS"), "attachments[0].filename"),
    (pdf(filename="setup.msi. . "), "attachments[0].filename"),  # Windows drops the dots
    (pdf(filename="script.ps1"), "attachments[0].filename"),
    (pdf(filename="a.vbs"), "attachments[0].filename"),
    (pdf(filename="evil\u202efdp.exe"), "attachments[0].filename"),  # bidi override
    (pdf(filename="x.pdf\r\nBcc: victim@example.net"), "attachments[0].filename"),
    (pdf(filename="x\u2028.pdf"), "attachments[0].filename"),
    (pdf(filename="=?utf-8?q?x=0D=0ABcc:_v@example.net?=.pdf"), "attachments[0].filename"),
    (pdf(filename="../../etc/passwd"), "attachments[0].filename"),
    (pdf(filename=""), "attachments[0].filename"),
    (pdf(content_type="application/x-msdownload"), "attachments[0].content_type"),
    (pdf(content_type="text/javascript"), "attachments[0].content_type"),
    (pdf(content_type="application/pdf\r\nBcc: v@example.net"), "attachments[0].content_type"),
    (pdf(content_type="application/pdf; name=x.exe"), "attachments[0].content_type"),
    (pdf(content_type="multipart/mixed"), "attachments[0].content_type"),
    (pdf(content_type="message/rfc822"), "attachments[0].content_type"),
    (pdf(content=b64(b"MZ\x90\x00" + PDF)), "attachments[0].content"),  # a PE, named .pdf
    (pdf(content=b64(b"\x7fELF" + PDF)), "attachments[0].content"),
    (pdf(content=b64(b"#!/bin/sh\nrm -rf ~\n")), "attachments[0].content"),
    (pdf(content_id="logo>\r\nBcc: v@example.net"), "attachments[0].content_id"),
    (pdf(content_id="a b"), "attachments[0].content_id"),
    (pdf(content_id="<logo>"), "attachments[0].content_id"),
    (pdf(id="ab" * 32), "attachments[0]"),  # content and id: one or the other
    ({"filename": "x.pdf", "content_type": "application/pdf"}, "attachments[0]"),
    ({"filename": "x.pdf", "content_type": "application/pdf", "id": "AB" * 32},
     "attachments[0].id"),
])
def test_bad_files_are_refused_naming_the_field(item: dict[str, Any], field: str) -> None:
    errors = refused(request(item))
    assert [e["field"] for e in errors] == [field], errors


def test_at_most_so_many_files_and_inline_bytes() -> None:
    many = [pdf(filename=f"{i}.pdf") for i in range(attachment_rules.MAX_ATTACHMENTS + 1)]
    assert [e["field"] for e in refused(request(*many))] == ["attachments"]
    big = b64(b"%" + bytes(attachment_rules.MAX_INLINE_BYTES))
    assert [e["field"] for e in refused(request(pdf(content=big)))] == [
        "attachments[0].content"]
    half = b64(b"%" * (attachment_rules.MAX_INLINE_BYTES // 2 + 1))
    req = MessageRequest.model_validate(request(pdf(content=half), pdf(content=half)))
    assert [f for f, _ in cross_field_problems(req)] == ["attachments"]


def test_an_inline_part_needs_html_and_a_content_id_of_its_own() -> None:
    req = MessageRequest.model_validate(request(pdf(content_id="logo")))
    assert [f for f, _ in cross_field_problems(req)] == ["attachments[0].content_id"]
    twice = MessageRequest.model_validate(request(pdf(content_id="logo"),
                                                  pdf(content_id="LOGO"), html="<b>x</b>"))
    assert [f for f, _ in cross_field_problems(twice)] == ["attachments[1].content_id"]


def test_a_message_too_large_for_gmail_is_refused_for_a_gmail_account_only() -> None:
    sizes = [attachment_rules.MAX_TOTAL_BYTES]
    assert attachment_rules.size_problem(sizes, 1000, {"smtp"}) is None
    problem = attachment_rules.size_problem(sizes, 600_000, {"smtp", "gmail"})
    assert problem is not None and "gmail" in problem
    over = attachment_rules.size_problem([attachment_rules.MAX_TOTAL_BYTES, 1], 0, {"smtp"})
    assert over is not None and "at most" in over
    # The estimate is an upper bound of what the sender builds.
    assert attachment_rules.encoded_size([len(PDF)], 8) >= len(
        base64.encodebytes(PDF).replace(b"\n", b"\r\n"))


# The sender's MIME.

def files_event(*files: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"event_id": "7d1f0c34-2b9a-4c55-8f1e-3a6b9c0d2e4f",
            "message_id": "0b6f3c1e-8a47-4f5e-9d0c-2f1a7e6b5c4d", "account_id": "billing",
            "to": [{"email": "ada@example.org", "name": None}], "cc": [], "bcc": [],
            "reply_to": None, "subject": "Your receipt", "text": "See attached.\n",
            "html": None, "template": None, "actions": [], "tags": [], "metadata": {},
            "send_at": None, "requested_at": NOW, "attachments": list(files)} | extra


def ref(data: bytes, filename: str, content_type: str,
        content_id: str | None = None) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            "filename": filename, "content_type": content_type, "content_id": content_id}


def by_hash(*blobs: bytes) -> dict[str, bytes]:
    return {hashlib.sha256(b).hexdigest(): b for b in blobs}


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_files_and_an_inline_image_read_back_byte_for_byte() -> None:
    name = "Rechnung März 2025 — Übersicht, sehr lang " * 4 + ".pdf"  # continuations
    event = files_event(ref(PDF, name, "application/pdf"),
                        ref(PNG, "logo.png", "image/png", "logo@example.com"),
                        html='<p>Hi</p><img src="cid:logo@example.com">')
    out = compose(event, ACCOUNT, None, now=NOW, files=by_hash(PDF, PNG))
    assert out.raw.isascii() and all(len(x) <= 998 for x in out.raw.split(b"\r\n"))
    msg = parse(out.raw)
    assert msg.get_content_type() == "multipart/mixed"
    related, attached = msg.get_payload()
    assert related.get_content_type() == "multipart/related"
    assert related.get_param("type") == "multipart/alternative"
    alternative, image = related.get_payload()
    assert [p.get_content_type() for p in alternative.get_payload()] == [
        "text/plain", "text/html"]
    assert image["Content-ID"] == "<logo@example.com>"
    assert image.get_content_disposition() == "inline"
    assert image.get_payload(decode=True) == PNG
    assert attached.get_filename() == name and attached.get_content_disposition() == "attachment"
    assert attached.get_content_type() == "application/pdf"
    assert attached.get_payload(decode=True) == PDF
    assert msg["Subject"] == "Your receipt" and msg["Bcc"] is None


def test_text_alone_with_one_file_is_mixed_of_two() -> None:
    out = compose(files_event(ref(PDF, "a.pdf", "application/pdf")), ACCOUNT, None, now=NOW,
                  files=by_hash(PDF))
    text, attached = parse(out.raw).get_payload()
    assert text.get_content_type() == "text/plain"
    assert text.get_content().rstrip() == "See attached."
    assert attached.get_payload(decode=True) == PDF


def test_a_file_no_longer_stored_fails_naming_it() -> None:
    with pytest.raises(attachments.AttachmentMissing, match=r"attachments\[0\]\.id"):
        compose(files_event(ref(PDF, "a.pdf", "application/pdf")), ACCOUNT, None, now=NOW,
                files={})


def test_bytes_that_do_not_match_their_hash_are_not_sent() -> None:
    forged = {hashlib.sha256(PDF).hexdigest(): PDF[:-1] + b"X"}
    with pytest.raises(ComposeFailed, match="do not match"):
        compose(files_event(ref(PDF, "a.pdf", "application/pdf")), ACCOUNT, None, now=NOW,
                files=forged)


def test_an_executable_produced_past_the_api_is_not_sent() -> None:
    exe = b"MZ\x90\x00" + PDF
    with pytest.raises(ComposeFailed, match=r"attachments\[0\]\.id: an executable"):
        compose(files_event(ref(exe, "a.pdf", "application/pdf")), ACCOUNT, None, now=NOW,
                files=by_hash(exe))


@pytest.mark.parametrize(("field", "value"), [
    ("filename", "x.pdf\r\nBcc: victim@example.net"),
    ("filename", "x.pdf\"\r\n\r\n--boundary"),
    ("filename", "=?utf-8?b?eA0KQmNjOiB2QGV4YW1wbGUubmV0?="),
    ("filename", "a\u2029b.pdf"),
    ("content_type", "application/pdf\r\nBcc: victim@example.net"),
    ("content_type", "multipart/mixed; boundary=x"),
    ("content_id", "logo>\r\nBcc: victim@example.net"),
    ("content_id", "a b"),
    ("filename", "run.exe"),  # the deny list holds past the API too
    ("content_type", "application/x-msdownload"),
])
def test_an_event_that_would_write_headers_is_not_composed(field: str, value: str) -> None:
    # The sender trusts no event: a value the API would have refused fails here too.
    file = ref(PDF, "a.pdf", "application/pdf", "x") | {field: value}
    with pytest.raises(ComposeFailed, match=rf"attachments\[0\]\.{field}"):
        compose(files_event(file, html="<img src=cid:x>"), ACCOUNT, None, now=NOW,
                files=by_hash(PDF))


@pytest.mark.parametrize("name", ["plain.pdf", 'quote".pdf', "back\\slash.pdf", "ünï.pdf",
                                  "日本語の請求書" * 30 + ".pdf", "a;b=c.pdf", "%41.pdf",
                                  "x" * 255])
def test_filenames_read_back_as_given(name: str) -> None:
    params = attachments.filename_params(name)
    head = f"Content-Disposition: attachment;\r\n {params}\r\n\r\n".encode("ascii")
    parsed = email.message_from_bytes(head, policy=policy.default)
    assert parsed.get_filename() == name
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=255))
def test_property_a_name_is_refused_or_reads_back_exactly(name: str) -> None:
    # Whatever text a caller sends: the API's rule refuses it, or the finished message
    # carries exactly that name and nothing else in the part's headers.
    if filerules.filename_problem(name) is not None:
        return
    event = files_event(ref(PNG, name, "image/png"))
    try:
        out = compose(event, ACCOUNT, None, now=NOW, files=by_hash(PNG))
    except ComposeFailed as exc:  # the parse-back check: never silently something else
        pytest.fail(f"a name the API accepts did not compose: {exc}")
    assert all(len(line) <= 998 for line in out.raw.split(b"\r\n"))
    _, attached = parse(out.raw).get_payload()
    assert attached.get_filename() == name
    assert attached.get_payload(decode=True) == PNG


def test_the_file_cache_keeps_recent_files_within_its_size_and_time() -> None:
    now = [0.0]
    cache = attachments.BlobCache(max_bytes=400, ttl=60.0, clock=lambda: now[0])
    cache.put("a", b"a" * 100)
    cache.put("b", b"b" * 100)
    cache.put("big", b"x" * 101)  # over a quarter of the cache: never kept
    assert cache.get("big") is None and cache.size == 200
    assert cache.get("a") == b"a" * 100  # now the most recently used
    cache.put("c", b"c" * 100)
    cache.put("d", b"d" * 100)
    cache.put("e", b"e" * 100)  # over 400 bytes: the least recently used goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.size == 400
    now[0] = 61.0
    assert cache.get("a") is None and cache.size == 300  # kept past its time: read again


class FakePool:
    """A hand-written fake of the pool: each read takes 50 ms (in flight while others
    ask), then answers what `stored` holds of it or raises `fail`; `reads` lists them."""

    def __init__(self, stored: dict[str, bytes], fail: BaseException | None = None):
        self.stored, self.fail = stored, fail
        self.reads: list[list[str]] = []

    @contextlib.asynccontextmanager
    async def connection(self):  # type: ignore[no-untyped-def]
        yield self

    async def execute(self, _sql: str, params: dict[str, Any], binary: bool) -> FakePool:
        self.reads.append(params["sha256s"])
        return self

    async def fetchall(self) -> list[tuple[str, bytes]]:
        await asyncio.sleep(0.05)
        if self.fail is not None:
            raise self.fail
        return [(s, self.stored[s]) for s in self.reads[-1] if s in self.stored]


def test_messages_composed_together_wait_for_one_read_of_a_file() -> None:
    stored = {hashlib.sha256(PDF).hexdigest(): PDF, hashlib.sha256(PNG).hexdigest(): PNG}
    pool = FakePool(stored)
    files = [{"sha256": s} for s in stored] + [{"sha256": "0" * 64}]  # one not stored

    async def main() -> list[dict[str, bytes]]:
        cache = attachments.BlobCache()
        return list(await asyncio.gather(*(attachments.fetch(pool, files, cache)  # type: ignore[arg-type]
                                           for _ in range(5))))

    results = asyncio.run(main())
    assert pool.reads == [sorted(s["sha256"] for s in files)]
    assert all(r == stored for r in results)


def test_a_cancelled_waiter_leaves_the_shared_read_to_the_others() -> None:
    sha = hashlib.sha256(PDF).hexdigest()

    async def main() -> tuple[Any, ...]:
        cache, pool = attachments.BlobCache(), FakePool({sha: PDF})
        tasks = [asyncio.create_task(attachments.fetch(pool, [{"sha256": sha}], cache))
                 for _ in range(3)]
        await asyncio.sleep(0.01)
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return (*done, cache.get(sha))

    reader, cancelled, waiter, kept = asyncio.run(main())
    assert reader == waiter == {sha: PDF} and kept == PDF
    assert isinstance(cancelled, asyncio.CancelledError)


def test_a_failed_shared_read_fails_its_waiters_alike_and_is_not_kept() -> None:
    import psycopg

    sha = hashlib.sha256(PDF).hexdigest()

    async def main() -> tuple[Any, ...]:
        cache = attachments.BlobCache()
        pool = FakePool({sha: PDF}, psycopg.OperationalError("server closed the connection"))
        done = await asyncio.gather(
            *(attachments.fetch(pool, [{"sha256": sha}], cache) for _ in range(3)),
            return_exceptions=True)
        return (*done, cache.get(sha))

    *results, kept = asyncio.run(main())
    assert all(isinstance(r, attachments.StoreUnavailable) for r in results), results
    assert kept is None
