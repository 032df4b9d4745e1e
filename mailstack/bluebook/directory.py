"""In-memory zones and the authoritative lookup that fills a response.

A :class:`Directory` is built from one store snapshot and never changes; the
server swaps in a new one after every change. Lookup follows RFC 1034 section
4.3.2. Zone cuts give referrals, CNAMEs are followed inside the zone and
wildcards (RFC 4592) are synthesized. A missing name gets NXDOMAIN and a name
without the requested type gets NODATA, both with the SOA for negative caching
as RFC 2308 describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from mailstack.bluebook.zonestore import Snapshot, ZoneContent

IN = dns.rdataclass.IN
RT = dns.rdatatype
WILDCARD = dns.name.Name((b"*",))

# Longest CNAME chain followed inside our own zones before answering with what we have.
MAX_CNAME_CHAIN = 8

# The synthesized answer to QTYPE=ANY that RFC 8482 section 4.2 describes.
ANY_HINFO = dns.rdata.from_text(IN, RT.HINFO, '"RFC8482" ""')


@dataclass
class Zone:
    """One zone, ready for lookups: RRsets by owner and type, and every existing name."""

    origin: dns.name.Name
    nodes: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = field(default_factory=dict)
    # Owner names plus empty non-terminals: names with no records but with descendants.
    names: set[dns.name.Name] = field(default_factory=set)
    # Owner names of NS records below the apex: the zone's delegation points.
    cuts: set[dns.name.Name] = field(default_factory=set)

    @classmethod
    def from_content(cls, content: ZoneContent) -> Zone:
        zone = cls(content.origin)
        for (owner, rdtype), rdataset in content.rdatasets.items():
            rrset = dns.rrset.RRset(owner, IN, rdtype)
            rrset.update(rdataset)
            zone.nodes.setdefault(owner, {})[int(rdtype)] = rrset
            name = owner
            while name != zone.origin and name not in zone.names:
                zone.names.add(name)
                name = name.parent()
            if rdtype == RT.NS and owner != zone.origin:
                zone.cuts.add(owner)
        zone.names.add(zone.origin)
        return zone

    @property
    def soa(self) -> dns.rrset.RRset:
        return self.nodes[self.origin][RT.SOA]

    def negative_soa(self) -> dns.rrset.RRset:
        """Return the SOA for a negative answer, its TTL capped by the minimum field (RFC 2308)."""
        soa = self.soa
        rrset = dns.rrset.RRset(self.origin, IN, RT.SOA)
        rrset.add(soa[0], min(soa.ttl, soa[0].minimum))
        return rrset

    def find_cut(self, qname: dns.name.Name) -> dns.name.Name | None:
        """Return the highest delegation point at or above ``qname``, if any."""
        if not self.cuts:
            return None
        labels = len(qname) - len(self.origin)
        for depth in range(1, labels + 1):
            _prefix, candidate = qname.split(len(self.origin) + depth)
            if candidate in self.cuts:
                return candidate
        return None

    def rrsets_in_order(self) -> list[dns.rrset.RRset]:
        """Return every RRset, SOA first (the order of a zone transfer without its closing SOA)."""
        result = [self.soa]
        for owner in sorted(self.nodes):
            for rdtype, rrset in sorted(self.nodes[owner].items()):
                if not (owner == self.origin and rdtype == RT.SOA):
                    result.append(rrset)
        return result


class Directory:
    """Every zone of one snapshot, and the lookups on them."""

    def __init__(self, zones: dict[dns.name.Name, Zone], generation: int = 0) -> None:
        self.zones = zones
        self.generation = generation

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> Directory:
        return cls({origin: Zone.from_content(content) for origin, content in snapshot.zones.items()}, snapshot.generation)

    def find_zone(self, qname: dns.name.Name) -> Zone | None:
        """Return the zone with the longest origin that contains ``qname``."""
        name = qname
        while True:
            zone = self.zones.get(name)
            if zone is not None:
                return zone
            if len(name) <= 1:
                return None
            name = name.parent()

    def addresses(self, host: dns.name.Name) -> list[dns.rrset.RRset]:
        zone = self.find_zone(host)
        if zone is None or zone.find_cut(host) not in (None, host):
            return []
        node = zone.nodes.get(host, {})
        return [node[rdtype] for rdtype in (RT.A, RT.AAAA) if rdtype in node]

    def answer(self, qname: dns.name.Name, qtype: int, response: dns.message.Message) -> None:
        """Fill ``response`` with the authoritative answer for ``qname``/``qtype`` (class IN).

        Sets the rcode, AA and the answer, authority and additional sections.
        """
        zone = self.find_zone(qname)
        if zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            return
        response.flags |= dns.flags.AA
        for _step in range(MAX_CNAME_CHAIN + 1):
            target = self._answer_in_zone(zone, qname, qtype, response)
            if target is None:
                return
            zone_of_target = self.find_zone(target)
            if zone_of_target is None:
                return
            zone, qname = zone_of_target, target

    def _answer_in_zone(
        self, zone: Zone, qname: dns.name.Name, qtype: int, response: dns.message.Message
    ) -> dns.name.Name | None:
        """Answer from one zone; return a CNAME target to follow next, or None when done."""
        cut = zone.find_cut(qname)
        if cut is not None and not (qtype == RT.DS and cut == qname):
            self._refer(zone, cut, response)
            return None

        node = zone.nodes.get(qname)
        owner = qname
        if node is None:
            if qname in zone.names:
                response.authority.append(zone.negative_soa())
                return None
            node = self._wildcard(zone, qname)
            if node is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(zone.negative_soa())
                return None

        if qtype == RT.ANY:
            rrset = dns.rrset.RRset(owner, IN, RT.HINFO)
            rrset.add(ANY_HINFO, zone.soa.ttl)
            response.answer.append(rrset)
            return None
        if qtype in node:
            rrset = self._owned(node[qtype], owner)
            response.answer.append(rrset)
            self._add_additional(rrset, response)
            return None
        if RT.CNAME in node:
            cname = self._owned(node[RT.CNAME], owner)
            response.answer.append(cname)
            target = cname[0].target
            if any(rrset.name == target and rrset.rdtype == RT.CNAME for rrset in response.answer):
                return None  # a loop: answer with the chain so far
            return target
        response.authority.append(zone.negative_soa())
        return None

    @staticmethod
    def _owned(rrset: dns.rrset.RRset, owner: dns.name.Name) -> dns.rrset.RRset:
        """Return ``rrset`` with ``owner`` as its name (for wildcard synthesis)."""
        if rrset.name == owner:
            return rrset
        copy = dns.rrset.RRset(owner, rrset.rdclass, rrset.rdtype)
        copy.update(rrset)
        return copy

    @staticmethod
    def _wildcard(zone: Zone, qname: dns.name.Name) -> dict[int, dns.rrset.RRset] | None:
        """Return the wildcard node that synthesizes ``qname`` (RFC 4592 section 3.3.1), if any."""
        encloser = qname.parent()
        while encloser not in zone.names:
            if encloser == zone.origin:
                break
            encloser = encloser.parent()
        return zone.nodes.get(WILDCARD.concatenate(encloser))

    def _refer(self, zone: Zone, cut: dns.name.Name, response: dns.message.Message) -> None:
        """Answer with a referral to the delegated zone at ``cut``; a referral is not authoritative."""
        if not response.answer:
            response.flags &= ~dns.flags.AA
        ns = zone.nodes[cut][RT.NS]
        response.authority.append(ns)
        for rdata in ns:
            if rdata.target.is_subdomain(zone.origin):
                node = zone.nodes.get(rdata.target, {})
                for rdtype in (RT.A, RT.AAAA):
                    if rdtype in node:
                        response.additional.append(node[rdtype])

    def _add_additional(self, rrset: dns.rrset.RRset, response: dns.message.Message) -> None:
        """Add the addresses of MX, SRV and NS targets that we serve (RFC 1035 section 3.3.9)."""
        if rrset.rdtype == RT.MX:
            hosts = [rdata.exchange for rdata in rrset]
        elif rrset.rdtype == RT.SRV:
            hosts = [rdata.target for rdata in rrset if rdata.target != dns.name.root]
        elif rrset.rdtype == RT.NS:
            hosts = [rdata.target for rdata in rrset]
        else:
            return
        seen = set()
        for host in hosts:
            if host in seen:
                continue
            seen.add(host)
            response.additional.extend(self.addresses(host))
