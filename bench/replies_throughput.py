"""Inbound mail CPU cost: classify, plan and encode, against a baseline in the same run.

What the replies service does to each message it reads, without the I/O around
it: `classify_inbound()` the raw bytes, `plan()` the records, Avro-encode each record
with the registry. The baseline is what any reader of the same mail must at
least do: parse it with the stdlib (`policy.default`), walk the parts and
decode every text part with `get_content()`.

Messages: the unit-test corpus (tests/unit/corpus/inbound: bounces,
complaints, auto-replies, replies in several charsets, HTML, malformed MIME)
and two generated large replies: one with a 1 MB HTML body, one carrying a
5 MB attachment. Each (path, set) runs for D seconds in a fresh process of
its own after one warm-up pass, cycling through the set; printed: messages/s,
per-message latency p50/p95/p99 and the process's peak RSS, then the corpus
per message kind.

Usage: .venv/bin/python bench/replies_throughput.py [--seconds 5]
Needs nothing running: the path measured does no I/O.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CORPUS = REPO / "tests" / "unit" / "corpus" / "inbound"
DOMAINS = ("example.com",)  # whose Message-IDs the corpus' replies reference
OURS = "<a4f5c797-48c5-4cd2-9d37-cfd0e1f20314@example.com>"
SETS = ("corpus", "html 1 MB", "attach 5 MB")
PATHS = ("baseline", "mailbus")

WORDS = ("the agenda for thursday looks fine budget review quarterly figures attached "
         "please confirm seats workshop venue schedule invoice delivery thanks regards "
         "meeting notes follow up customer report draft final version").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _reply_headers(msg: EmailMessage, subject: str) -> None:
    msg["From"] = "Rita Example <rita@example.org>"
    msg["To"] = "Example News <news@example.com>"
    msg["Subject"] = subject
    msg["Date"] = "Mon, 31 Mar 2025 20:20:20 +0200"
    msg["Message-ID"] = "<7F3C2A10-8E4B-4D21-9C5A-0B1D2E3F4A5B@example.org>"
    msg["In-Reply-To"] = OURS
    msg["References"] = OURS


def html_reply(size: int = 1_000_000) -> bytes:
    """A reply written in HTML only, quoting a long newsletter thread: about `size` bytes."""
    rng = random.Random(1)  # noqa: S311 - reproducible filler, not a secret
    chunks = ["<html><head><style>td{padding:4px}</style></head><body>"
              "<p>Count me in, two seats please.</p><blockquote type=\"cite\">"]
    length = sum(map(len, chunks))
    while length < size * 0.95:  # quoted-printable adds a little
        row = (f"<div style=\"font-family:Helvetica,Arial;color:#333\"><p>{_sentence(rng, 40)}"
               f" <a href=\"https://news.example.com/r/{rng.getrandbits(64):x}\">read more</a>"
               f"</p><table><tr><td>{_sentence(rng, 6)}</td><td>{rng.randint(1, 9999)}</td>"
               "</tr></table></div>\n")
        chunks.append(row)
        length += len(row)
    chunks.append("</blockquote></body></html>")
    msg = EmailMessage()
    _reply_headers(msg, "Re: Workshop")
    msg.set_content("".join(chunks), subtype="html", cte="quoted-printable")
    return msg.as_bytes(policy=email.policy.SMTP)


def attachment_reply(size: int = 5 * 1024 * 1024) -> bytes:
    """A short plain reply carrying a `size`-byte binary attachment (base64 on the wire)."""
    msg = EmailMessage()
    _reply_headers(msg, "Re: Invoice 2025-03")
    msg.set_content("Here is the signed copy.\n\nRita\n\nOn Mon, Example News wrote:\n"
                    "> Please sign and return the invoice.\n")
    filler = random.Random(2).randbytes(size)  # noqa: S311 - reproducible, not a secret
    msg.add_attachment(filler, maintype="application",
                       subtype="pdf", filename="invoice-signed.pdf")
    return msg.as_bytes(policy=email.policy.SMTP)


def messages(which: str) -> dict[str, bytes]:
    if which == "corpus":
        return {p.name: p.read_bytes() for p in sorted(CORPUS.glob("*.eml"))}
    if which == "html 1 MB":
        return {"html_1mb_reply": html_reply()}
    return {"attachment_5mb_reply": attachment_reply()}


def baseline() -> Callable[[bytes], object]:
    def read(raw: bytes) -> object:
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        for part in msg.walk():
            if part.get_content_maintype() == "text" and not part.is_multipart():
                try:
                    part.get_content()
                except (LookupError, ValueError):  # unknown charset, broken encoding
                    pass
        return msg

    return read


def mailbus() -> Callable[[bytes], object]:
    from mailbus.codec import Registry
    from mailbus.replies.app import token_check
    from mailbus.replies.classify import classify_inbound
    from mailbus.replies.events import plan
    from mailbus.replytag import verify_tag
    from mailbus.tokens import Keyring

    registry = Registry.load()  # once per service, as in Replies.__init__
    keyring = Keyring({"k1": b"1" * 32}, "k1")  # the key the corpus' reply tag was made with
    check_token, check_tag = partial(token_check, keyring), partial(verify_tag, keyring)
    seq = iter(range(1, 1 << 62))

    def handle(raw: bytes) -> object:
        inbound = classify_inbound(raw, domains=DOMAINS)
        planned = plan(inbound, account_id="dev", source="imap:dev",
                       source_ref=f"imap:1:{next(seq)}", now=datetime.now(UTC),
                       check_token=check_token, check_tag=check_tag)
        return [registry.encode(r.topic, r.value) for r in planned.records]

    return handle


def worker(path: str, which: str, seconds: float) -> None:
    """One (path, set) in this process; prints its samples as JSON."""
    corpus = messages(which)
    handle = baseline() if path == "baseline" else mailbus()
    for raw in corpus.values():  # warm-up: imports, compiled patterns, caches
        handle(raw)
    samples: dict[str, list[int]] = {name: [] for name in corpus}
    items = list(corpus.items())
    clock = time.perf_counter_ns
    start = clock()
    end = start + int(seconds * 1e9)
    count = 0
    while True:
        name, raw = items[count % len(items)]
        t0 = clock()
        handle(raw)
        t1 = clock()
        samples[name].append(t1 - t0)
        count += 1
        if t1 >= end and count >= len(items):
            break
    print(json.dumps({"elapsed_ns": clock() - start, "count": count,
                      "bytes": sum(len(raw) * len(samples[n]) for n, raw in items),
                      "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "samples": samples}))


def run(path: str, which: str, seconds: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--worker", path, which,
                          "--seconds", str(seconds)],
                         capture_output=True, text=True, check=True, timeout=seconds + 300)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def pct(values: list[int], q: float) -> float:
    """The q-th percentile (nearest rank) in ms."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] / 1e6


