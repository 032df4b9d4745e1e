"""The Blue Book's own store: schema creation, transactions, serials and zone checks."""

from __future__ import annotations

import asyncio

import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import pytest

from mailstack.bluebook import mailzone
from mailstack.bluebook.config import ZoneSection
from mailstack.bluebook.zonestore import IN, ZoneExists, ZoneStore, ZoneStoreError, to_name


def here_zone():
    spec = mailzone.MailDomain(domain=to_name("here.test"), mx=[(10, to_name("mx.here.test"))], addresses=["127.0.1.10"])
    return mailzone.build_zone(spec, ZoneSection(), ("127.0.3.1",))


@pytest.fixture
async def store(tmp_path):
    opened = await ZoneStore.open(f"sqlite+aiosqlite:///{tmp_path / 'bluebook.db'}")
    await opened.create_zone(here_zone())
    yield opened
    await opened.close()


async def test_concurrent_open_creates_schema_once(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    stores = await asyncio.gather(*(ZoneStore.open(url) for _ in range(4)))
    try:
        assert [await s.generation() for s in stores] == [0, 0, 0, 0]
    finally:
        for opened in stores:
            await opened.close()


async def test_create_existing_zone_fails(store):
    with pytest.raises(ZoneExists):
        await store.create_zone(here_zone())


async def test_change_raises_serial_and_generation(store):
    before = (await store.zone("here.test")).serial
    generation = await store.generation()

    def change(content):
        content.put(to_name("new.here.test"), dns.rdataset.from_text(IN, "A", 60, "192.0.2.1"))

    _result, changed, serial = await store.modify_zone("here.test", change)
    assert changed
    assert serial == before + 1
    assert await store.generation() == generation + 1


async def test_change_without_effect_keeps_serial(store):
    before = (await store.zone("here.test")).serial
    generation = await store.generation()
    _result, changed, serial = await store.modify_zone("here.test", lambda content: None)
    assert not changed
    assert serial == before
    assert await store.generation() == generation


async def test_failed_change_rolls_back(store):
    before = await store.zone("here.test")

    def change(content):
        content.put(to_name("half.here.test"), dns.rdataset.from_text(IN, "A", 60, "192.0.2.2"))
        raise ZoneStoreError("stop half-way")

    with pytest.raises(ZoneStoreError):
        await store.modify_zone("here.test", change)
    after = await store.zone("here.test")
    assert after.snapshot() == before.snapshot()


async def test_cname_with_other_data_rejected(store):
    def change(content):
        content.put(to_name("mx.here.test"), dns.rdataset.from_text(IN, "CNAME", 60, "other.test."))

    with pytest.raises(ZoneStoreError, match="has a CNAME record"):
        await store.modify_zone("here.test", change)


async def test_apex_ns_required(store):
    with pytest.raises(ZoneStoreError, match="at least one NS"):
        await store.modify_zone("here.test", lambda content: content.delete(to_name("here.test"), dns.rdatatype.NS))


async def test_serial_wraps_at_2_32(store):
    content = here_zone()
    content.origin = to_name("wrap.test")
    soa = content.get(to_name("here.test"), dns.rdatatype.SOA)
    content.rdatasets = {
        (to_name("wrap.test"), dns.rdatatype.SOA): dns.rdataset.from_rdata(soa.ttl, soa[0].replace(serial=2**32 - 1)),
        (to_name("wrap.test"), dns.rdatatype.NS): dns.rdataset.from_text(IN, "NS", 60, "ns.here.test."),
    }
    await store.create_zone(content)

    def change(zone):
        zone.put(to_name("a.wrap.test"), dns.rdataset.from_text(IN, "A", 60, "192.0.2.3"))

    _result, _changed, serial = await store.modify_zone("wrap.test", change)
    assert serial == 0


async def test_lower_serial_from_change_is_replaced(store):
    before = (await store.zone("here.test")).serial

    def lower_serial(content):
        soa = content.get(content.origin, dns.rdatatype.SOA)
        content.put(content.origin, dns.rdataset.from_rdata(soa.ttl, soa[0].replace(serial=before - 5)))

    _result, _changed, serial = await store.modify_zone("here.test", lower_serial)
    assert serial == before + 1


async def test_keys_stored_and_removed(store):
    info = await store.add_key("Ops.Key.")
    assert info.name == "ops.key"
    assert len(info.secret) == 44  # 32 bytes in base64
    with pytest.raises(ZoneStoreError, match="already exists"):
        await store.add_key("ops.key")
    assert [k.name for k in await store.list_keys()] == ["ops.key"]
    await store.remove_key("ops.key")
    with pytest.raises(ZoneStoreError, match="not found"):
        await store.remove_key("ops.key")
