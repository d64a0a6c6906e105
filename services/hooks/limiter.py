"""Who is asking, and whether they may: source addresses behind trusted proxies, token buckets."""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# More hops than any real proxy chain; a longer header is not walked further.
MAX_HOPS = 32


def _parse(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, proxies: Sequence[Network]) -> bool:
    return any(address.version == net.version and address in net for net in proxies)


def source_address(peer: str | None, forwarded_for: Iterable[str],
                   proxies: Sequence[Network]) -> str:
    """The client's address: the socket peer, or, when the peer is a trusted proxy, the
    X-Forwarded-For hop just before the nearest untrusted one (walking from the right)."""
    address = _parse(peer) if peer else None
    if address is None:
        return peer or "unknown"
    if not proxies or not _trusted(address, proxies):
        return str(address)
    hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops[-MAX_HOPS:]):
        parsed = _parse(hop)
        if parsed is None:
            break  # a trusted proxy wrote something we cannot read: stop at that proxy
        address = parsed
        if not _trusted(address, proxies):
            break
    return str(address)


def limiter_key(source: str) -> str:
    """The bucket of an address: IPv6 clients share their /64, which one host can rotate in."""
    parsed = _parse(source)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return source


class RateLimiter:
    """Token buckets per key with bounded memory: the least recently seen keys are dropped."""

    def __init__(self, per_minute: int, burst: int, max_keys: int):
        self.rate, self.burst, self.max_keys = per_minute / 60.0, float(burst), max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """Spend one token; 0 when allowed, else the seconds until one is available."""
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


def retry_after(wait: float) -> str:
    """A Retry-After value in whole seconds, at least 1."""
    return str(max(1, math.ceil(wait)))
