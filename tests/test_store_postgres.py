"""The same store operations on a real PostgreSQL server (asyncpg)."""

from __future__ import annotations

import asyncio
import itertools
import sys

import pytest
from sqlalchemy import func, select

from mailstack.store import Store
from mailstack.store.models import MessageContent
from postgres_server import PostgresServer, find_bin
from test_store import MESSAGE, WORKER

BIN = find_bin()
pytestmark = pytest.mark.skipif(BIN is None, reason="PostgreSQL server binaries not installed (Debian package postgresql)")

_names = itertools.count()


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer(BIN)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def store(postgres):
    url = postgres.create_database(f"test_{next(_names)}")
    opened = await Store.open(url)
    await opened.add_domain("here.test")
    opened.url = url
    yield opened
    await opened.close()


async def test_postgres_migrates_and_submits(store):
    alice = await store.create_account("alice@here.test", "pw")
    carol = await store.create_account("carol@here.test", "pw")
    queue_id = await store.submit(
        MESSAGE,
        account_id=alice.id,
        envelope_sender="alice@here.test",
        local_account_ids=[carol.id],
        remote_recipients=["bob@there.test"],
    )
    assert len(queue_id) == 16
    inbox = await store.get_mailbox(carol.id, "INBOX")
    assert (await store.mailbox_status(inbox.id)).messages == 1
    async with store.read() as session:
        assert await session.scalar(select(func.count()).select_from(MessageContent)) == 1
    assert await store.authenticate("alice@here.test", "pw") is not None


async def test_postgres_second_open_is_current(store):
    again = await Store.open(store.url, upgrade=False)
    await again.close()


async def test_postgres_two_processes_distinct_uids(store):
    alice = await store.create_account("alice@here.test", "pw")
    inbox = await store.get_mailbox(alice.id, "INBOX")
    count = 30
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, store.url, str(inbox.id), str(count), label, stdout=asyncio.subprocess.PIPE
        )
        for label in ("first", "second")
    ]
    outputs = await asyncio.gather(*(p.communicate() for p in processes))
    assert [p.returncode for p in processes] == [0, 0]
    uids = sorted(int(line) for out, _ in outputs for line in out.split())
    assert uids == list(range(1, 2 * count + 1))


async def test_postgres_group_commit_submissions(store):
    from mailstack.store.batch import SubmitBatcher
    from mailstack.store.models import Delivery

    alice = await store.create_account("alice@here.test", "pw")
    carol = await store.create_account("carol@here.test", "pw")
    batcher = SubmitBatcher(store)
    assert batcher._sqlite is None, "PostgreSQL goes through the async engine"

    async def one(index: int) -> str:
        return await batcher.submit(
            f"Subject: {index}\r\n\r\nbody {index}\r\n".encode(),
            account_id=alice.id,
            envelope_sender="alice@here.test",
            local_account_ids=[carol.id],
            remote_recipients=[f"user{index}@there.test"],
        )

    queue_ids = await asyncio.gather(*(one(i) for i in range(30)))
    await batcher.close()
    assert len(set(queue_ids)) == 30
    assert batcher.batches < 30, "concurrent submissions share transactions"
    inbox = await store.get_mailbox(carol.id, "INBOX")
    outbox = await store.get_mailbox(alice.id, "Outbox")
    assert (await store.mailbox_status(inbox.id)).messages == 30
    assert (await store.mailbox_status(outbox.id)).messages == 30
    async with store.read() as session:
        recipients = sorted(await session.scalars(select(Delivery.recipient)))
    assert recipients == sorted(f"user{i}@there.test" for i in range(30))
