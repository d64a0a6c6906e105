"""Peak memory of the ingest API and the sender for a message with 10 MiB of files.

Each service runs in a process of its own, against the real Kafka broker and
PostgreSQL of `make infra`; the sender delivers to a local SMTP server
(tests/support/smtp.py, in this process). Peak RSS is VmHWM, which only
grows, so each process is measured first after plain messages (the
baseline, same run, same process) and then after each attachment step:

  ingest   plain messages; then a 10 MiB upload (POST /v1/attachments, raw
           bytes) and a message naming it; then a message carrying 10 MiB
           minus a little inline (base64 in the JSON body)
  sender   plain messages; then one message with the uploaded 10 MiB file

Usage: .venv/bin/python bench/attachments_memory.py [--mib 10]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from servers import children, namespace_and_key, rss_kib, wait_ready  # noqa: E402

from mailbus.ingest.attachment_rules import MAX_INLINE_BYTES  # noqa: E402
from mailbus.settings import ServiceSettings  # noqa: E402
from tests.support.kafka import drop_namespace  # noqa: E402
from tests.support.sender import smtp_account  # noqa: E402
from tests.support.smtp import SmtpServer, free_port  # noqa: E402

PLAIN = {"to": ["ada@example.com"], "subject": "plain", "text": "no files"}


def mib(kib: int) -> float:
    return kib / 1024


def wait_sent(admin: ServiceSettings, prefix: str, count: int) -> None:
    with psycopg.connect(admin.postgres.conninfo(), autocommit=True) as conn:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM send_ledger WHERE namespace = %s"
                               " AND state = 'sent'", (prefix,)).fetchone()
            if row and row[0] >= count:
                return
            time.sleep(0.1)
    raise SystemExit("the sender did not send in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=10, help="MiB of files in the message")
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    admin, prefix, key = namespace_and_key()
    config = admin.kafka.client_config()
    workdir = Path(tempfile.mkdtemp(prefix="mailbus-bench-"))
    headers = {"Authorization": f"Bearer {key.token}"}
    rows: list[tuple[str, str, float]] = []
    pdf = b"%PDF-1.7\n" + os.urandom(size - 9)
    inline = b"%PDF-1.7\n" + os.urandom(min(size, MAX_INLINE_BYTES) - 9)
    with SmtpServer() as smtp:
        accounts = workdir / "accounts.toml"
        accounts.write_text(smtp_account("dev", smtp.port))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "MAILBUS_KAFKA__TOPIC_PREFIX": prefix,
               "MAILBUS_ACCOUNTS_FILE": str(accounts), "MAILBUS_LOG_LEVEL": "WARNING",
               "PYTHONPATH": str(REPO)}
        ingest = subprocess.Popen([sys.executable, str(REPO / "bench" / "serve.py"), "mailbus"],
                                  env={**env, "MAILBUS_PORT": str(port)})
        sender = subprocess.Popen(
            [sys.executable, "-m", "mailbus", "sender"],
            env={**env, "MAILBUS_METRICS_PORT": "0", "MAILBUS_POLL_SECONDS": "0.2",
                 "MAILBUS_LINK_KEYS_FILE": str(workdir / "keys.json")},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url, ingest)
            with httpx.Client(base_url=url, headers=headers, timeout=120) as api:
                for _ in range(20):
                    assert api.post("/v1/messages", json=PLAIN).status_code == 202
                wait_sent(admin, prefix, 20)
                rows.append(("ingest", "20 plain messages (baseline)", mib(rss_kib(ingest.pid))))
                rows.append(("sender", "20 plain messages (baseline)", mib(rss_kib(sender.pid))))
                r = api.post("/v1/attachments", content=pdf,
                             headers={"Content-Type": "application/octet-stream"})
                assert r.status_code == 201, r.text
                file = {"id": r.json()["id"], "filename": "big.pdf",
                        "content_type": "application/pdf"}
                r = api.post("/v1/messages", json=PLAIN | {"attachments": [file]})
                assert r.status_code == 202, r.text
                rows.append(("ingest", f"+ upload of {args.mib} MiB, a message naming it",
                             mib(rss_kib(ingest.pid))))
                wait_sent(admin, prefix, 21)
                rows.append(("sender", f"+ one message with {args.mib} MiB of files",
                             mib(rss_kib(sender.pid))))
                body = PLAIN | {"attachments": [{
                    "filename": "inline.pdf", "content_type": "application/pdf",
                    "content": base64.b64encode(inline).decode()}]}
                r = api.post("/v1/messages", json=body)
                assert r.status_code == 202, r.text
                rows.append(("ingest", f"+ a message with {len(inline) / 2**20:.1f} MiB inline",
                             mib(rss_kib(ingest.pid))))
            wait_sent(admin, prefix, 22)
            rows.append(("sender", f"+ a message with {len(inline) / 2**20:.1f} MiB of files",
                         mib(rss_kib(sender.pid))))
            composer = sum(rss_kib(c) for c in children(sender.pid))
            delivered = [len(r.data) for r in smtp.handler.received]
        finally:
            for proc in (ingest, sender):
                proc.terminate()
                proc.wait(60)
            drop_namespace(config, prefix)
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\npeak RSS (VmHWM) after each step, {os.cpu_count()} cores, load average"
          f" {os.getloadavg()[0]:.1f}; messages on the wire: {max(delivered) / 2**20:.1f} MiB"
          f" at most")
    print(f"{'process':<8} {'after':<48} {'peak RSS MiB':>12} {'over baseline':>13}")
    base = {p: v for p, step, v in rows if "baseline" in step}
    for process, step, value in rows:
        print(f"{process:<8} {step:<48} {value:>12.1f} {value - base[process]:>13.1f}")
    print(f"(the sender's child processes, composer and sandbox: {composer / 1024:.1f} MiB"
          " peak together; files never go to them)")


if __name__ == "__main__":
    main()
