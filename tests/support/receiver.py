"""A webhook receiver: a real HTTP server on a real socket that records what it is sent."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.tls import server_certificate


@dataclass
class Received:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


# path -> (status, extra headers, body, seconds to wait before answering)
Answer = tuple[int, dict[str, str], bytes, float]


class Receiver:
    """Answers each POST as `answer(path, n)` says, n the requests that came before it on
    that path with the same webhook-id (0 for the first try); keeps every request."""

    def __init__(self, answer: Callable[[str, int], Answer] | None = None):
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.answer = answer or (lambda path, n: (200, {}, b"ok", 0.0))
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    n = sum(1 for r in receiver.received if r.path == self.path
                            and r.headers.get("webhook-id") == headers.get("webhook-id"))
                    receiver.received.append(Received(self.path, headers, body))
                status, headers, content, delay = receiver.answer(self.path, n)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except OSError:
                    pass  # the client gave up (a timeout under test)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def https_receiver(folder: Path) -> Iterator[tuple[Receiver, Path]]:
    """A Receiver over TLS whose certificate names `localhost` only; and the CA that signed it."""
    crt, key, ca = server_certificate(folder)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(crt, key)
    with Receiver() as r:
        r.server.socket = context.wrap_socket(r.server.socket, server_side=True)
        yield r, ca
