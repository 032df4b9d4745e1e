"""The store's engine, transactions and change notifications, shared by every part of it."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from sqlalchemy import delete, exists, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from mailstack.store.engine import WRITE_OPTION, create_engine
from mailstack.store.models import (
    Mailbox,
    Message,
    MessageContent,
    OutboundMessage,
    utcnow,
)

log = logging.getLogger(__name__)

MailboxListener = Callable[[frozenset[int]], None]
QueueListener = Callable[[], None]


class StoreError(Exception):
    """A store operation that cannot be done as requested; the message says why."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class StoreBase:
    """Engine, transaction helpers and listeners.

    Invariant of every write method: nothing it changes is visible to another
    session before its transaction commits, and listeners are called only after
    the commit returned.
    """

    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.engine = engine
        self.clock = clock
        self._mailbox_listeners: list[MailboxListener] = []
        self._queue_listeners: list[QueueListener] = []

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        busy_timeout: float = 30.0,
        pool_size: int = 10,
        upgrade: bool = True,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> Any:
        """Open the database at ``url``; migrate it to the newest schema or check it is there."""
        from mailstack.store import migrate

        engine = create_engine(url, busy_timeout=busy_timeout, pool_size=pool_size)
        try:
            if upgrade:
                await migrate.upgrade(engine)
            else:
                await migrate.check_current(engine)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, clock=clock)

    async def close(self) -> None:
        await self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """Yield a session for reading; it is rolled back at the end."""
        async with AsyncSession(self.engine, expire_on_commit=False) as session:
            async with session.begin():
                yield session

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """Yield a session in a write transaction; it commits when the block ends without error.

        On SQLite the transaction starts with BEGIN IMMEDIATE, so writers queue
        on the database lock (up to the busy timeout) instead of failing late.
        """
        async with self.engine.connect() as connection:
            await connection.execution_options(**{WRITE_OPTION: True})
            async with AsyncSession(bind=connection, expire_on_commit=False) as session:
                async with session.begin():
                    yield session

    # Listeners -----------------------------------------------------------

    def add_mailbox_listener(self, listener: MailboxListener) -> Callable[[], None]:
        """Call ``listener`` with the ids of changed mailboxes after each commit; return a remover."""
        self._mailbox_listeners.append(listener)
        return lambda: self._mailbox_listeners.remove(listener)

    def add_queue_listener(self, listener: QueueListener) -> Callable[[], None]:
        """Call ``listener`` after each commit that queued deliveries; return a remover."""
        self._queue_listeners.append(listener)
        return lambda: self._queue_listeners.remove(listener)

    def notify_mailboxes(self, mailbox_ids: Iterable[int]) -> None:
        ids = frozenset(mailbox_ids)
        if not ids:
            return
        for listener in list(self._mailbox_listeners):
            try:
                listener(ids)
            except Exception:
                log.exception("mailbox listener failed")

    def notify_queue(self) -> None:
        for listener in list(self._queue_listeners):
            try:
                listener()
            except Exception:
                log.exception("queue listener failed")

    # Shared building blocks ------------------------------------------------

    async def _put_content(self, session: AsyncSession, data: bytes) -> str:
        """Store ``data`` once under its SHA-256 and return the digest."""
        digest = hashlib.sha256(data).hexdigest()
        values = {"sha256": digest, "size": len(data), "data": data, "created": self.clock()}
        if self.dialect == "postgresql":
            statement = postgresql.insert(MessageContent).values(**values).on_conflict_do_nothing()
        elif self.dialect == "sqlite":
            statement = sqlite.insert(MessageContent).values(**values).on_conflict_do_nothing()
        else:
            found = await session.scalar(select(MessageContent.sha256).where(MessageContent.sha256 == digest))
            if found:
                return digest
            statement = insert(MessageContent).values(**values)
        await session.execute(statement)
        return digest

    async def _allocate(self, session: AsyncSession, mailbox_id: int, count: int) -> tuple[int, int]:
        """Reserve ``count`` UIDs in a mailbox and raise its MODSEQ; return (first UID, new MODSEQ).

        One UPDATE ... RETURNING does both, so concurrent transactions in other
        processes can never receive the same UID.
        """
        row = (
            await session.execute(
                update(Mailbox)
                .where(Mailbox.id == mailbox_id)
                .values(uidnext=Mailbox.uidnext + count, highestmodseq=Mailbox.highestmodseq + 1)
                .returning(Mailbox.uidnext, Mailbox.highestmodseq)
            )
        ).one_or_none()
        if row is None:
            raise NotFound(f"mailbox {mailbox_id} not found")
        uidnext, modseq = row
        return uidnext - count, modseq

    async def _bump_modseq(self, session: AsyncSession, mailbox_id: int) -> int:
        modseq = await session.scalar(
            update(Mailbox)
            .where(Mailbox.id == mailbox_id)
            .values(highestmodseq=Mailbox.highestmodseq + 1)
            .returning(Mailbox.highestmodseq)
        )
        if modseq is None:
            raise NotFound(f"mailbox {mailbox_id} not found")
        return modseq

    async def _insert_message(
        self,
        session: AsyncSession,
        mailbox_id: int,
        digest: str,
        size: int,
        *,
        flags: int = 0,
        keywords: str = "",
        internal_date: dt.datetime | None = None,
        queue_id: str | None = None,
    ) -> int:
        uid, modseq = await self._allocate(session, mailbox_id, 1)
        await session.execute(
            insert(Message).values(
                mailbox_id=mailbox_id,
                uid=uid,
                modseq=modseq,
                flags=flags,
                keywords=keywords,
                internal_date=internal_date or self.clock(),
                size=size,
                content_sha256=digest,
                queue_id=queue_id,
            )
        )
        return uid

    async def _collect_contents(self, session: AsyncSession, digests: Iterable[str]) -> None:
        """Delete each content that no message and no queued message refers to any more."""
        for digest in set(digests):
            await session.execute(
                delete(MessageContent).where(
                    MessageContent.sha256 == digest,
                    ~exists().where(Message.content_sha256 == digest),
                    ~exists().where(OutboundMessage.content_sha256 == digest),
                )
            )
