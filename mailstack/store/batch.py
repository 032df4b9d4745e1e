"""Group commit for submissions: concurrent Store.submit calls share one transaction and one fsync.

Each SMTP session that ends a DATA waits for its own commit before it answers
250. Committing each message alone makes every session pay for one fsync and
queue on SQLite's single write lock. :class:`SubmitBatcher` instead collects
the submissions that arrive while a commit is running and writes them in the
next transaction, each inside its own SAVEPOINT so that one failing
submission does not take the others with it. A caller's future resolves only
after the COMMIT returned, so the durability promise of Store.submit holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from mailstack.store.addresses import split_address
from mailstack.store.base import NotFound, StoreError
from mailstack.store.delivery import DeliveryMixin, new_queue_id
from mailstack.store.mailboxes import OUTBOX
from mailstack.store.models import Delivery, DeliveryState, Mailbox, OutboundMessage

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

    def __init__(self, store: DeliveryMixin, *, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self._pending: list[_Submission] = []
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

    async def close(self) -> None:
        """Write what is pending, then stop the writer task."""
        self._closed = True
        while self._pending and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        log.info("submission batcher stopped: %d submissions in %d transactions", self.submissions, self.batches)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                await self._commit(batch)

    async def _commit(self, batch: list[_Submission]) -> None:
        failures: dict[int, BaseException] = {}
        try:
            async with self.store.write() as session:
                for index, item in enumerate(batch):
                    try:
                        async with session.begin_nested():
                            await self._write_one(session, item)
                    except (StoreError, SQLAlchemyError, ValueError) as error:
                        # Only this submission's SAVEPOINT was rolled back.
                        item.changed.clear()
                        failures[index] = error
        except Exception as error:  # the COMMIT itself (or BEGIN) failed: nothing was stored
            log.error("group commit of %d submission(s) failed: %s", len(batch), error, exc_info=error)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
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
