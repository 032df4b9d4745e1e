"""The relay queue in the store: leases, attempt results, notices and operator commands."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools

import pytest
from sqlalchemy import func, select

from mailstack.store import NotFound, Store
from mailstack.store.models import Delivery, DeliveryState, Expunged, Message, MessageContent, OutboundMessage
from mailstack.store.queue import AttemptResult, Notice
from postgres_server import PostgresServer, find_bin

MESSAGE = b"From: alice@here.test\r\nTo: bob@there.test\r\nSubject: hello\r\n\r\nHello Bob.\r\n"
START = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.timezone.utc)
PG_BIN = find_bin()
_names = itertools.count()


class FakeClock:
    """A clock that moves only when a test advances it."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def postgres():
    if PG_BIN is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    server = PostgresServer(PG_BIN)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}"
    server = request.getfixturevalue("postgres")
    return server.create_database(f"queue_{next(_names)}")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
async def store(database_url, clock):
    opened = await Store.open(database_url, clock=clock)
    await opened.add_domain("here.test")
    yield opened
    await opened.close()


async def submit(store: Store, recipients=("bob@there.test", "carol@there.test"), sender="alice@here.test"):
    alice = await store.get_account("alice@here.test") or await store.create_account("alice@here.test", "pw")
    return alice, await store.submit(
        MESSAGE,
        account_id=alice.id,
        envelope_sender=sender,
        local_account_ids=[],
        remote_recipients=list(recipients),
    )


async def inbox_count(store: Store, account_id: int, name: str = "INBOX") -> int:
    mailbox = await store.get_mailbox(account_id, name)
    return (await store.mailbox_status(mailbox.id)).messages


async def test_claim_leases_rows_to_one_worker(store, clock):
    await submit(store)
    first = await store.claim_due("worker-a", 60)
    second = await store.claim_due("worker-b", 60)
    assert sorted(d.recipient for d in first) == ["bob@there.test", "carol@there.test"]
    assert second == []
    assert first[0].envelope_sender == "alice@here.test"
    assert first[0].domain == "there.test"


async def test_expired_lease_returns_rows(store, clock):
    await submit(store)
    await store.claim_due("crashed", 60)
    clock.advance(59)
    assert await store.claim_due("worker-b", 60) == []
    clock.advance(2)
    reclaimed = await store.claim_due("worker-b", 60)
    assert len(reclaimed) == 2


async def test_concurrent_claims_never_share_a_row(store, clock):
    alice, _ = await submit(store, recipients=[f"user{i}@there.test" for i in range(30)])
    for _ in range(4):
        await store.submit(
            MESSAGE,
            account_id=alice.id,
            envelope_sender="alice@here.test",
            local_account_ids=[],
            remote_recipients=[f"more{i}@there.test" for i in range(10)],
        )
    batches = await asyncio.gather(*(store.claim_due(f"worker-{i}", 60, limit=7) for i in range(12)))
    ids = [delivery.id for batch in batches for delivery in batch]
    assert len(ids) == len(set(ids))
    assert len(ids) == 70


async def test_delivered_everywhere_leaves_outbox(store, clock):
    alice, queue_id = await submit(store)
    assert await inbox_count(store, alice.id, "Outbox") == 1
    claimed = await store.claim_due("w", 60)
    results = [AttemptResult(d.id, DeliveryState.DELIVERED, "250 ok") for d in claimed]
    finished = await store.record_attempts("w", results)
    assert finished == [queue_id]
    assert await inbox_count(store, alice.id, "Outbox") == 0
    assert await store.list_queue() == []
    async with store.read() as session:
        tombstones = await session.scalar(select(func.count()).select_from(Expunged))
        contents = await session.scalar(select(func.count()).select_from(MessageContent))
    assert tombstones == 1
    assert contents == 0


