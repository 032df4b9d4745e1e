"""The Blue Book's store: zones, records and TSIG keys in its own SQL database.

Every change goes through :meth:`ZoneStore.modify_zone` (or creates or deletes a
whole zone) in one write transaction. The zone's records are read and changed in
memory with dnspython objects. Then the changed RRsets are rewritten, the SOA
serial is raised and the state generation is incremented, all before one commit,
so nothing is visible to a reader before that commit.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.serial
from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mailstack.bluebook import schema
from mailstack.bluebook.config import TSIG_ALGORITHMS
from mailstack.store.engine import WRITE_OPTION, create_engine

log = logging.getLogger(__name__)

T = TypeVar("T")
IN = dns.rdataclass.IN
SOA = dns.rdatatype.SOA
NS = dns.rdatatype.NS

# Key of one RRset inside a zone: owner name and type.
RRKey = tuple[dns.name.Name, dns.rdatatype.RdataType]

# HMAC keys as long as the hash output, as RFC 8945 recommends.
KEY_BYTES = {"hmac-sha1": 20, "hmac-sha224": 28, "hmac-sha256": 32, "hmac-sha384": 48, "hmac-sha512": 64}


class ZoneStoreError(Exception):
    """A Blue Book store operation that cannot be done as requested; the message gives the reason."""


class ZoneNotFound(ZoneStoreError):
    pass


class ZoneExists(ZoneStoreError):
    pass


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def to_name(text: str | dns.name.Name) -> dns.name.Name:
    """Parse a domain name given without or with the trailing dot; it is always absolute."""
    if isinstance(text, dns.name.Name):
        return text
    text = text.strip()
    if not text:
        raise ZoneStoreError("empty domain name")
    try:
        return dns.name.from_text(text, origin=dns.name.root)
    except dns.exception.DNSException as exc:
        raise ZoneStoreError(f"invalid domain name {text!r}: {exc}") from None


def name_key(name: dns.name.Name) -> str:
    """Return the stored form of ``name``: lower case, absolute, with the trailing dot."""
    return name.canonicalize().to_text()


@dataclass
class ZoneContent:
    """The records of one zone, changed in memory inside a write transaction."""

    origin: dns.name.Name
    rdatasets: dict[RRKey, dns.rdataset.Rdataset] = field(default_factory=dict)

    def get(self, name: dns.name.Name, rdtype: int) -> dns.rdataset.Rdataset | None:
        return self.rdatasets.get((name, dns.rdatatype.RdataType.make(rdtype)))

    def put(self, name: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> None:
        """Replace the RRset of ``rdataset``'s type at ``name``; an empty one deletes it."""
        key = (name.canonicalize(), rdataset.rdtype)
        if len(rdataset) == 0:
            self.rdatasets.pop(key, None)
        else:
            self.rdatasets[key] = rdataset

    def delete(self, name: dns.name.Name, rdtype: int) -> bool:
        return self.rdatasets.pop((name, dns.rdatatype.RdataType.make(rdtype)), None) is not None

    def types_at(self, name: dns.name.Name) -> list[dns.rdatatype.RdataType]:
        return [rdtype for (owner, rdtype) in self.rdatasets if owner == name]

    def names(self) -> set[dns.name.Name]:
        return {owner for (owner, _rdtype) in self.rdatasets}

    def contains(self, name: dns.name.Name) -> bool:
        return name.is_subdomain(self.origin)

    @property
    def soa(self) -> Any:
        rdataset = self.get(self.origin, SOA)
        if rdataset is None or len(rdataset) != 1:
            raise ZoneStoreError(f"zone {self.origin} has no SOA record")
        return rdataset[0]

    @property
    def serial(self) -> int:
        return int(self.soa.serial)

    def rrsets(self) -> list[dns.rrset.RRset]:
        """Return every RRset, SOA first, then by owner name and type."""
        result = []
        for (owner, rdtype), rdataset in sorted(
            self.rdatasets.items(), key=lambda item: (item[0][1] != SOA, item[0][0], item[0][1])
        ):
            rrset = dns.rrset.RRset(owner, IN, rdtype)
            rrset.update(rdataset)
            result.append(rrset)
        return result

    def snapshot(self) -> dict[RRKey, tuple[int, frozenset[Any]]]:
        return {key: (rdataset.ttl, frozenset(rdataset)) for key, rdataset in self.rdatasets.items()}


@dataclass(frozen=True)
class ZoneSummary:
    name: str
    serial: int
    records: int
    updated: dt.datetime


@dataclass(frozen=True)
class KeyInfo:
    name: str
    algorithm: str
    secret: str
    created: dt.datetime | None = None
    source: str = "database"


