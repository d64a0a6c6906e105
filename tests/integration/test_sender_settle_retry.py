"""PostgreSQL unreachable while messages are being handed over: no settle is given up.

The sender reaches PostgreSQL through a TCP proxy in the test; cutting it
drops every open connection and refuses new ones, as a database that went
away does. Messages the SMTP server took meanwhile must still end `sent` with
their email.sent once the database is back, while the sender lives.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
from prometheus_client import REGISTRY

from mailbus.sender.settings import SenderSettings
from tests.support.kafka import read_all
from tests.support.sender import SenderThread, produce, request, smtp_account
from tests.support.smtp import SmtpServer, free_port

COUNT = 400


class Proxy:
    """Forwards 127.0.0.1:port to PostgreSQL until cut; then refuses and drops everything."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.port = target, free_port()
        self.open = True
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.open = False
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
        self._server.close()


def test_settles_that_fail_are_retried_until_they_land(namespace, tmp_path: Path, admin_kafka,
                                                       registry, admin):
    base = SenderSettings()
    proxy = Proxy((base.postgres.host, base.postgres.port))
    events = [request(to=f"r{i}@example.com", subject=f"n{i}") for i in range(COUNT)]
    wanted = {e["message_id"] for e in events}
    failed_before = REGISTRY.get_sample_value("mailbus_sender_settle_errors_total") or 0.0
    try:
        with SmtpServer() as smtp:
            accounts = tmp_path / "accounts.toml"
            accounts.write_text(smtp_account("dev", smtp.port, rate=100, connections=3))
            settings = SenderSettings(
                accounts_file=accounts, kafka={"topic_prefix": namespace}, metrics_port=0,
                poll_seconds=0.2, link_keys_file=tmp_path / "keys.json",
                postgres={"host": "127.0.0.1", "port": proxy.port}, log_level="WARNING")
            with SenderThread(settings) as thread:
                produce(admin_kafka, namespace + "email.requested", registry, events)
                deadline = time.monotonic() + 120
                while len(smtp.handler.received) < COUNT // 4:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                proxy.cut()
                at_cut = len(smtp.handler.received)
                time.sleep(4)
                proxy.open = True
                assert at_cut < COUNT, "every message went before the cut; nothing was tested"
                with psycopg.connect(admin.postgres.conninfo()) as conn:
                    while True:
                        states = Counter(dict(conn.execute(
                            "SELECT state, count(*) FROM send_ledger WHERE namespace = %s"
                            " GROUP BY state", (namespace,)).fetchall()))
                        if states["sent"] == COUNT:
                            break
                        assert time.monotonic() < deadline, states
                        time.sleep(0.2)
                assert thread.sender is not None
            sent = [registry.decode(m.value())[1]
                    for m in read_all(admin_kafka, namespace + "email.sent", settle=3.0,
                                      timeout=60)]
            received = Counter(m["X-Mailbus-Message-Id"] for m in smtp.handler.messages())
    finally:
        proxy.close()
    # Settles did fail during the cut (and were retried): the fault was real.
    assert (REGISTRY.get_sample_value("mailbus_sender_settle_errors_total") or 0) > failed_before
    assert set(received) == wanted
    assert {e["message_id"] for e in sent} == wanted
    flagged = {e["message_id"] for e in sent if e["possible_duplicate"]}
    assert {m for m, n in received.items() if n > 1} <= flagged
