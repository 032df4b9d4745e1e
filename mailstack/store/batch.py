"""Group commit for submissions: concurrent Store.submit calls share one transaction and one fsync.

Each SMTP session that ends a DATA waits for its own commit before it answers
250. Committing each message alone makes every session pay for one fsync and
queue on SQLite's single write lock. :class:`SubmitBatcher` instead collects
the submissions that arrive while a commit is running and writes them in the
next transaction, each inside its own SAVEPOINT so that one failing
submission does not take the others with it. A caller's future resolves only
after the COMMIT returned, so the durability promise of Store.submit holds.

On SQLite the whole transaction runs in one call on a worker thread with its
own sqlite3 connection (WAL, synchronous=FULL, BEGIN IMMEDIATE, as the
store's engine). Through aiosqlite every statement would be a separate round
trip between the event loop and the driver's thread, and on a busy machine
those round trips, not the fsync, set the pace. Other databases use the
store's async engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import bindparam, insert, literal_column, select, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from mailstack.store.addresses import split_address
from mailstack.store.base import NotFound, StoreError
from mailstack.store.delivery import DeliveryMixin, new_queue_id
from mailstack.store.mailboxes import INBOX, OUTBOX
from mailstack.store.models import (
    Delivery,
    DeliveryState,
    Mailbox,
    Message,
    MessageContent,
    OutboundMessage,
    UTCDateTime,
)

log = logging.getLogger(__name__)

# Submissions written in one transaction at most; more wait for the next one.
MAX_BATCH = 128


@dataclass
class _Submission:
    data: bytes
    account_id: int
    envelope_sender: str
    local_account_ids: list[int]
    remote_recipients: list[str]
    queue_id: str
    future: asyncio.Future = field(repr=False)
    changed: list[int] = field(default_factory=list)


class SubmitBatcher:
    """Writes submissions for one store in shared transactions; ``submit`` has Store.submit's contract."""

    def __init__(self, store: DeliveryMixin, *, max_batch: int = MAX_BATCH, busy_timeout: float = 30.0) -> None:
        self.store = store
        self.max_batch = max_batch
        self._sqlite: _SQLiteWriter | None = None
        if store.dialect == "sqlite" and store.engine.url.database not in (None, "", ":memory:"):
            self._sqlite = _SQLiteWriter(store.engine.url.database, busy_timeout, store.clock)
        self._pending: list[_Submission] = []
        self._inflight: list[_Submission] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.batches = 0
        self.submissions = 0

    async def submit(
        self,
        data: bytes,
        *,
        account_id: int,
        envelope_sender: str,
        local_account_ids: Iterable[int],
        remote_recipients: Sequence[str],
        queue_id: str | None = None,
    ) -> str:
        """Store one submitted message as Store.submit does; return its queue id after the commit."""
        if self._closed:
            raise StoreError("the submission batcher is closed")
        loop = asyncio.get_running_loop()
        item = _Submission(
            data,
            account_id,
            envelope_sender,
            sorted(set(local_account_ids)),
            list(remote_recipients),
            queue_id or new_queue_id(),
            loop.create_future(),
        )
        self._pending.append(item)
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="submit-batcher")
        # shield: a client that disconnects must not cancel the others' commit.
        return await asyncio.shield(item.future)

    async def close(self, timeout: float = 30.0) -> None:
        """Write what is pending (waiting at most ``timeout`` seconds), then stop the writer."""
        self._closed = True
        waiting = [item.future for item in self._inflight + self._pending]
        if waiting and self._task is not None and not self._task.done():
            done, not_done = await asyncio.wait(waiting, timeout=timeout)
            if not_done:
                log.error("submission batcher closed with %d submission(s) not written", len(not_done))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._sqlite is not None:
            self._sqlite.close()
        log.info("submission batcher stopped: %d submissions in %d transactions", self.submissions, self.batches)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                self._inflight = batch
                try:
                    await self._commit(batch)
                finally:
                    self._inflight = []

    async def _commit(self, batch: list[_Submission]) -> None:
        failures: dict[int, BaseException] = {}
        try:
            if self._sqlite is not None:
                loop = asyncio.get_running_loop()
                failures = await loop.run_in_executor(self._sqlite.executor, self._sqlite.write, batch)
            else:
                await self._write_async(batch, failures)
        except Exception as error:  # the COMMIT itself (or BEGIN) failed: nothing was stored
            log.error("group commit of %d submission(s) failed: %s", len(batch), error, exc_info=error)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        self._finish(batch, failures)

    async def _write_async(self, batch: list[_Submission], failures: dict[int, BaseException]) -> None:
        async with self.store.write() as session:
            for index, item in enumerate(batch):
                try:
                    async with session.begin_nested():
                        await self._write_one(session, item)
                except (StoreError, SQLAlchemyError, ValueError) as error:
                    # Only this submission's SAVEPOINT was rolled back.
                    item.changed.clear()
                    failures[index] = error

    def _finish(self, batch: list[_Submission], failures: dict[int, BaseException]) -> None:
        self.batches += 1
        self.submissions += len(batch) - len(failures)
        changed = {mailbox for item in batch for mailbox in item.changed}
        self.store.notify_mailboxes(changed)
        if any(item.remote_recipients for index, item in enumerate(batch) if index not in failures):
            self.store.notify_queue()
        for index, item in enumerate(batch):
            if item.future.done():
                continue
            if index in failures:
                item.future.set_exception(failures[index])
            else:
                item.future.set_result(item.queue_id)

    async def _write_one(self, session: AsyncSession, item: _Submission) -> None:
        # The same rows as Store.submit writes, inside the caller's transaction.
        store = self.store
        digest = await store._put_content(session, item.data)
        inboxes = await store._inbox_ids(session, item.local_account_ids)
        for mailbox_id in inboxes.values():
            await store._insert_message(session, mailbox_id, digest, len(item.data))
            item.changed.append(mailbox_id)
        if not item.remote_recipients:
            return
        outbox = await session.scalar(
            select(Mailbox.id).where(Mailbox.account_id == item.account_id, Mailbox.name == OUTBOX)
        )
        if outbox is None:
            raise NotFound(f"account {item.account_id} has no Outbox")
        now = store.clock()
        await session.execute(
            insert(OutboundMessage).values(
                queue_id=item.queue_id,
                account_id=item.account_id,
                envelope_sender=item.envelope_sender,
                content_sha256=digest,
                size=len(item.data),
                created=now,
                delay_warned=False,
            )
        )
        await session.execute(
            insert(Delivery),
            [
                {
                    "queue_id": item.queue_id,
                    "recipient": recipient,
                    "domain": split_address(recipient)[1],
                    "state": DeliveryState.QUEUED.value,
                    "attempts": 0,
                    "next_attempt": now,
                    "created": now,
                    "updated": now,
                }
                for recipient in item.remote_recipients
            ],
        )
        await store._insert_message(session, outbox, digest, len(item.data), queue_id=item.queue_id)
        item.changed.append(outbox)


