"""The store's message operations that the IMAP server uses, on SQLite and on PostgreSQL.

The PostgreSQL runs use a throwaway server from ``postgres_server.py`` and are
skipped when its binaries are not installed.
"""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import select

from mailstack.store import NotFound, Store
from mailstack.store.messages import FlagMode, uid_clauses, uid_ranges
from mailstack.store.models import Delivery, DeliveryState, Flag, MessageContent

from postgres_server import PostgresServer, find_bin

MESSAGE = b"From: a@here.test\r\nSubject: %d\r\n\r\nbody %d\r\n"
POSTGRES_BIN = find_bin()
_database_names = itertools.count()


@pytest.fixture(scope="module")
def postgres():
    if POSTGRES_BIN is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    server = PostgresServer(POSTGRES_BIN)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"imap_{next(_database_names)}")
    opened = await Store.open(url)
    await opened.add_domain("here.test")
    yield opened
    await opened.close()


@pytest.fixture
async def account(store):
    return await store.create_account("user@here.test", "secret-pw")


async def fill(store, mailbox_id, count):
    for number in range(count):
        await store.append(mailbox_id, MESSAGE % (number, number))


def test_uid_ranges_compress():
    assert uid_ranges([1, 2, 3, 5, 7, 8]) == [(1, 3), (5, 5), (7, 8)]
    assert uid_ranges([]) == []


def test_uid_clauses_chunk_many_ranges():
    uids = list(range(1, 3000, 2))
    clauses = uid_clauses(uids)
    assert len(clauses) == 3


async def test_message_states_in_uid_order(store, account):
    inbox = await store.get_mailbox(account.id, "INBOX")
    await fill(store, inbox.id, 3)
    mailbox, states = await store.message_states(inbox.id)
    assert [s.uid for s in states] == [1, 2, 3]
    assert mailbox.highestmodseq == states[-1].modseq


async def test_store_flags_reports_only_changes(store, account):
    inbox = await store.get_mailbox(account.id, "INBOX")
    await fill(store, inbox.id, 3)
    changed = await store.store_flags(inbox.id, [1, 2], FlagMode.ADD, int(Flag.SEEN))
    assert [s.uid for s in changed] == [1, 2]
    before = await store.highest_modseq(inbox.id)
    again = await store.store_flags(inbox.id, [1, 2], FlagMode.ADD, int(Flag.SEEN))
    assert again == []
    assert await store.highest_modseq(inbox.id) == before


async def test_store_keywords_case_insensitive(store, account):
    inbox = await store.get_mailbox(account.id, "INBOX")
    await fill(store, inbox.id, 1)
    await store.store_flags(inbox.id, [1], FlagMode.ADD, 0, ["$Junk"])
    assert await store.store_flags(inbox.id, [1], FlagMode.ADD, 0, ["$JUNK"]) == []
    removed = await store.store_flags(inbox.id, [1], FlagMode.REMOVE, 0, ["$junk"])
    assert removed[0].keywords == ()
    replaced = await store.store_flags(inbox.id, [1], FlagMode.REPLACE, int(Flag.FLAGGED), ["work"])
    assert replaced[0].flags == int(Flag.FLAGGED)
    assert replaced[0].keywords == ("work",)
    assert await store.mailbox_keywords(inbox.id) == {"work"}


async def test_changes_since_sees_flags_and_expunges(store, account):
    inbox = await store.get_mailbox(account.id, "INBOX")
    await fill(store, inbox.id, 4)
    start = await store.highest_modseq(inbox.id)
    await store.store_flags(inbox.id, [2, 3], FlagMode.ADD, int(Flag.DELETED))
    await store.store_flags(inbox.id, [1], FlagMode.ADD, int(Flag.SEEN))
    assert await store.expunge(inbox.id, [3]) == [3]
    changes = await store.changes_since(inbox.id, start)
    assert [s.uid for s in changes.changed] == [1, 2]
    assert changes.expunged == [3]
    assert await store.expunge(inbox.id) == [2]


async def test_expunge_collects_unreferenced_content(store, account):
    inbox = await store.get_mailbox(account.id, "INBOX")
    await fill(store, inbox.id, 1)
    await store.store_flags(inbox.id, [1], FlagMode.ADD, int(Flag.DELETED))
    await store.expunge(inbox.id)
    async with store.read() as session:
        assert list(await session.scalars(select(MessageContent.sha256))) == []


async def test_copy_keeps_flags_and_shares_content(store, account):
    inbox = await store.get_mailbox(account.id, "INBOX")
    sent = await store.get_mailbox(account.id, "Sent")
    await fill(store, inbox.id, 3)
    await store.store_flags(inbox.id, [2], FlagMode.ADD, int(Flag.FLAGGED), ["work"])
    result = await store.copy_messages(inbox.id, sent.id, [2, 3])
    assert result.source_uids == [2, 3]
    assert result.target_uids == [1, 2]
    assert result.uidvalidity == sent.uidvalidity
    copied = await store.fetch_messages(sent.id, [1], content=True)
    assert copied[0].flags == int(Flag.FLAGGED)
    assert copied[0].keywords == ("work",)
    assert copied[0].data == MESSAGE % (1, 1)


