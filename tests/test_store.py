"""The SQL store on real SQLite files: migrations, accounts, atomic UIDs, durability."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from mailstack.store import AlreadyExists, NotFound, SchemaError, Store, StoreError
from mailstack.store import migrate
from mailstack.store.models import Delivery, Message, MessageContent, OutboundMessage

MESSAGE = b"From: alice@here.test\r\nTo: bob@there.test\r\nSubject: hello\r\n\r\nHello Bob.\r\n"


def url_for(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
async def store(tmp_path):
    opened = await Store.open(url_for(tmp_path / "mail.db"))
    await opened.add_domain("here.test")
    yield opened
    await opened.close()


async def test_migrations_create_schema_from_empty(tmp_path):
    path = tmp_path / "mail.db"
    opened = await Store.open(url_for(path))
    await opened.close()
    with sqlite3.connect(path) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = connection.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
    expected = {"domains", "accounts", "aliases", "mailboxes", "messages", "message_contents", "deliveries"}
    assert expected <= tables
    assert version in migrate.head_revision().split("+")
    assert journal == "wal"


async def test_sqlite_pragmas_on_every_connection(store):
    async with store.read() as session:
        synchronous = (await session.execute(text("PRAGMA synchronous"))).scalar()
        foreign_keys = (await session.execute(text("PRAGMA foreign_keys"))).scalar()
    assert synchronous == 2  # FULL
    assert foreign_keys == 1


async def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "mail.db"
    opened = await Store.open(url_for(path))
    await opened.close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    with pytest.raises(SchemaError, match="9999_from_the_future.*newer mailstack"):
        await Store.open(url_for(path))


async def test_unmigrated_database_refused_without_upgrade(tmp_path):
    with pytest.raises(SchemaError, match="has no mailstack schema") as caught:
        await Store.open(url_for(tmp_path / "mail.db"), upgrade=False)
    assert "--config" in str(caught.value)
    assert "mailstack db upgrade" in str(caught.value)


async def test_new_account_gets_special_use_mailboxes(store):
    account = await store.create_account("Alice@Here.Test", "correct horse")
    assert account.address == "alice@here.test"
    mailboxes = {m.name: m.special_use for m in await store.list_mailboxes(account.id)}
    assert mailboxes == {
        "INBOX": None,
        "Outbox": None,
        "Sent": "\\Sent",
        "Drafts": "\\Drafts",
        "Trash": "\\Trash",
        "Junk": "\\Junk",
    }
    validities = [m.uidvalidity for m in await store.list_mailboxes(account.id)]
    assert len(set(validities)) == len(validities)


async def test_account_errors_are_plain(store):
    await store.create_account("alice@here.test", "pw")
    with pytest.raises(AlreadyExists, match="account alice@here.test already exists"):
        await store.create_account("alice@here.test", "pw")
    with pytest.raises(NotFound, match="domain there.test not found"):
        await store.create_account("bob@there.test", "pw")
    with pytest.raises(StoreError, match="still has 1 account"):
        await store.remove_domain("here.test")
    with pytest.raises(NotFound):
        await store.change_password("nobody@here.test", "pw")


async def test_password_hash_is_argon2id(store):
    account = await store.create_account("alice@here.test", "correct horse")
    assert account.password_hash.startswith("$argon2id$")
    assert "correct horse" not in account.password_hash


async def test_authenticate_right_and_wrong(store):
    await store.create_account("alice@here.test", "correct horse")
    assert (await store.authenticate("alice@here.test", "correct horse")).address == "alice@here.test"
    assert await store.authenticate("ALICE@here.test", "correct horse") is not None
    assert await store.authenticate("alice@here.test", "wrong horse") is None
    assert await store.authenticate("alice@here.test", "") is None
    assert await store.authenticate("nobody@here.test", "correct horse") is None
    assert await store.authenticate("not an address", "correct horse") is None


async def test_unknown_account_still_hashes(store):
    """The failure path for an unknown account costs an argon2 verification too."""
    await store.create_account("alice@here.test", "correct horse")

    async def timed(address: str) -> float:
        start = time.perf_counter()
        assert await store.authenticate(address, "wrong horse") is None
        return time.perf_counter() - start

    wrong_password = statistics.median([await timed("alice@here.test") for _ in range(5)])
    unknown_account = statistics.median([await timed("nobody@here.test") for _ in range(5)])
    assert wrong_password > 0.005, "argon2 verification should take milliseconds"
    assert unknown_account > wrong_password * 0.5


async def test_change_password_takes_effect(store):
    await store.create_account("alice@here.test", "old secret")
    await store.change_password("alice@here.test", "new secret")
    assert await store.authenticate("alice@here.test", "old secret") is None
    assert await store.authenticate("alice@here.test", "new secret") is not None


async def test_alias_receives_and_may_send(store):
    alice = await store.create_account("alice@here.test", "pw")
    await store.add_alias("postmaster@here.test", "alice@here.test")
    assert (await store.resolve_recipient("Postmaster@here.test")).id == alice.id
    assert await store.may_send_as(alice.id, "postmaster@here.test")
    assert await store.may_send_as(alice.id, "alice@here.test")
    assert not await store.may_send_as(alice.id, "bob@here.test")
    assert await store.resolve_recipient("bob@here.test") is None


async def test_alias_add_is_idempotent(store):
    await store.create_account("alice@here.test", "pw")
    await store.create_account("carol@here.test", "pw")
    await store.add_alias("postmaster@here.test", "alice@here.test")
    await store.add_alias("postmaster@here.test", "alice@here.test")
    assert await store.list_aliases("alice@here.test") == ["postmaster@here.test"]
    with pytest.raises(AlreadyExists, match="for another account"):
        await store.add_alias("postmaster@here.test", "carol@here.test")


async def test_submit_stores_one_transaction(store):
    alice = await store.create_account("alice@here.test", "pw")
    carol = await store.create_account("carol@here.test", "pw")
    queue_id = await store.submit(
        MESSAGE,
        account_id=alice.id,
        envelope_sender="alice@here.test",
        local_account_ids=[carol.id],
        remote_recipients=["bob@there.test", "dave@there.test"],
    )
    carol_inbox = await store.get_mailbox(carol.id, "INBOX")
    alice_outbox = await store.get_mailbox(alice.id, "Outbox")
    assert (await store.mailbox_status(carol_inbox.id)).messages == 1
    assert (await store.mailbox_status(alice_outbox.id)).messages == 1
    async with store.read() as session:
        contents = await session.scalar(select(func.count()).select_from(MessageContent))
        deliveries = list(await session.scalars(select(Delivery).where(Delivery.queue_id == queue_id)))
        outbox_message = await session.scalar(select(Message).where(Message.mailbox_id == alice_outbox.id))
        queued = await session.get(OutboundMessage, queue_id)
    assert contents == 1, "the content is stored once for both copies"
    assert sorted(d.recipient for d in deliveries) == ["bob@there.test", "dave@there.test"]
    assert {d.domain for d in deliveries} == {"there.test"}
    assert {d.state for d in deliveries} == {"queued"}
    assert outbox_message.queue_id == queue_id
    assert queued.envelope_sender == "alice@here.test"


async def test_submit_wakes_listeners_after_commit(store):
    alice = await store.create_account("alice@here.test", "pw")
    woken: list[str] = []
    changed: list[frozenset[int]] = []
    store.add_queue_listener(lambda: woken.append("queue"))
    store.add_mailbox_listener(changed.append)
    await store.submit(
        MESSAGE, account_id=alice.id, envelope_sender="alice@here.test", local_account_ids=[], remote_recipients=["bob@there.test"]
    )
    outbox = await store.get_mailbox(alice.id, "Outbox")
    assert woken == ["queue"]
    assert changed == [frozenset({outbox.id})]


async def test_failed_submit_stores_nothing(store):
    alice = await store.create_account("alice@here.test", "pw")
    with pytest.raises(NotFound):
        await store.submit(
            MESSAGE, account_id=alice.id, envelope_sender="alice@here.test", local_account_ids=[alice.id, 999], remote_recipients=[]
        )
    inbox = await store.get_mailbox(alice.id, "INBOX")
    assert (await store.mailbox_status(inbox.id)).messages == 0
    async with store.read() as session:
        assert await session.scalar(select(func.count()).select_from(MessageContent)) == 0


async def test_modseq_and_uid_increase(store):
    alice = await store.create_account("alice@here.test", "pw")
    inbox = await store.get_mailbox(alice.id, "inbox")
    first = await store.append(inbox.id, MESSAGE)
    second = await store.append(inbox.id, MESSAGE + b"x\r\n")
    status = await store.mailbox_status(inbox.id)
    assert (first.uid, second.uid) == (1, 2)
    assert status.uidnext == 3
    assert status.highestmodseq == 3


async def test_remove_account_collects_content(store):
    await store.create_account("alice@here.test", "pw")
    alice = await store.get_account("alice@here.test")
    inbox = await store.get_mailbox(alice.id, "INBOX")
    await store.append(inbox.id, MESSAGE)
    await store.remove_account("alice@here.test")
    async with store.read() as session:
        assert await session.scalar(select(func.count()).select_from(MessageContent)) == 0
    assert await store.get_account("alice@here.test") is None


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from mailstack.store import Store

    async def main(url, mailbox_id, count, label):
        store = await Store.open(url)
        for i in range(count):
            appended = await store.append(mailbox_id, f"Subject: {label} {i}\\r\\n\\r\\nbody\\r\\n".encode())
            print(appended.uid, flush=True)
        await store.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    """
)


