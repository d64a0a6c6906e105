"""SPF, DKIM and DMARC of a sending domain, as Gmail's and Yahoo's bulk-sender rules want them.

DNS goes through dnspython, against the system's resolver or one named
server (`mailbus doctor --dns-server`); tag lists (DKIM, DMARC) are parsed
with dkimpy's own parser. checkdmarc does more (it follows SPF includes and
counts lookups), but its documented options take name servers by address
only, with no port, so a test's DNS server on an unprivileged port could not
answer it; what is decided here is small and pure, and unit-tested.

Alignment is DMARC's relaxed alignment judged without the Public Suffix
List: two names align when one is the other or a subdomain of it, which is
exact for the usual case (mail.example.com signing for example.com) and
never calls two unrelated domains aligned.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import dns.exception
import dns.resolver
from cryptography.hazmat.primitives import serialization
from dkim.util import InvalidTagValueList, parse_tag_value

from mailbus.findings import Finding

TIMEOUT = 5.0


def resolver(server: str | None = None) -> dns.resolver.Resolver:
    """The system's resolver, or one server given as host or host:port."""
    if server is None:
        res = dns.resolver.Resolver()
    else:
        host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [host]
        res.port = int(port) if port else 53
    res.lifetime = res.timeout = TIMEOUT
    return res


def txt(res: dns.resolver.Resolver, name: str) -> list[str]:
    """TXT strings at a name (each record's strings joined); [] when the name has none."""
    try:
        answer = res.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


def aligned(a: str, b: str) -> bool:
    """Relaxed alignment: equal, or one a subdomain of the other."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def judge_spf(records: list[str], kind: str) -> Finding:
    """The SPF verdict from the TXT strings at the From domain."""
    spf = [r for r in records if r.lower().split(" ", 1)[0] == "v=spf1"]
    if not spf:
        return Finding("fail", "no SPF record",
                       "publish a TXT record 'v=spf1 <your senders> ~all' at the From domain")
    if len(spf) > 1:
        return Finding("fail", f"{len(spf)} SPF records (receivers treat that as an error)",
                       "merge them into one v=spf1 record")
    terms = spf[0].lower().split()
    if "+all" in terms or "all" in terms:
        return Finding("fail", f"SPF allows every host: {spf[0]}",
                       "end the record with ~all or -all")
    if kind == "gmail" and "include:_spf.google.com" not in terms:
        return Finding("warn", f"SPF does not include Google: {spf[0]}",
                       "add include:_spf.google.com to the record")
    return Finding("ok", spf[0])


def public_key_der(private_pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo (DER) of a PEM private key, as a DKIM p= tag carries it."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def judge_dkim(records: list[str], name: str, private_pem: bytes | None) -> Finding:
    """The DKIM verdict from the TXT strings at selector._domainkey.domain."""
    if not records:
        return Finding("fail", f"no DKIM key published at {name}",
                       f"publish the public key as TXT 'v=DKIM1; k=rsa; p=...' at {name}")
    try:
        tags = parse_tag_value(records[0].encode())
    except InvalidTagValueList as exc:
        return Finding("fail", f"DKIM record at {name} does not parse: {exc}",
                       "republish it as 'v=DKIM1; k=rsa; p=<base64>'")
    published = tags.get(b"p", b"").replace(b" ", b"")
    if not published:
        return Finding("fail", f"DKIM key at {name} is revoked (empty p=)",
                       "publish the current public key")
    if private_pem is None:
        return Finding("ok", f"key published at {name}")
    try:
        matches = base64.b64decode(published, validate=True) == public_key_der(private_pem)
    except (binascii.Error, ValueError) as exc:
        return Finding("fail", f"DKIM key at {name} or the private key is unreadable: {exc}",
                       "republish the public key derived from dkim_key_file")
    if not matches:
        return Finding("fail", f"the key at {name} is not the public half of dkim_key_file",
                       "publish the public key of dkim_key_file (openssl rsa -pubout)")
    return Finding("ok", f"key at {name} matches dkim_key_file")


def judge_dmarc(records: list[str], where: str, from_domain: str, dkim_domain: str | None
                ) -> Finding:
    """The DMARC verdict from the TXT strings at _dmarc of the From (or its parent) domain."""
    dmarc = [r for r in records if r.replace(" ", "").lower().startswith("v=dmarc1")]
    if not dmarc:
        return Finding("fail", f"no DMARC record at _dmarc.{from_domain}",
                       f"publish TXT 'v=DMARC1; p=none; rua=mailto:...' at _dmarc.{from_domain}")
    try:
        tags = {k.decode().lower(): v.decode() for k, v in
                parse_tag_value(dmarc[0].encode()).items()}
    except InvalidTagValueList as exc:
        return Finding("fail", f"DMARC record at {where} does not parse: {exc}",
                       "republish it as 'v=DMARC1; p=none'")
    if tags.get("p", "").lower() not in ("none", "quarantine", "reject"):
        return Finding("fail", f"DMARC record at {where} has no valid p= tag",
                       "add p=none (or quarantine, reject)")
    if dkim_domain is not None:
        strict = tags.get("adkim", "r").lower() == "s"
        if not (dkim_domain.lower() == from_domain.lower() if strict
                else aligned(dkim_domain, from_domain)):
            return Finding("fail", f"DKIM d={dkim_domain} is not aligned with From "
                           f"{from_domain} ({'strict' if strict else 'relaxed'})",
                           "sign with the From domain (dkim_domain) or a subdomain of it")
    return Finding("ok", f"{where}: {dmarc[0]}")


def dmarc_records(res: dns.resolver.Resolver, domain: str) -> tuple[str, list[str]]:
    """The DMARC record of a domain, falling back to its parents (the organizational domain)."""
    labels = domain.lower().rstrip(".").split(".")
    for i in range(len(labels) - 1):
        name = "_dmarc." + ".".join(labels[i:])
        found = txt(res, name)
        if any(r.replace(" ", "").lower().startswith("v=dmarc1") for r in found):
            return name, found
    return "_dmarc." + domain, []


def check_domain(res: dns.resolver.Resolver, from_domain: str, kind: str,
                 dkim: tuple[str, str, Path | None] | None) -> dict[str, Finding]:
    """SPF, DKIM and DMARC of one From domain; `dkim` is (selector, domain, key file)."""
    out: dict[str, Finding] = {}
    try:
        out["SPF"] = judge_spf(txt(res, from_domain), kind)
        if dkim is None:
            if kind == "gmail":
                out["DKIM"] = Finding("warn", "signed by Google; selector not configured here",
                                      "turn on DKIM for the domain in the Google Admin console")
            else:
                out["DKIM"] = Finding("fail", "the account signs with no DKIM key",
                                      "set dkim_selector, dkim_domain and dkim_key_file")
        else:
            selector, domain, key_file = dkim
            name = f"{selector}._domainkey.{domain}"
            try:
                pem = Path(key_file).read_bytes() if key_file is not None else None
            except OSError as exc:
                out["DKIM"] = Finding("fail", f"dkim_key_file {key_file}: {exc.strerror}",
                                      "make the key file readable by the sender")
            else:
                out["DKIM"] = judge_dkim(txt(res, name), name, pem)
        where, records = dmarc_records(res, from_domain)
        out["DMARC"] = judge_dmarc(records, where, from_domain, dkim[1] if dkim else None)
    except dns.exception.DNSException as exc:
        for what in ("SPF", "DKIM", "DMARC"):
            out.setdefault(what, Finding("fail", f"DNS lookup failed: {exc}",
                                         "check the resolver (--dns-server) and the domain"))
    return out
