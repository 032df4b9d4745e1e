"""Group commit of submissions on a real SQLite store."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text

from mailstack.store import NotFound, Store
from mailstack.store.batch import SubmitBatcher
from mailstack.store.models import Delivery


@pytest.fixture(params=["sqlite-thread", "async-engine"])
def make_batcher(request):
    """Build a batcher on the SQLite worker thread, or on the store's async engine as for PostgreSQL."""

    def build(store: Store) -> SubmitBatcher:
        batcher = SubmitBatcher(store)
        if request.param == "async-engine":
            batcher._sqlite.close()
            batcher._sqlite = None
        return batcher

    return build


@pytest.fixture
async def store(tmp_path):
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}")
    await store.add_domain("here.test")
    yield store
    await store.close()


async def test_concurrent_submissions_share_transactions(store, make_batcher):
    alice = await store.create_account("alice@here.test", "pw-alice-1")
    bob = await store.create_account("bob@here.test", "pw-bob-1")
    batcher = make_batcher(store)
    woken = asyncio.Event()
    store.add_queue_listener(woken.set)

    async def one(index: int) -> str:
        return await batcher.submit(
            f"Subject: {index}\r\n\r\nbody\r\n".encode(),
            account_id=alice.id,
            envelope_sender="alice@here.test",
            local_account_ids=[bob.id],
            remote_recipients=[f"user{index}@there.test"],
        )

    queue_ids = await asyncio.gather(*(one(i) for i in range(40)))
    await batcher.close()
    assert len(set(queue_ids)) == 40
    assert batcher.submissions == 40
    assert batcher.batches < 40
    assert woken.is_set()
    async with store.read() as session:
        deliveries = list(await session.scalars(select(Delivery.queue_id)))
        uids = list(await session.execute(text("SELECT uid FROM messages m JOIN mailboxes b ON b.id = m.mailbox_id WHERE b.account_id = :a AND b.name = 'INBOX' ORDER BY uid"), {"a": bob.id}))
    assert sorted(deliveries) == sorted(queue_ids)
    assert [row[0] for row in uids] == list(range(1, 41))


async def test_failing_submission_does_not_sink_the_batch(store, make_batcher):
    alice = await store.create_account("alice@here.test", "pw-alice-1")
    carol = await store.create_account("carol@here.test", "pw-carol-1")
    async with store.write() as session:
        await session.execute(text("DELETE FROM mailboxes WHERE account_id = :a AND name = 'Outbox'"), {"a": carol.id})
    batcher = make_batcher(store)

    def submit(account_id: int, sender: str):
        return batcher.submit(
            b"Subject: x\r\n\r\ny\r\n",
            account_id=account_id,
            envelope_sender=sender,
            local_account_ids=[alice.id],
            remote_recipients=["far@there.test"],
        )

    results = await asyncio.gather(
        submit(alice.id, "alice@here.test"), submit(carol.id, "carol@here.test"), submit(alice.id, "alice@here.test"),
        return_exceptions=True,
    )
    await batcher.close()
    assert isinstance(results[1], NotFound)
    assert isinstance(results[0], str) and isinstance(results[2], str)
    async with store.read() as session:
        queued = sorted(await session.scalars(select(Delivery.queue_id)))
        inbox_count = (await session.execute(text("SELECT count(*) FROM messages m JOIN mailboxes b ON b.id = m.mailbox_id WHERE b.account_id = :a AND b.name = 'INBOX'"), {"a": alice.id})).scalar()
    assert queued == sorted([results[0], results[2]])
    # The failed submission's INBOX copy was rolled back with its savepoint.
    assert inbox_count == 2


async def test_closed_batcher_refuses(store):
    batcher = SubmitBatcher(store)
    await batcher.close()
    with pytest.raises(Exception, match="closed"):
        await batcher.submit(b"x", account_id=1, envelope_sender="a@here.test", local_account_ids=[], remote_recipients=[])
