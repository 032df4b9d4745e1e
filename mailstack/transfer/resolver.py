"""Finding the hosts that receive mail for a domain (RFC 5321 section 5, RFC 7505).

The rules, in order:

* MX records sorted by preference, with hosts of equal preference shuffled
  so that load spreads across them.
* A null MX (a single MX record whose exchange is the root ".") means the
  domain accepts no mail: permanent failure 5.1.10.
* No MX records but an A or AAAA record: the domain itself is the only host
  (the "implicit MX").
* NXDOMAIN: permanent failure 5.1.2. A domain or MX host without any address
  record: permanent failure 5.4.4.
* SERVFAIL, REFUSED from every server, or a timeout: temporary failure 4.4.3,
  retried later.

Answers, positive and negative, are cached for their TTL, measured with the
injected clock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from mailstack.store.models import utcnow

log = logging.getLogger(__name__)

# Negative answers without an SOA carry no TTL; they are not cached at all.
MAX_NEGATIVE_TTL = 3600
# Cached record sets kept at most; expired ones are dropped first when it is reached.
MAX_CACHE_ENTRIES = 10_000


class DNSFailure(Exception):
    """A domain cannot be routed now; ``status`` is the RFC 3463 code for the DSN."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


class PermanentDNSFailure(DNSFailure):
    pass


class TemporaryDNSFailure(DNSFailure):
    pass


@dataclass(frozen=True)
class MailHost:
    """One host that receives mail for a domain, with its addresses."""

    name: str
    preference: int
    addresses: tuple[str, ...]
    implicit: bool = False


@dataclass(frozen=True)
class _Answer:
    names: tuple[str, ...]  # MX exchanges as "preference name", or addresses
    expires: dt.datetime


class _Nonexistent(Exception):
    """NXDOMAIN for a cached name."""


class _NoData(Exception):
    """The name exists but has no record of the requested type."""