@dataclass
class Snapshot:
    """Zones and keys that the server answers from, read in one transaction."""

    generation: int
    zones: dict[dns.name.Name, ZoneContent]
    keys: list[KeyInfo]


def parse_rdata(rdtype: int | str, text: str, origin: dns.name.Name = dns.name.root) -> dns.rdata.Rdata:
    """Parse one record's data; names without a trailing dot are relative to ``origin``."""
    try:
        rdtype = dns.rdatatype.RdataType.make(rdtype)
    except dns.rdatatype.UnknownRdatatype:
        raise ZoneStoreError(f"unknown record type {rdtype!r}") from None
    if dns.rdatatype.is_metatype(rdtype) or rdtype in (dns.rdatatype.OPT, dns.rdatatype.TSIG):
        raise ZoneStoreError(f"{dns.rdatatype.to_text(rdtype)} is not a record type a zone can contain")
    try:
        return dns.rdata.from_text(IN, rdtype, text, origin=origin, relativize=False)
    except dns.exception.DNSException as exc:
        raise ZoneStoreError(f"invalid {dns.rdatatype.to_text(rdtype)} data {text!r}: {exc}") from None


def _rows_to_content(origin: dns.name.Name, rows: Iterable[Any]) -> ZoneContent:
    content = ZoneContent(origin)
    for row in rows:
        owner = dns.name.from_text(row.name)
        rdtype = dns.rdatatype.RdataType.make(row.rdtype)
        key = (owner, rdtype)
        rdataset = content.rdatasets.get(key)
        if rdataset is None:
            rdataset = content.rdatasets[key] = dns.rdataset.Rdataset(IN, rdtype)
        rdataset.add(dns.rdata.from_text(IN, rdtype, row.rdata, origin=dns.name.root, relativize=False), row.ttl)
    return content


def check_zone(content: ZoneContent) -> None:
    """Raise ZoneStoreError unless the zone is consistent enough to serve.

    Checked: one SOA at the apex and no SOA elsewhere, NS at the apex, every
    owner inside the zone, and no CNAME sharing its name with other data
    (RFC 1034 section 3.6.2).
    """
    apex_soa = content.get(content.origin, SOA)
    if apex_soa is None or len(apex_soa) != 1:
        raise ZoneStoreError(f"zone {content.origin} must have exactly one SOA record at its apex")
    if not content.get(content.origin, NS):
        raise ZoneStoreError(f"zone {content.origin} must keep at least one NS record at its apex")
    by_name: dict[dns.name.Name, list[dns.rdatatype.RdataType]] = {}
    for owner, rdtype in content.rdatasets:
        if not owner.is_subdomain(content.origin):
            raise ZoneStoreError(f"{owner} is outside zone {content.origin}")
        if rdtype == SOA and owner != content.origin:
            raise ZoneStoreError(f"an SOA record is only allowed at the apex of zone {content.origin}, not at {owner}")
        by_name.setdefault(owner, []).append(rdtype)
    for owner, types in by_name.items():
        if dns.rdatatype.CNAME in types and len(types) > 1:
            raise ZoneStoreError(f"{owner} has a CNAME record, so it cannot have other records")


