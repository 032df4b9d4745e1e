"""DNS UPDATE (RFC 2136): checks of the request and their application to a zone.

:func:`prescan` runs the checks that need no zone data (sections 3.2 and
3.4.1, "prescan"), so malformed requests are answered before any transaction.
:func:`apply` runs inside the store's write transaction: it checks the
prerequisites against the zone's current records and then applies the update
section, raising :class:`UpdateRejected` to abort the whole transaction.
"""

from __future__ import annotations

import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.serial
import dns.update

from mailstack.bluebook.zonestore import IN, ZoneContent

RT = dns.rdatatype

# Types that may never appear as data in an update (RFC 2136 section 3.4.1.3).
META_TYPES = frozenset({RT.ANY, RT.AXFR, RT.IXFR, RT.MAILA, RT.MAILB, RT.OPT, RT.TSIG, RT.TKEY})


class UpdateRejected(Exception):
    """An update that must be answered with ``rcode`` and change nothing."""

    def __init__(self, rcode: dns.rcode.Rcode, reason: str) -> None:
        super().__init__(reason)
        self.rcode = rcode
        self.reason = reason


def prescan(message: dns.update.UpdateMessage, origin: dns.name.Name) -> None:
    """Check the prerequisite and update sections' form; raise UpdateRejected on the first error."""
    for rrset in message.prerequisite:
        if not rrset.name.is_subdomain(origin):
            raise UpdateRejected(dns.rcode.NOTZONE, f"prerequisite name {rrset.name} is outside zone {origin}")
        if rrset.ttl != 0:
            raise UpdateRejected(dns.rcode.FORMERR, f"prerequisite for {rrset.name} has TTL {rrset.ttl}, not 0")
        if rrset.deleting in (dns.rdataclass.ANY, dns.rdataclass.NONE):
            if len(rrset) != 0:
                raise UpdateRejected(dns.rcode.FORMERR, f"prerequisite of class {rrset.deleting.name} for {rrset.name} has data")
        elif rrset.rdclass != IN:
            raise UpdateRejected(dns.rcode.FORMERR, f"prerequisite for {rrset.name} has class {rrset.rdclass}")
        elif rrset.rdtype in META_TYPES:
            raise UpdateRejected(dns.rcode.FORMERR, f"prerequisite for {rrset.name} has type {rrset.rdtype.name}")

    for rrset in message.update:
        if not rrset.name.is_subdomain(origin):
            raise UpdateRejected(dns.rcode.NOTZONE, f"update name {rrset.name} is outside zone {origin}")
        if rrset.deleting == dns.rdataclass.ANY:
            if rrset.ttl != 0 or len(rrset) != 0 or rrset.rdtype in (RT.AXFR, RT.IXFR, RT.MAILA, RT.MAILB):
                raise UpdateRejected(dns.rcode.FORMERR, f"malformed delete of {rrset.name} {rrset.rdtype.name}")
        elif rrset.deleting == dns.rdataclass.NONE:
            if rrset.ttl != 0 or rrset.rdtype in META_TYPES:
                raise UpdateRejected(dns.rcode.FORMERR, f"malformed record delete at {rrset.name}")
        elif rrset.rdclass != IN:
            raise UpdateRejected(dns.rcode.FORMERR, f"update for {rrset.name} has class {rrset.rdclass}")
        elif rrset.rdtype in META_TYPES:
            raise UpdateRejected(dns.rcode.FORMERR, f"update for {rrset.name} adds type {rrset.rdtype.name}")


def apply(content: ZoneContent, message: dns.update.UpdateMessage) -> int:
    """Check the prerequisites, then apply the updates to ``content``; return the RRs touched."""
    _check_prerequisites(content, message)
    touched = 0
    for rrset in message.update:
        if rrset.deleting is None:
            touched += _add(content, rrset)
        elif rrset.deleting == dns.rdataclass.ANY:
            touched += _delete_rrsets(content, rrset.name, rrset.rdtype)
        else:
            touched += _delete_records(content, rrset)
    return touched