async def test_move_expunges_source(store, account):
    inbox = await store.get_mailbox(account.id, "INBOX")
    trash = await store.get_mailbox(account.id, "Trash")
    await fill(store, inbox.id, 3)
    start = await store.highest_modseq(inbox.id)
    result = await store.move_messages(inbox.id, trash.id, [1, 3])
    assert result.target_uids == [1, 2]
    _mailbox, states = await store.message_states(inbox.id)
    assert [s.uid for s in states] == [2]
    assert (await store.changes_since(inbox.id, start)).expunged == [1, 3]


async def test_expunge_from_outbox_cancels_deliveries(store, account):
    queue_id = await store.submit(
        MESSAGE % (1, 1),
        account_id=account.id,
        envelope_sender="user@here.test",
        local_account_ids=[],
        remote_recipients=["x@there.test", "y@there.test"],
    )
    outbox = await store.get_mailbox(account.id, "Outbox")
    _mailbox, states = await store.message_states(outbox.id)
    await store.store_flags(outbox.id, [states[0].uid], FlagMode.ADD, int(Flag.DELETED))
    assert await store.expunge(outbox.id) == [states[0].uid]
    # Every delivery is final after the cancellation, so the entry leaves the queue with its content.
    async with store.read() as session:
        deliveries = list(await session.scalars(select(Delivery).where(Delivery.queue_id == queue_id)))
        contents = list(await session.scalars(select(MessageContent.sha256)))
    assert deliveries == []
    assert contents == []
    assert await store.list_queue() == []


async def test_cancel_held_delivery_leaves_queue(store, account):
    queue_id = await store.submit(
        MESSAGE % (1, 1),
        account_id=account.id,
        envelope_sender="user@here.test",
        local_account_ids=[],
        remote_recipients=["x@there.test"],
    )
    async with store.write() as session:
        delivery = await session.scalar(select(Delivery).where(Delivery.queue_id == queue_id))
        delivery.state = DeliveryState.HELD.value
    assert await store.cancel_outbox_message(queue_id) == 1
    assert await store.list_queue() == []


async def test_append_to_by_name(store, account):
    first = await store.append_to(account.id, "inbox", MESSAGE % (1, 1), flags=int(Flag.SEEN), keywords=["$Work"])
    second = await store.append_to(account.id, "Drafts", MESSAGE % (2, 2))
    inbox = await store.get_mailbox(account.id, "INBOX")
    assert first.uid == 1
    assert first.uidvalidity == inbox.uidvalidity
    assert second.uid == 1
    stored = await store.fetch_messages(inbox.id, [1], content=True)
    assert stored[0].flags == int(Flag.SEEN)
    assert stored[0].keywords == ("$Work",)
    assert stored[0].data == MESSAGE % (1, 1)
    assert await store.highest_modseq(inbox.id) == stored[0].modseq
    with pytest.raises(NotFound):
        await store.append_to(account.id, "Nowhere", MESSAGE % (3, 3))


async def test_search_sql_on_each_database(store, account):
    import datetime as dt

    from mailstack.imap import commands as c
    from mailstack.imap.search import search
    from mailstack.imap.sequence import SequenceSet
    from mailstack.imap.view import MailboxView

    inbox = await store.get_mailbox(account.id, "INBOX")
    old = dt.datetime(2020, 5, 1, 12, tzinfo=dt.timezone.utc)
    await store.append(inbox.id, MESSAGE % (1, 1), internal_date=old)
    await fill(store, inbox.id, 3)
    await store.store_flags(inbox.id, [2], FlagMode.ADD, int(Flag.SEEN), ["$Work"])
    await store.store_flags(inbox.id, [3], FlagMode.ADD, int(Flag.FLAGGED), ["$Private"])
    mailbox, states = await store.message_states(inbox.id)
    view = MailboxView(
        mailbox.id, mailbox.name, mailbox.uidvalidity, mailbox.uidnext, mailbox.highestmodseq, states, read_only=False
    )
    cases = [
        (c.SearchFlag("\\Seen", False), [1, 3, 4]),
        (c.SearchFlag("$work", True), [2]),
        (c.SearchNot(c.SearchFlag("$Work", True)), [1, 3, 4]),
        (c.SearchOr(c.SearchFlag("\\Flagged", True), c.SearchFlag("\\Seen", True)), [2, 3]),
        (c.SearchDate(c.DateField.INTERNAL, c.DateRelation.BEFORE, dt.date(2021, 1, 1)), [1]),
        (c.SearchDate(c.DateField.INTERNAL, c.DateRelation.ON, dt.date(2020, 5, 1)), [1]),
        (c.SearchSize(c.SizeRelation.LARGER, 10), [1, 2, 3, 4]),
        (c.SearchSize(c.SizeRelation.SMALLER, 10), []),
        (c.SearchSequenceSet(SequenceSet.parse("2:3"), uid=True), [2, 3]),
        (c.SearchSequenceSet(SequenceSet.parse("*"), uid=False), [4]),
        # fill() numbers its messages from 0: UIDs 2, 3 and 4 have subjects 0, 1 and 2.
        (c.SearchAnd((c.SearchHeader("SUBJECT", "2"), c.SearchFlag("\\Seen", False))), [4]),
        (c.SearchText("body 1"), [1, 3]),
    ]
    for key, expected in cases:
        assert await search(store, view, key) == expected, key
