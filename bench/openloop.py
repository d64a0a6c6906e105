"""Open-loop HTTP load: requests leave on a fixed schedule, whatever the server's pace.

wrk is closed-loop (a connection sends its next request when the last one is
answered), so a slow server slows the load and hides its own queueing; wrk2,
which paces, is not in Debian. This sends request n at start + n/rate on
the first idle keep-alive connection of a pool (HTTP/1.1, one request per
connection at a time), and measures each latency from its scheduled time, not
from when it could be sent: a request that waited for a connection counts
the wait (no coordinated omission). The pool grows up to `connections`; a
request with none idle waits for one.

Usage (from a benchmark): `offer(url, path, headers, body, rate, seconds)`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Offered:
    """What a run saw: latencies of answered requests (ms), and the failures."""

    rate: float
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    bad_status: int = 0
    errors: int = 0
    late_ms: float = 0.0  # how far behind schedule the generator itself fell at worst

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.used = False

    async def exchange(self, request: bytes) -> int:
        return (await self.exchange_body(request))[0]

    async def exchange_body(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, (await self.reader.readexactly(length) if length else b"")


async def _offer(url: str, path: str, headers: dict[str, str], body: bytes, rate: float,
                 seconds: float, connections: int, expect: int) -> Offered:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = head.encode() + b"\r\n" + body
    out = Offered(rate, seconds)
    idle: list[_Connection] = []
    opened = 0
    freed = asyncio.Condition()

    async def take() -> _Connection:
        nonlocal opened
        async with freed:
            while not idle and opened >= connections:
                await freed.wait()
            if idle:
                return idle.pop()
            opened += 1
        return _Connection(*await asyncio.open_connection(host, port))

    async def give(conn: _Connection | None) -> None:
        nonlocal opened
        async with freed:
            if conn is None:
                opened -= 1
            else:
                idle.append(conn)
            freed.notify()

    async def one(scheduled: float) -> None:
        conn = await take()
        try:
            try:
                status = await conn.exchange(request)
            except (OSError, asyncio.IncompleteReadError):
                if not conn.used:
                    raise
                # The server closed a connection that sat idle past its
                # keep-alive: the request never reached it, send it afresh.
                conn.writer.close()
                conn = _Connection(*await asyncio.open_connection(host, port))
                status = await conn.exchange(request)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            out.errors += 1
            conn.writer.close()
            await give(None)
            return
        conn.used = True
        out.latencies_ms.append((time.perf_counter() - scheduled) * 1000)
        if status != expect:
            out.bad_status += 1
        await give(conn)

    total = int(rate * seconds)
    start = time.perf_counter() + 0.2
    tasks = []
    for n in range(total):
        scheduled = start + n / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            out.late_ms = max(out.late_ms, -delay * 1000)
        tasks.append(asyncio.ensure_future(one(scheduled)))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.writer.close()
    return out


def offer(url: str, path: str, headers: dict[str, str], body: bytes, rate: float,
          seconds: float, connections: int = 256, expect: int = 202) -> Offered:
    """Offer `rate` requests per second for `seconds`; what was seen."""
    import uvloop  # the service's loop too: the generator must cost little

    return uvloop.run(_offer(url, path, headers, body, rate, seconds, connections, expect))


async def _post_all(url: str, path: str, headers: dict[str, str], body: bytes, count: int,
                    connections: int) -> list[tuple[int, bytes]]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = head.encode() + b"\r\n" + body
    answers: list[tuple[int, bytes]] = []
    left = count

    async def client() -> None:
        nonlocal left
        conn = _Connection(*await asyncio.open_connection(host, port))
        while left > 0:
            left -= 1
            answers.append(await conn.exchange_body(request))
        conn.writer.close()

    await asyncio.gather(*(client() for _ in range(min(connections, count))))
    return answers


def post_all(url: str, path: str, headers: dict[str, str], body: bytes, count: int,
             connections: int) -> list[tuple[int, bytes]]:
    """Closed loop: `count` POSTs over `connections` keep-alive connections; (status, body)s."""
    import uvloop

    return uvloop.run(_post_all(url, path, headers, body, count, connections))