def _check_prerequisites(content: ZoneContent, message: dns.update.UpdateMessage) -> None:
    for rrset in message.prerequisite:
        name = rrset.name
        in_use = bool(content.types_at(name))
        if rrset.deleting == dns.rdataclass.ANY:
            if rrset.rdtype == RT.ANY:
                if not in_use:
                    raise UpdateRejected(dns.rcode.NXDOMAIN, f"prerequisite failed: {name} is not in use")
            elif content.get(name, rrset.rdtype) is None:
                raise UpdateRejected(dns.rcode.NXRRSET, f"prerequisite failed: no {rrset.rdtype.name} RRset at {name}")
        elif rrset.deleting == dns.rdataclass.NONE:
            if rrset.rdtype == RT.ANY:
                if in_use:
                    raise UpdateRejected(dns.rcode.YXDOMAIN, f"prerequisite failed: {name} is in use")
            elif content.get(name, rrset.rdtype) is not None:
                raise UpdateRejected(dns.rcode.YXRRSET, f"prerequisite failed: {rrset.rdtype.name} RRset at {name} exists")
        else:
            current = content.get(name, rrset.rdtype)
            if current is None or set(current) != set(rrset):
                raise UpdateRejected(
                    dns.rcode.NXRRSET, f"prerequisite failed: {rrset.rdtype.name} RRset at {name} differs"
                )


def _copy(rdataset: dns.rdataset.Rdataset | None, rdtype: dns.rdatatype.RdataType, ttl: int) -> dns.rdataset.Rdataset:
    new = dns.rdataset.Rdataset(IN, rdtype, ttl=ttl)
    for rdata in rdataset or ():
        new.add(rdata)
    return new


def _add(content: ZoneContent, rrset: dns.rrset.RRset) -> int:
    """Add RRs (RFC 2136 section 3.4.2.2); return how many were applied."""
    name, rdtype = rrset.name, rrset.rdtype
    types = content.types_at(name)
    if rdtype == RT.SOA:
        if name != content.origin:
            return 0
        new_serial = rrset[0].serial
        if not dns.serial.Serial(new_serial) > dns.serial.Serial(content.serial):
            return 0
        content.put(name, _single(rrset))
        return 1
    if rdtype == RT.CNAME:
        if any(t != RT.CNAME for t in types):
            return 0
        content.put(name, _single(rrset))
        return 1
    if RT.CNAME in types:
        return 0
    rdataset = _copy(content.get(name, rdtype), rdtype, rrset.ttl)
    for rdata in rrset:
        rdataset.add(rdata)
    content.put(name, rdataset)
    return len(rrset)


def _single(rrset: dns.rrset.RRset) -> dns.rdataset.Rdataset:
    """Return a one-record rdataset from the last RR given (SOA and CNAME are singletons)."""
    new = dns.rdataset.Rdataset(IN, rrset.rdtype, ttl=rrset.ttl)
    new.add(list(rrset)[-1])
    return new


def _delete_rrsets(content: ZoneContent, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> int:
    """Delete one RRset, or all RRsets at ``name`` for type ANY; the apex keeps its SOA and NS."""
    protected = (RT.SOA, RT.NS) if name == content.origin else ()
    if rdtype == RT.ANY:
        count = 0
        for existing in content.types_at(name):
            if existing not in protected:
                content.delete(name, existing)
                count += 1
        return count
    if rdtype in protected:
        return 0
    return 1 if content.delete(name, rdtype) else 0


def _delete_records(content: ZoneContent, rrset: dns.rrset.RRset) -> int:
    """Delete single RRs; the apex SOA stays, and so does its last NS record."""
    name, rdtype = rrset.name, rrset.rdtype
    if name == content.origin and rdtype == RT.SOA:
        return 0
    current = content.get(name, rdtype)
    if current is None:
        return 0
    remaining = _copy(current, rdtype, current.ttl)
    count = 0
    for rdata in rrset:
        if rdata in remaining:
            if name == content.origin and rdtype == RT.NS and len(remaining) == 1:
                continue
            remaining.discard(rdata)
            count += 1
    content.put(name, remaining)
    return count