def kinds() -> dict[str, str]:
    """Corpus file -> what the classifier makes of it."""
    from mailbus.replies.classify import classify_inbound

    return {name: classify_inbound(raw, domains=DOMAINS).kind
            for name, raw in messages("corpus").items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per path and set")
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "SET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, which = args.worker
        worker(path, which, args.seconds)
        return

    results = {(p, s): run(p, s, args.seconds) for s in SETS for p in PATHS}
    sizes = {s: statistics.mean(map(len, messages(s).values())) for s in SETS}

    print(f"\ninbound mail, one process per row, {args.seconds:.0f} s per row,"
          f" {os.cpu_count()} cores")
    print(f"{'set':<12} {'path':<9} {'avg KiB':>8} {'msg/s':>9} {'MB/s':>7} {'p50 ms':>8}"
          f" {'p95 ms':>8} {'p99 ms':>8} {'peak RSS MiB':>12}")
    for (path, which), r in results.items():
        seconds = r["elapsed_ns"] / 1e9
        every = [v for vs in r["samples"].values() for v in vs]
        print(f"{which:<12} {path:<9} {sizes[which] / 1024:>8.1f}"
              f" {r['count'] / seconds:>9.1f}"
              f" {r['bytes'] / seconds / 1e6:>7.1f}"
              f" {pct(every, 50):>8.2f} {pct(every, 95):>8.2f} {pct(every, 99):>8.2f}"
              f" {r['rss_kib'] / 1024:>12.1f}")

    by_kind: dict[str, list[str]] = {}
    for name, kind in kinds().items():
        by_kind.setdefault(kind, []).append(name)
    print("\ncorpus per message kind (the classifier's), median of each message's p50, ms")
    print(f"{'kind':<12} {'messages':>8} {'baseline':>9} {'mailbus':>9} {'ratio':>6}")
    for kind, names in sorted(by_kind.items()):
        medians = {}
        for path in PATHS:
            samples = results[(path, "corpus")]["samples"]
            medians[path] = statistics.median(pct(samples[n], 50) for n in names)
        print(f"{kind:<12} {len(names):>8} {medians['baseline']:>9.3f} {medians['mailbus']:>9.3f}"
              f" {medians['mailbus'] / medians['baseline']:>6.1f}")

    for which in SETS:
        base, ours = results[("baseline", which)], results[("mailbus", which)]
        ratio = (base["count"] / base["elapsed_ns"]) / (
            ours["count"] / ours["elapsed_ns"])
        print(f"{which}: mailbus costs {ratio:.1f}x the baseline's CPU per message")


if __name__ == "__main__":
    main()