class _SQLiteWriter:
    """One SQLite connection on one worker thread that writes a whole batch per call.

    The statements are compiled once from the store's SQLAlchemy models and run
    on the raw sqlite3 cursor: per statement, SQLAlchemy's execution layer cost
    more than SQLite itself.
    """

    def __init__(self, database: str, busy_timeout: float, clock) -> None:
        self.clock = clock
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="submit-batch")
        self.connection = sqlite3.connect(database, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        self.connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        self.connection.execute("PRAGMA journal_mode = WAL")
        # As the store's engine: a commit is on disk when it returns.
        self.connection.execute("PRAGMA synchronous = FULL")
        self.connection.execute("PRAGMA foreign_keys = ON")
        dialect = sqlite.dialect()
        self._timestamp = UTCDateTime().bind_processor(dialect)
        self._insert_content = _compile(
            sqlite.insert(MessageContent)
            .values(sha256=bindparam("sha256"), size=bindparam("size"), data=bindparam("data"), created=bindparam("created"))
            .on_conflict_do_nothing(),
            dialect,
        )
        self._find_mailbox = _compile(
            select(Mailbox.id).where(Mailbox.account_id == bindparam("account_id"), Mailbox.name == bindparam("name")),
            dialect,
        )
        self._allocate = _compile(
            update(Mailbox)
            .where(Mailbox.id == bindparam("mailbox_id"))
            .values(uidnext=Mailbox.uidnext + literal_column("1"), highestmodseq=Mailbox.highestmodseq + literal_column("1"))
            .returning(Mailbox.uidnext, Mailbox.highestmodseq),
            dialect,
        )
        self._insert_message = _compile(
            insert(Message).values(
                {name: bindparam(name) for name in (
                    "mailbox_id", "uid", "modseq", "flags", "keywords", "internal_date", "size", "content_sha256", "queue_id"
                )}
            ),
            dialect,
        )
        self._insert_outbound = _compile(
            insert(OutboundMessage).values(
                {name: bindparam(name) for name in (
                    "queue_id", "account_id", "envelope_sender", "content_sha256", "size", "created", "delay_warned"
                )}
            ),
            dialect,
        )
        self._insert_delivery = _compile(
            insert(Delivery).values(
                {name: bindparam(name) for name in (
                    "queue_id", "recipient", "domain", "state", "attempts", "next_attempt", "created", "updated"
                )}
            ),
            dialect,
        )

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.connection.close()

    def write(self, batch: list[_Submission]) -> dict[int, BaseException]:
        """Write ``batch`` in one transaction (runs on the worker thread); return failures by index."""
        failures: dict[int, BaseException] = {}
        cursor = self.connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            for index, item in enumerate(batch):
                cursor.execute("SAVEPOINT submission")
                try:
                    self._write_one(cursor, item)
                except (StoreError, sqlite3.Error, ValueError) as error:
                    # Only this submission's changes are undone.
                    cursor.execute("ROLLBACK TO submission")
                    item.changed.clear()
                    failures[index] = error
                cursor.execute("RELEASE submission")
            cursor.execute("COMMIT")
        except BaseException:
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
            raise
        finally:
            cursor.close()
        return failures

    def _run(self, cursor: sqlite3.Cursor, statement: tuple[str, tuple[str, ...]], **values) -> sqlite3.Cursor:
        sql, names = statement
        return cursor.execute(sql, [values[name] for name in names])

    def _write_one(self, cursor: sqlite3.Cursor, item: _Submission) -> None:
        now = self._timestamp(self.clock())
        size = len(item.data)
        digest = hashlib.sha256(item.data).hexdigest()
        self._run(cursor, self._insert_content, sha256=digest, size=size, data=item.data, created=now)

        for account_id in item.local_account_ids:
            row = self._run(cursor, self._find_mailbox, account_id=account_id, name=INBOX).fetchone()
            if row is None:
                raise NotFound(f"no INBOX for account(s) [{account_id}]")
            self._add_message(cursor, row[0], digest, size, now, None)
            item.changed.append(row[0])
        if not item.remote_recipients:
            return

        row = self._run(cursor, self._find_mailbox, account_id=item.account_id, name=OUTBOX).fetchone()
        if row is None:
            raise NotFound(f"account {item.account_id} has no Outbox")
        outbox = row[0]
        self._run(
            cursor, self._insert_outbound, queue_id=item.queue_id, account_id=item.account_id,
            envelope_sender=item.envelope_sender, content_sha256=digest, size=size, created=now, delay_warned=0,
        )
        for recipient in item.remote_recipients:
            self._run(
                cursor, self._insert_delivery, queue_id=item.queue_id, recipient=recipient,
                domain=split_address(recipient)[1], state=DeliveryState.QUEUED.value, attempts=0,
                next_attempt=now, created=now, updated=now,
            )
        self._add_message(cursor, outbox, digest, size, now, item.queue_id)
        item.changed.append(outbox)

    def _add_message(self, cursor: sqlite3.Cursor, mailbox_id: int, digest: str, size: int, now, queue_id: str | None) -> None:
        # One UPDATE ... RETURNING reserves the UID and raises MODSEQ, as the store's _allocate does.
        row = self._run(cursor, self._allocate, mailbox_id=mailbox_id).fetchone()
        if row is None:
            raise NotFound(f"mailbox {mailbox_id} not found")
        uidnext, modseq = row
        self._run(
            cursor, self._insert_message, mailbox_id=mailbox_id, uid=uidnext - 1, modseq=modseq, flags=0,
            keywords="", internal_date=now, size=size, content_sha256=digest, queue_id=queue_id,
        )


def _compile(statement, dialect) -> tuple[str, tuple[str, ...]]:
    """Return the SQL text of ``statement`` for sqlite3 and the names of its parameters in order."""
    compiled = statement.compile(dialect=dialect)
    return str(compiled), tuple(compiled.positiontup)
