"""The records that describe one mail domain: SOA, NS, MX, addresses, SRV and SPF.

``bluebook add`` builds a new zone from a :class:`MailDomain`; ``bluebook
update`` applies the parts an operator gave to an existing zone.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field

import dns.name
import dns.rdataset
import dns.rdatatype

from mailstack.bluebook.config import ZoneSection
from mailstack.bluebook.zonestore import IN, ZoneContent, ZoneStoreError, parse_rdata, to_name

DEFAULT_SPF = "v=spf1 mx -all"

# Mail service SRV records of RFC 6186 and RFC 8314, with their standard ports.
SRV_SERVICES = {
    "submission": ("_submission._tcp", 587),
    "submissions": ("_submissions._tcp", 465),
    "imap": ("_imap._tcp", 143),
    "imaps": ("_imaps._tcp", 993),
}


@dataclass
class MailDomain:
    """Options of ``bluebook add`` and ``bluebook update`` for one mail domain.

    ``None`` means "not given": ``add`` uses the default, ``update`` keeps the
    current records.
    """

    domain: dns.name.Name
    mx: list[tuple[int, dns.name.Name]] | None = None
    addresses: list[str] | None = None
    srv_target: dns.name.Name | None = None
    # Service name -> port; 0 removes that SRV record.
    ports: dict[str, int] = field(default_factory=dict)
    spf: str | None = None
    no_spf: bool = False
    nameservers: list[dns.name.Name] | None = None
    ns_addresses: list[str] | None = None
    ttl: int | None = None


def parse_mx(values: list[str]) -> list[tuple[int, dns.name.Name]]:
    """Parse ``--mx`` values ``HOST`` or ``PREFERENCE:HOST``; plain hosts get 10, 20, ..."""
    result = []
    for index, value in enumerate(values):
        preference = 10 * (index + 1)
        host = value
        if ":" in value:
            text, host = value.split(":", 1)
            try:
                preference = int(text)
            except ValueError:
                raise ZoneStoreError(f"invalid MX preference in {value!r}: expected PREFERENCE:HOST") from None
            if not 0 <= preference <= 65535:
                raise ZoneStoreError(f"MX preference {preference} in {value!r} is outside 0-65535")
        result.append((preference, to_name(host)))
    return result


def check_addresses(values: list[str]) -> list[str]:
    result = []
    for value in values:
        try:
            result.append(str(ipaddress.ip_address(value.strip())))
        except ValueError:
            raise ZoneStoreError(f"invalid IP address {value!r}") from None
    return result


def address_rdatasets(addresses: list[str], ttl: int) -> dict[dns.rdatatype.RdataType, dns.rdataset.Rdataset]:
    """Group addresses into an A and an AAAA rdataset."""
    result: dict[dns.rdatatype.RdataType, dns.rdataset.Rdataset] = {}
    for address in addresses:
        rdtype = dns.rdatatype.A if ipaddress.ip_address(address).version == 4 else dns.rdatatype.AAAA
        rdataset = result.setdefault(rdtype, dns.rdataset.Rdataset(IN, rdtype, ttl=ttl))
        rdataset.add(parse_rdata(rdtype, address), ttl)
    return result


def _relative_or_absolute(text: str, origin: dns.name.Name) -> dns.name.Name:
    """Read a configured host name: ``label`` is inside the zone, ``host.example.`` is absolute."""
    return dns.name.from_text(text, origin=origin)


def _rdataset(rdtype: dns.rdatatype.RdataType, ttl: int, texts: list[str]) -> dns.rdataset.Rdataset:
    rdataset = dns.rdataset.Rdataset(IN, rdtype, ttl=ttl)
    for text in texts:
        rdataset.add(parse_rdata(rdtype, text), ttl)
    return rdataset


def put_addresses(content: ZoneContent, host: dns.name.Name, addresses: list[str], ttl: int) -> None:
    if not host.is_subdomain(content.origin):
        raise ZoneStoreError(
            f"host {host} is outside zone {content.origin}, so its addresses belong in that host's own zone"
        )
    grouped = address_rdatasets(addresses, ttl)
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        content.delete(host, rdtype)
        if rdtype in grouped:
            content.put(host, grouped[rdtype])


def _spf_texts(content: ZoneContent) -> tuple[list[str], list[str]]:
    """Split the apex TXT records into (SPF texts, other texts)."""
    spf, other = [], []
    rdataset = content.get(content.origin, dns.rdatatype.TXT)
    for rdata in rdataset or ():
        text = rdata.to_text()
        joined = b"".join(rdata.strings).decode("utf-8", "replace")
        (spf if joined.lower().startswith("v=spf1") else other).append(text)
    return spf, other


def _quote(text: str) -> str:
    """Render ``text`` as TXT presentation data in 255-byte strings."""
    data = text.encode("utf-8")
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    parts = []
    for chunk in chunks:
        escaped = chunk.decode("utf-8").replace("\\", "\\\\").replace('"', '\\"')
        parts.append(f'"{escaped}"')
    return " ".join(parts)


def build_zone(spec: MailDomain, defaults: ZoneSection, listen: tuple[str, ...]) -> ZoneContent:
    """Build the records of a new mail domain zone from ``spec`` and the [zone] defaults."""
    origin = spec.domain
    ttl = defaults.ttl if spec.ttl is None else spec.ttl
    content = ZoneContent(origin)

    nameservers = spec.nameservers or [_relative_or_absolute(defaults.nameserver, origin)]
    hostmaster = _relative_or_absolute(defaults.hostmaster, origin)
    serial = int(time.time()) % 2**32
    soa_text = (
        f"{nameservers[0]} {hostmaster} {serial} {defaults.refresh} {defaults.retry} "
        f"{defaults.expire} {defaults.negative_ttl}"
    )
    content.put(origin, _rdataset(dns.rdatatype.SOA, ttl, [soa_text]))
    content.put(origin, _rdataset(dns.rdatatype.NS, ttl, [str(ns) for ns in nameservers]))
    if spec.ns_addresses is not None:
        ns_addresses = spec.ns_addresses
    else:
        # A wildcard listen address (0.0.0.0 or ::) names no host, so it makes no glue.
        ns_addresses = [address for address in listen if not ipaddress.ip_address(address).is_unspecified]
    for ns in nameservers:
        if ns.is_subdomain(origin) and ns_addresses:
            put_addresses(content, ns, check_addresses(ns_addresses), ttl)

    mx = spec.mx or [(10, dns.name.Name(("mx",)).concatenate(origin))]
    spec = MailDomain(**{**spec.__dict__, "mx": mx})
    apply_mail_parts(content, spec, ttl, creating=True)
    return content


def apply_mail_parts(content: ZoneContent, spec: MailDomain, ttl: int, *, creating: bool) -> None:
    """Write the MX, address, SRV and SPF parts that ``spec`` gives into ``content``."""
    origin = content.origin
    if spec.mx is not None:
        content.put(origin, _rdataset(dns.rdatatype.MX, ttl, [f"{pref} {host}" for pref, host in spec.mx]))
    mx_rdataset = content.get(origin, dns.rdatatype.MX)
    first_host = None
    if mx_rdataset:
        first_host = min(mx_rdataset, key=lambda rdata: (rdata.preference, rdata.exchange)).exchange

    if spec.addresses is not None:
        if first_host is None:
            raise ZoneStoreError(f"zone {origin} has no MX record to give --address to; add --mx")
        put_addresses(content, first_host, check_addresses(spec.addresses), ttl)
    elif (creating or spec.mx is not None) and first_host is not None and first_host.is_subdomain(origin):
        if not content.get(first_host, dns.rdatatype.A) and not content.get(first_host, dns.rdatatype.AAAA):
            raise ZoneStoreError(f"mail host {first_host} is inside zone {origin}; give its address with --address")

    target = spec.srv_target or first_host
    retarget = spec.srv_target is not None or spec.mx is not None
    for service, (label, standard_port) in SRV_SERVICES.items():
        owner = dns.name.from_text(label, origin=origin)
        current = content.get(owner, dns.rdatatype.SRV)
        port = spec.ports.get(service)
        if port is None and creating:
            port = standard_port
        if port is None and current and retarget and target is not None:
            port = int(current[0].port)
        if port is None:
            continue
        if port == 0:
            content.delete(owner, dns.rdatatype.SRV)
            continue
        if target is None:
            raise ZoneStoreError(f"zone {origin} has no MX host to point the SRV records at; give --srv-target")
        content.put(owner, _rdataset(dns.rdatatype.SRV, ttl, [f"0 1 {port} {target}"]))

    if spec.no_spf or spec.spf is not None or creating:
        _spf, other = _spf_texts(content)
        texts = list(other)
        if not spec.no_spf:
            texts.append(_quote(spec.spf if spec.spf is not None else DEFAULT_SPF))
        content.delete(origin, dns.rdatatype.TXT)
        if texts:
            content.put(origin, _rdataset(dns.rdatatype.TXT, ttl, texts))


def describe(content: ZoneContent) -> dict[str, object]:
    """Summarise a mail domain zone for ``bluebook show`` and ``bluebook list``."""
    origin = content.origin
    mx = content.get(origin, dns.rdatatype.MX)
    hosts = sorted(mx or (), key=lambda rdata: rdata.preference)
    addresses: list[str] = []
    for rdata in hosts:
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for address in content.get(rdata.exchange, rdtype) or ():
                addresses.append(address.to_text())
    ports = {}
    for service, (label, _port) in SRV_SERVICES.items():
        srv = content.get(dns.name.from_text(label, origin=origin), dns.rdatatype.SRV)
        if srv:
            ports[service] = int(srv[0].port)
    spf, _other = _spf_texts(content)
    return {
        "domain": origin.to_text(omit_final_dot=True),
        "serial": content.serial,
        "mx": [f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True)}" for rdata in hosts],
        "addresses": addresses,
        "ports": ports,
        "spf": spf,
    }