class MXResolver:
    """Resolve recipient domains to ordered mail hosts with dnspython's async resolver.

    ``nameservers`` empty means the system configuration (/etc/resolv.conf).
    """

    def __init__(
        self,
        nameservers: tuple[str, ...] = (),
        *,
        port: int = 53,
        timeout: float = 5.0,
        clock: Callable[[], dt.datetime] = utcnow,
        shuffle: Callable[[list], None] = random.shuffle,
    ) -> None:
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = list(nameservers)
            resolver.port = port
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.timeout = timeout
        resolver.lifetime = timeout
        self._resolver = resolver
        self._clock = clock
        self._shuffle = shuffle
        self._cache: dict[tuple[str, int], _Answer | tuple[type[Exception], dt.datetime]] = {}

    async def resolve(self, domain: str) -> list[MailHost]:
        """Return the mail hosts of ``domain`` in the order to try them; raise DNSFailure."""
        domain = domain.rstrip(".").lower()
        try:
            exchanges = await self._lookup(domain, dns.rdatatype.MX)
        except _Nonexistent:
            raise PermanentDNSFailure("5.1.2", f"domain {domain} does not exist (NXDOMAIN)") from None
        except _NoData:
            addresses = await self._addresses(domain)
            if not addresses:
                raise PermanentDNSFailure(
                    "5.4.4", f"domain {domain} has no MX, A or AAAA record"
                ) from None
            return [MailHost(domain, 0, addresses, implicit=True)]

        records = []
        for text in exchanges:
            preference, _, name = text.partition(" ")
            records.append((int(preference), "" if name == "." else name))
        if len(records) == 1 and records[0][1] == "":
            raise PermanentDNSFailure("5.1.10", f"domain {domain} accepts no mail (null MX, RFC 7505)")
        # A root exchange among real ones is a broken zone; the real ones still count.
        records = [(preference, name) for preference, name in records if name]

        hosts: list[MailHost] = []
        temporary: list[str] = []
        for preference in sorted({p for p, _ in records}):
            names = [name for p, name in records if p == preference]
            self._shuffle(names)
            for name in names:
                try:
                    addresses = await self._addresses(name)
                except TemporaryDNSFailure as exc:
                    temporary.append(exc.text)
                    continue
                if addresses:
                    hosts.append(MailHost(name, preference, addresses))
                else:
                    log.warning("MX host %s of %s has no address record", name, domain)
        if hosts:
            return hosts
        if temporary:
            raise TemporaryDNSFailure("4.4.3", f"no address for the MX hosts of {domain}: {temporary[0]}")
        raise PermanentDNSFailure("5.4.4", f"no MX host of {domain} has an address record")

    async def _addresses(self, name: str) -> tuple[str, ...]:
        """Return the IPv6 and IPv4 addresses of ``name``; raise TemporaryDNSFailure."""
        results = await asyncio.gather(
            self._lookup_or_empty(name, dns.rdatatype.AAAA),
            self._lookup_or_empty(name, dns.rdatatype.A),
            return_exceptions=True,
        )
        addresses: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            addresses.extend(result)
        return tuple(addresses)

    async def _lookup_or_empty(self, name: str, rdtype: int) -> tuple[str, ...]:
        try:
            return await self._lookup(name, rdtype)
        except (_Nonexistent, _NoData):
            return ()

    async def _lookup(self, name: str, rdtype: int) -> tuple[str, ...]:
        """Return the records of one type as text; raise _Nonexistent, _NoData or TemporaryDNSFailure."""
        key = (name, rdtype)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None:
            if isinstance(cached, _Answer):
                if cached.expires > now:
                    return cached.names
            elif cached[1] > now:
                raise cached[0]()
            del self._cache[key]

        type_name = dns.rdatatype.to_text(rdtype)
        qname = dns.name.from_text(name)
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            self._cache_negative(key, _Nonexistent, _negative_ttl(exc.response(qname)), now)
            raise _Nonexistent() from None
        except dns.resolver.NoAnswer as exc:
            self._cache_negative(key, _NoData, _negative_ttl(exc.response()), now)
            raise _NoData() from None
        except dns.resolver.NoNameservers as exc:
            log.warning("DNS lookup %s %s failed: %s", name, type_name, exc)
            raise TemporaryDNSFailure("4.4.3", f"DNS server failure for {name} {type_name}") from exc
        except dns.exception.Timeout as exc:
            log.warning("DNS lookup %s %s timed out", name, type_name)
            raise TemporaryDNSFailure("4.4.3", f"DNS lookup timed out for {name} {type_name}") from exc
        except dns.exception.DNSException as exc:
            log.warning("DNS lookup %s %s failed: %s", name, type_name, exc)
            raise TemporaryDNSFailure("4.4.3", f"DNS lookup failed for {name} {type_name}") from exc

        if rdtype == dns.rdatatype.MX:
            names = tuple(
                f"{record.preference} {record.exchange.to_text(omit_final_dot=True).lower()}"
                for record in answer
            )
        else:
            names = tuple(record.address for record in answer)
        ttl = answer.rrset.ttl if answer.rrset is not None else 0
        if ttl > 0:
            self._store(key, _Answer(names, now + dt.timedelta(seconds=ttl)), now)
        log.debug("DNS %s %s: %s (TTL %d)", name, type_name, ", ".join(names), ttl)
        return names

    def _cache_negative(self, key: tuple[str, int], kind: type[Exception], ttl: int, now: dt.datetime) -> None:
        if ttl > 0:
            self._store(key, (kind, now + dt.timedelta(seconds=ttl)), now)

    def _store(self, key: tuple[str, int], value, now: dt.datetime) -> None:
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            for old_key, old_value in list(self._cache.items()):
                expires = old_value.expires if isinstance(old_value, _Answer) else old_value[1]
                if expires <= now:
                    del self._cache[old_key]
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._cache.clear()
        self._cache[key] = value


def _negative_ttl(response: dns.message.Message | None) -> int:
    """Return the negative-caching TTL of an answer (RFC 2308): min(SOA TTL, SOA MINIMUM)."""
    if response is None:
        return 0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(rrset.ttl, rrset[0].minimum, MAX_NEGATIVE_TTL)
    return 0