async def test_two_processes_append_distinct_uids(tmp_path, store):
    alice = await store.create_account("alice@here.test", "pw")
    inbox = await store.get_mailbox(alice.id, "INBOX")
    url = url_for(tmp_path / "mail.db")
    count = 40
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, url, str(inbox.id), str(count), label, stdout=asyncio.subprocess.PIPE
        )
        for label in ("first", "second")
    ]
    outputs = await asyncio.gather(*(p.communicate() for p in processes))
    assert [p.returncode for p in processes] == [0, 0]
    uids = [int(line) for out, _ in outputs for line in out.split()]
    assert len(uids) == 2 * count
    assert sorted(uids) == list(range(1, 2 * count + 1)), "UIDs must be distinct and without gaps"
    for out, _ in outputs:
        own = [int(line) for line in out.split()]
        assert own == sorted(own), "each process sees increasing UIDs"
    status = await store.mailbox_status(inbox.id)
    assert status.messages == 2 * count
    assert status.uidnext == 2 * count + 1


KILLED_WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    from mailstack.store import Store

    async def main(url, mailbox_id):
        store = await Store.open(url)
        appended = await store.append(mailbox_id, b"Subject: durable\\r\\n\\r\\nbody\\r\\n")
        print(appended.uid, flush=True)
        time.sleep(60)  # killed here with SIGKILL

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_committed_append_survives_sigkill(tmp_path, store):
    alice = await store.create_account("alice@here.test", "pw")
    inbox = await store.get_mailbox(alice.id, "INBOX")
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WORKER, url_for(tmp_path / "mail.db"), str(inbox.id)], stdout=subprocess.PIPE
    )
    try:
        uid = int(process.stdout.readline())
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    reopened = await Store.open(url_for(tmp_path / "mail.db"))
    try:
        async with reopened.read() as session:
            found = await session.scalar(select(Message).where(Message.mailbox_id == inbox.id, Message.uid == uid))
        assert found is not None
        assert found.size == len(b"Subject: durable\r\n\r\nbody\r\n")
    finally:
        await reopened.close()


async def test_concurrent_open_of_new_file(tmp_path):
    """Several stores opening one new file at once: WAL set once, schema migrated once."""
    url = url_for(tmp_path / "fresh.db")
    stores = await asyncio.gather(*(Store.open(url) for _ in range(4)))
    try:
        for opened in stores:
            assert await opened.list_domains() == []
    finally:
        for opened in stores:
            await opened.close()
    with sqlite3.connect(tmp_path / "fresh.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
