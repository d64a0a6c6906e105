"""Where a webhook may go: the URL's form, and the address it resolves to (SSRF guard).

A URL names a host; the host is resolved once per attempt, every address it
resolves to is checked, and the connection is made to the checked address
itself (`client.py`), so a DNS answer that changes between the check and the
connect (rebinding) cannot steer a delivery elsewhere. Loopback, private,
link-local (cloud metadata at 169.254.169.254 included), shared (CGNAT),
reserved and multicast addresses are refused unless the operator lists
their network in `allowed_networks`; the unspecified address and multicast
are refused always.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from mailbus.errors import MailbusError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_URL_LENGTH = 2048


class Refused(MailbusError):
    """A webhook URL or address the policy does not allow."""


@dataclass(frozen=True)
class Policy:
    """The operator's rules: plain HTTP or not, and networks allowed despite being non-public."""

    allow_http: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class Target:
    """A checked URL, split into what the connection needs."""

    scheme: str
    host: str  # as written, IDNA-encoded for the wire
    port: int
    path: str  # path and query, at least "/"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return shown if self.port == default else f"{shown}:{self.port}"


def check_url(url: str, policy: Policy) -> Target:
    """The URL's parts; Refused (naming what is wrong) when it may not be used."""
    if len(url) > MAX_URL_LENGTH:
        raise Refused(f"longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise Refused("contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused(f"not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme != "https" and not (scheme == "http" and policy.allow_http):
        raise Refused("must be https" + ("" if policy.allow_http else
                                         " (plain http is not allowed here)"))
    if parts.username is not None or parts.password is not None:
        raise Refused("must not carry a user name or password")
    host = parts.hostname
    if not host:
        raise Refused("has no host")
    try:
        host = host.encode("idna").decode("ascii") if not _is_ip(host) else host
    except UnicodeError:
        raise Refused("host is not a valid domain name") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, host, port or (443 if scheme == "https" else 80), path)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_address(address: IPAddress, policy: Policy) -> None:
    """Refused unless the address is public, or in a network the operator allows."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if address.is_unspecified or address.is_multicast:
        raise Refused(f"address {address} may never be a webhook target")
    if any(address in net for net in policy.allowed_networks):
        return
    if not address.is_global:
        raise Refused(f"address {address} is not public (loopback, private, link-local,"
                      " shared or reserved) and not in allowed_networks")


def check_addresses(addresses: Sequence[str], policy: Policy) -> str:
    """The address to connect to: the first, once every one of them passed."""
    if not addresses:
        raise Refused("the host resolves to no address")
    for text in addresses:
        check_address(ipaddress.ip_address(text.split("%", 1)[0]), policy)
    return addresses[0]


# host, port -> the addresses it resolves to, in the order to try them.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of a host name, from the system's resolver."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Refused(f"cannot resolve {host}: {exc.strerror or exc}") from None
    seen: list[str] = []
    for info in infos:
        text = str(info[4][0])
        if text not in seen:
            seen.append(text)
    return seen


async def resolve(target: Target, policy: Policy, resolver: Resolver = system_resolver) -> str:
    """Resolve the host once and check every address; the address to connect to."""
    if _is_ip(target.host):
        return check_addresses([target.host], policy)
    return check_addresses(await resolver(target.host, target.port), policy)