class ZoneStore:
    """Zones, records and keys of the Blue Book, in its own database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @classmethod
    async def open(cls, url: str, *, busy_timeout: float = 30.0) -> ZoneStore:
        _create_private_sqlite_file(url)
        engine = create_engine(url, busy_timeout=busy_timeout, pool_size=2)
        try:
            await schema.ensure_schema(engine)
        except schema.SchemaMismatch as exc:
            await engine.dispose()
            raise ZoneStoreError(str(exc)) from None
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()

    # Transactions ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as connection:
            connection = await connection.execution_options(**{WRITE_OPTION: True})
            async with connection.begin():
                yield connection

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as connection:
            async with connection.begin():
                yield connection

    async def _bump_generation(self, connection: AsyncConnection) -> None:
        await connection.execute(update(schema.state).where(schema.state.c.id == 1).values(generation=schema.state.c.generation + 1))

    async def generation(self) -> int:
        async with self.engine.connect() as connection:
            value = (await connection.execute(select(schema.state.c.generation).where(schema.state.c.id == 1))).scalar()
            await connection.rollback()
        return int(value or 0)

    # Reading --------------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        async with self._read() as connection:
            generation = (await connection.execute(select(schema.state.c.generation))).scalar() or 0
            zone_rows = (await connection.execute(select(schema.zones))).all()
            record_rows = (await connection.execute(select(schema.records).order_by(schema.records.c.zone_id))).all()
            key_rows = (await connection.execute(select(schema.tsig_keys))).all()
        by_zone: dict[int, list[Any]] = {}
        for row in record_rows:
            by_zone.setdefault(row.zone_id, []).append(row)
        zones = {}
        for row in zone_rows:
            origin = dns.name.from_text(row.name)
            zones[origin] = _rows_to_content(origin, by_zone.get(row.id, ()))
        keys = [KeyInfo(row.name, row.algorithm, row.secret, row.created) for row in key_rows]
        return Snapshot(int(generation), zones, keys)

    async def zone(self, name: str | dns.name.Name) -> ZoneContent:
        origin = to_name(name)
        async with self._read() as connection:
            zone_id = await self._zone_id(connection, origin)
            rows = (await connection.execute(select(schema.records).where(schema.records.c.zone_id == zone_id))).all()
        return _rows_to_content(origin, rows)

    async def list_zones(self) -> list[ZoneSummary]:
        async with self._read() as connection:
            zone_rows = (await connection.execute(select(schema.zones).order_by(schema.zones.c.name))).all()
            counts = dict(
                (
                    await connection.execute(
                        select(schema.records.c.zone_id, func.count()).group_by(schema.records.c.zone_id)
                    )
                ).all()
            )
            soa_rows = (
                await connection.execute(
                    select(schema.records.c.zone_id, schema.records.c.rdata).where(schema.records.c.rdtype == int(SOA))
                )
            ).all()
        serials = {}
        for zone_id, text in soa_rows:
            serials[zone_id] = int(dns.rdata.from_text(IN, SOA, text).serial)
        return [
            ZoneSummary(row.name, serials.get(row.id, 0), counts.get(row.id, 0), row.updated) for row in zone_rows
        ]

    async def find_zone(self, name: str | dns.name.Name) -> dns.name.Name:
        """Return the origin of the closest zone that contains ``name``."""
        target = to_name(name)
        async with self._read() as connection:
            names = set((await connection.execute(select(schema.zones.c.name))).scalars())
        candidate = target
        while True:
            if name_key(candidate) in names:
                return dns.name.from_text(name_key(candidate))
            if candidate == dns.name.root:
                raise ZoneNotFound(f"no zone contains {target}")
            candidate = candidate.parent()

    async def _zone_id(self, connection: AsyncConnection, origin: dns.name.Name) -> int:
        zone_id = (
            await connection.execute(select(schema.zones.c.id).where(schema.zones.c.name == name_key(origin)))
        ).scalar()
        if zone_id is None:
            raise ZoneNotFound(f"zone {origin} not found")
        return int(zone_id)

    # Writing --------------------------------------------------------------------------

    async def create_zone(self, content: ZoneContent) -> int:
        """Store a new zone; raise ZoneExists if it is already there. Return its serial."""
        check_zone(content)
        now = utcnow()
        async with self._write() as connection:
            existing = (
                await connection.execute(select(schema.zones.c.id).where(schema.zones.c.name == name_key(content.origin)))
            ).scalar()
            if existing is not None:
                raise ZoneExists(f"zone {content.origin} already exists; change it with `bluebook update` or `bluebook record`")
            result = await connection.execute(
                insert(schema.zones).values(name=name_key(content.origin), created=now, updated=now)
            )
            zone_id = result.inserted_primary_key[0]
            await self._insert_rdatasets(connection, zone_id, content.rdatasets.items())
            await self._bump_generation(connection)
        log.info("zone %s created with serial %d", content.origin, content.serial)
        return content.serial

    async def delete_zone(self, name: str | dns.name.Name) -> None:
        origin = to_name(name)
        async with self._write() as connection:
            zone_id = await self._zone_id(connection, origin)
            await connection.execute(delete(schema.records).where(schema.records.c.zone_id == zone_id))
            await connection.execute(delete(schema.zones).where(schema.zones.c.id == zone_id))
            await self._bump_generation(connection)
        log.info("zone %s deleted", origin)

    async def modify_zone(self, name: str | dns.name.Name, change: Callable[[ZoneContent], T]) -> tuple[T, bool, int]:
        """Apply ``change`` to the zone's records in one transaction.

        ``change`` mutates the ZoneContent it gets and may raise to abort
        without any effect. When any record changed, the SOA serial is raised
        (unless ``change`` itself raised it) and the zone is checked with
        :func:`check_zone` before the commit. Return ``(change's result,
        whether anything changed, serial)``.
        """
        origin = to_name(name)
        async with self._write() as connection:
            zone_id = await self._zone_id(connection, origin)
            rows = (await connection.execute(select(schema.records).where(schema.records.c.zone_id == zone_id))).all()
            content = _rows_to_content(origin, rows)
            before = content.snapshot()
            old_serial = content.serial
            result = change(content)
            after = content.snapshot()
            if after == before:
                return result, False, old_serial
            if not dns.serial.Serial(content.serial) > dns.serial.Serial(old_serial):
                _set_serial(content, (old_serial + 1) % 2**32)
                after = content.snapshot()
            check_zone(content)
            changed = [key for key in set(before) | set(after) if before.get(key) != after.get(key)]
            for owner, rdtype in changed:
                await connection.execute(
                    delete(schema.records).where(
                        and_(
                            schema.records.c.zone_id == zone_id,
                            schema.records.c.name == name_key(owner),
                            schema.records.c.rdtype == int(rdtype),
                        )
                    )
                )
            await self._insert_rdatasets(
                connection, zone_id, [(key, content.rdatasets[key]) for key in changed if key in content.rdatasets]
            )
            await connection.execute(update(schema.zones).where(schema.zones.c.id == zone_id).values(updated=utcnow()))
            await self._bump_generation(connection)
        log.info("zone %s changed: %d RRsets rewritten, serial %d", origin, len(changed), content.serial)
        return result, True, content.serial

    async def replace_zone(self, content: ZoneContent) -> int:
        """Replace every record of an existing zone with ``content``; return the new serial."""

        def replace(current: ZoneContent) -> None:
            old_serial = current.serial
            current.rdatasets = dict(content.rdatasets)
            if not dns.serial.Serial(current.serial) > dns.serial.Serial(old_serial):
                _set_serial(current, (old_serial + 1) % 2**32)

        _result, _changed, serial = await self.modify_zone(content.origin, replace)
        return serial

    async def _insert_rdatasets(
        self, connection: AsyncConnection, zone_id: int, items: Iterable[tuple[RRKey, dns.rdataset.Rdataset]]
    ) -> None:
        rows = []
        for (owner, rdtype), rdataset in items:
            for rdata in rdataset:
                rows.append(
                    {
                        "zone_id": zone_id,
                        "name": name_key(owner),
                        "rdtype": int(rdtype),
                        "ttl": int(rdataset.ttl),
                        "rdata": rdata.to_text(origin=dns.name.root, relativize=False),
                    }
                )
        if rows:
            await connection.execute(insert(schema.records), rows)

    # TSIG keys ------------------------------------------------------------------------

    async def add_key(self, name: str, algorithm: str = "hmac-sha256", secret: str | None = None) -> KeyInfo:
        """Store a TSIG key, generating a random secret unless one is given."""
        key_name = name_key(to_name(name)).rstrip(".") or "."
        algorithm = algorithm.lower()
        if algorithm not in TSIG_ALGORITHMS:
            raise ZoneStoreError(f"unknown TSIG algorithm {algorithm!r}; known: {', '.join(TSIG_ALGORITHMS)}")
        if secret is None:
            secret = base64.b64encode(secrets.token_bytes(KEY_BYTES[algorithm])).decode("ascii")
        now = utcnow()
        async with self._write() as connection:
            existing = (
                await connection.execute(select(schema.tsig_keys.c.id).where(schema.tsig_keys.c.name == key_name))
            ).scalar()
            if existing is not None:
                raise ZoneStoreError(f"TSIG key {key_name} already exists; remove it first to replace it")
            await connection.execute(
                insert(schema.tsig_keys).values(name=key_name, algorithm=algorithm, secret=secret, created=now)
            )
            await self._bump_generation(connection)
        log.info("TSIG key %s (%s) added", key_name, algorithm)
        return KeyInfo(key_name, algorithm, secret, now)

    async def list_keys(self) -> list[KeyInfo]:
        async with self._read() as connection:
            rows = (await connection.execute(select(schema.tsig_keys).order_by(schema.tsig_keys.c.name))).all()
        return [KeyInfo(row.name, row.algorithm, row.secret, row.created) for row in rows]

    async def remove_key(self, name: str) -> None:
        key_name = name_key(to_name(name)).rstrip(".") or "."
        async with self._write() as connection:
            result = await connection.execute(delete(schema.tsig_keys).where(schema.tsig_keys.c.name == key_name))
            if result.rowcount == 0:
                raise ZoneStoreError(f"TSIG key {key_name} not found")
            await self._bump_generation(connection)
        log.info("TSIG key %s removed", key_name)


def _create_private_sqlite_file(url: str) -> None:
    """Create a new SQLite database file readable by its owner only, since it contains TSIG secrets.

    SQLite gives its -wal and -shm files the permissions of the database file.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return
    path = Path(parsed.database)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _set_serial(content: ZoneContent, serial: int) -> None:
    rdataset = content.get(content.origin, SOA)
    assert rdataset is not None
    new = dns.rdataset.Rdataset(IN, SOA, ttl=rdataset.ttl)
    new.add(rdataset[0].replace(serial=serial))
    content.put(content.origin, new)
