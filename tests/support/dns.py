"""A DNS server for the tests: UDP on 127.0.0.1, answering TXT queries from a dict.

Built on dnspython's message API (parse the query, make_response, add an
RRset), so every answer is a real DNS message over a real socket; names not
in the zone get NXDOMAIN, other types an empty answer.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def _chunks(text: str) -> str:
    # One TXT record may hold several strings of at most 255 bytes (RFC 1035).
    parts = [text[i:i + 255] for i in range(0, len(text), 255)] or [""]
    return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)


class DnsServer:
    """Context manager: serves `zone` ({name: [TXT strings]}), changeable while running."""

    def __init__(self, zone: dict[str, list[str]] | None = None):
        self.zone = {k.lower().rstrip("."): v for k, v in (zone or {}).items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.queries: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stop = threading.Event()

    def _answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        self.queries.append(name)
        if name not in self.zone:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT:
            response.answer.append(dns.rrset.from_text_list(
                question.name, 60, dns.rdataclass.IN, dns.rdatatype.TXT,
                [_chunks(t) for t in self.zone[name]]))
        return response.to_wire()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sock.sendto(self._answer(wire), peer)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