async def test_partial_result_keeps_message_queued(store, clock):
    alice, queue_id = await submit(store)
    bob, carol = sorted(await store.claim_due("w", 60), key=lambda d: d.recipient)
    later = clock() + dt.timedelta(minutes=5)
    finished = await store.record_attempts(
        "w",
        [
            AttemptResult(bob.id, DeliveryState.DELIVERED, "250 ok"),
            AttemptResult(carol.id, DeliveryState.DEFERRED, "451 try later", later),
        ],
    )
    assert finished == []
    entry = await store.get_queue_entry(queue_id)
    states = {d.recipient: (d.state, d.attempts, d.last_reply) for d in entry.deliveries}
    assert states["bob@there.test"] == ("delivered", 1, "250 ok")
    assert states["carol@there.test"] == ("deferred", 1, "451 try later")
    assert await store.claim_due("w", 60) == []
    clock.advance(300)
    again = await store.claim_due("w", 60)
    assert [d.recipient for d in again] == ["carol@there.test"]
    assert again[0].attempts == 1


async def test_bounce_notice_lands_in_sender_inbox(store, clock):
    alice, queue_id = await submit(store)
    claimed = await store.claim_due("w", 60)
    results = [AttemptResult(d.id, DeliveryState.BOUNCED, "550 5.1.1 unknown") for d in claimed]
    notice = Notice(queue_id, b"Return-Path: <>\r\nSubject: failed\r\n\r\nbody\r\n")
    finished = await store.record_attempts("w", results, notices=[notice])
    assert finished == [queue_id]
    assert await inbox_count(store, alice.id) == 1
    assert await inbox_count(store, alice.id, "Outbox") == 0


async def test_delay_notice_stored_once(store, clock):
    alice, queue_id = await submit(store)
    for _ in range(2):
        claimed = await store.claim_due("w", 60)
        later = clock() + dt.timedelta(seconds=10)
        results = [AttemptResult(d.id, DeliveryState.DEFERRED, "451 later", later) for d in claimed]
        await store.record_attempts("w", results, notices=[Notice(queue_id, b"Subject: delayed\r\n\r\n.\r\n", delay=True)])
        clock.advance(10)
    assert await inbox_count(store, alice.id) == 1
    assert (await store.get_queue_entry(queue_id)).delay_warned


async def test_result_without_lease_is_ignored(store, clock):
    _, queue_id = await submit(store, recipients=["bob@there.test"])
    (old,) = await store.claim_due("slow", 60)
    clock.advance(61)
    (new,) = await store.claim_due("fast", 60)
    later = clock() + dt.timedelta(minutes=5)
    await store.record_attempts("slow", [AttemptResult(old.id, DeliveryState.BOUNCED, "550 stale", later)])
    entry = await store.get_queue_entry(queue_id)
    assert entry.deliveries[0].state == "queued"
    assert entry.deliveries[0].lease_owner == "fast"
    await store.record_attempts("fast", [AttemptResult(new.id, DeliveryState.DELIVERED, "250 ok")])
    assert await store.list_queue() == []


async def test_hold_release_flush_delete(store, clock):
    alice, queue_id = await submit(store)
    assert await store.hold_queue_entry(queue_id) == 2
    assert await store.claim_due("w", 60) == []
    assert await store.release_queue_entry(queue_id) == 2
    claimed = await store.claim_due("w", 60)
    later = clock() + dt.timedelta(hours=1)
    await store.record_attempts("w", [AttemptResult(d.id, DeliveryState.DEFERRED, "451 later", later) for d in claimed])
    assert await store.claim_due("w", 60) == []
    woken = []
    store.add_queue_listener(lambda: woken.append(True))
    assert await store.flush_queue(queue_id) == 2
    assert woken == [True]
    assert len(await store.claim_due("w", 60)) == 2
    assert await store.delete_queue_entry(queue_id) == 2
    assert await store.list_queue() == []
    assert await inbox_count(store, alice.id, "Outbox") == 0
    async with store.read() as session:
        assert await session.scalar(select(func.count()).select_from(Delivery)) == 0
        assert await session.scalar(select(func.count()).select_from(OutboundMessage)) == 0
        assert await session.scalar(select(func.count()).select_from(Message)) == 0


async def test_unknown_queue_id_raises(store):
    for action in (store.hold_queue_entry, store.release_queue_entry, store.delete_queue_entry, store.get_queue_entry):
        with pytest.raises(NotFound, match="NOPE"):
            await action("NOPE")
    with pytest.raises(NotFound):
        await store.flush_queue("NOPE")


async def test_release_leases_at_shutdown(store, clock):
    await submit(store)
    await store.claim_due("stopping", 600)
    assert await store.release_leases("stopping") == 2
    assert len(await store.claim_due("next", 600)) == 2
