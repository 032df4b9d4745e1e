"""Message operations for mailbox access: fetch, flags, expunge, copy, move, changes.

Every method takes the UIDs it works on as an explicit sorted sequence, which the
IMAP session computes from its own view of the mailbox. Each write that changes
messages gives the changed messages one new MODSEQ (the mailbox's HIGHESTMODSEQ
after the change), so that sessions and a later CONDSTORE can ask for every
change since a MODSEQ.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mailstack.store.base import NotFound, StoreBase
from mailstack.store.engine import WRITE_OPTION
from mailstack.store.delivery import Appended
from mailstack.store.mailboxes import canonical_name
from mailstack.store.models import (
    Delivery,
    DeliveryState,
    Expunged,
    Flag,
    Mailbox,
    Message,
    MessageContent,
)

log = logging.getLogger(__name__)

# Above this many separate UID ranges, a UID set is sent to the database as
# chunks of explicit values instead of one OR of BETWEEN terms, which would
# exceed SQLite's expression depth.
MAX_RANGE_TERMS = 64
IN_CHUNK = 500

ALL_SYSTEM_FLAGS = int(Flag.SEEN | Flag.ANSWERED | Flag.FLAGGED | Flag.DELETED | Flag.DRAFT)


class FlagMode(Enum):
    """Mode in which STORE combines the given flags with a message's flags."""

    REPLACE = "replace"
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True)
class MessageState:
    """The mutable IMAP state of one message: what FETCH FLAGS and the sequence map need."""

    uid: int
    modseq: int
    flags: int
    keywords: tuple[str, ...]


@dataclass(frozen=True)
class MessageInfo:
    """One message as FETCH reads it; ``data`` is None unless content was requested."""

    uid: int
    modseq: int
    flags: int
    keywords: tuple[str, ...]
    internal_date: dt.datetime | None
    size: int | None
    content_sha256: str | None
    queue_id: str | None
    data: bytes | None = None


@dataclass(frozen=True)
class MailboxChanges:
    """Changes in a mailbox after a MODSEQ: changed or new messages and expunged UIDs."""

    highestmodseq: int
    uidnext: int
    changed: list[MessageState]
    expunged: list[int]
    # The mailbox's UIDVALIDITY now: a new value means it was renamed (or replaced).
    uidvalidity: int | None = None


@dataclass(frozen=True)
class CopyResult:
    """UIDs of copied messages: ``source_uids[i]`` became ``target_uids[i]`` in the target."""

    uidvalidity: int
    source_uids: list[int]
    target_uids: list[int]


def split_keywords(text: str) -> tuple[str, ...]:
    return tuple(text.split()) if text else ()


def uid_ranges(uids: Sequence[int]) -> list[tuple[int, int]]:
    """Compress sorted unique UIDs into inclusive (first, last) ranges."""
    ranges: list[tuple[int, int]] = []
    for uid in uids:
        if ranges and uid == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], uid)
        else:
            ranges.append((uid, uid))
    return ranges


def uid_clauses(uids: Sequence[int]) -> list:
    """Return WHERE clauses that together select exactly ``uids`` (one query per clause)."""
    ranges = uid_ranges(sorted(set(uids)))
    if not ranges:
        return []
    if len(ranges) <= MAX_RANGE_TERMS:
        terms = [Message.uid == lo if lo == hi else Message.uid.between(lo, hi) for lo, hi in ranges]
        return [or_(*terms)]
    values = sorted(set(uids))
    return [Message.uid.in_(values[i : i + IN_CHUNK]) for i in range(0, len(values), IN_CHUNK)]


def _apply_flags(
    mode: FlagMode, old_flags: int, old_keywords: tuple[str, ...], flags: int, keywords: Sequence[str]
) -> tuple[int, tuple[str, ...]]:
    if mode is FlagMode.REPLACE or mode is FlagMode.ADD:
        # Keywords compare case-insensitively; the first spelling seen is kept.
        merged = list(old_keywords) if mode is FlagMode.ADD else []
        present = {k.lower() for k in merged}
        new_flags = old_flags | flags if mode is FlagMode.ADD else flags
        for keyword in keywords:
            if keyword.lower() not in present:
                merged.append(keyword)
                present.add(keyword.lower())
        return new_flags, tuple(merged)
    removed = {k.lower() for k in keywords}
    return old_flags & ~flags, tuple(k for k in old_keywords if k.lower() not in removed)


def _states_query(mailbox_id: int):
    return (
        select(Message.uid, Message.modseq, Message.flags, Message.keywords)
        .where(Message.mailbox_id == mailbox_id)
        .order_by(Message.uid)
    )


class MessagesMixin(StoreBase):
    # Reading ---------------------------------------------------------------

    async def message_states(self, mailbox_id: int) -> tuple[Mailbox, list[MessageState]]:
        """Return the mailbox and the state of every message in it, ordered by UID (for SELECT)."""
        async with self.read() as session:
            mailbox = await session.get(Mailbox, mailbox_id)
            if mailbox is None:
                raise NotFound(f"mailbox {mailbox_id} not found")
            connection = await session.connection()
            rows = await connection.execute(_states_query(mailbox_id))
            states = [MessageState(uid, modseq, flags, split_keywords(kw)) for uid, modseq, flags, kw in rows]
        return mailbox, states

    async def mailbox_keywords(self, mailbox_id: int) -> set[str]:
        """Return every keyword set on some message of the mailbox."""
        async with self.read() as session:
            rows = await session.scalars(
                select(Message.keywords).where(Message.mailbox_id == mailbox_id, Message.keywords != "").distinct()
            )
            found: set[str] = set()
            for text in rows:
                found.update(split_keywords(text))
        return found

    async def fetch_messages(
        self, mailbox_id: int, uids: Sequence[int], *, content: bool = False, details: bool = True
    ) -> list[MessageInfo]:
        """Return the messages with these UIDs, ordered by UID; missing UIDs are skipped.

        With ``details`` False only UID, MODSEQ and flags are read, and the
        other fields are None: that is all FETCH FLAGS needs, and it avoids
        converting a timestamp per row.
        """
        columns = [Message.uid, Message.modseq, Message.flags, Message.keywords]
        if details or content:
            columns += [Message.internal_date, Message.size, Message.content_sha256, Message.queue_id]
        if content:
            columns.append(MessageContent.data)
        found: list[MessageInfo] = []
        async with self.read() as session:
            connection = await session.connection()
            for clause in uid_clauses(uids):
                query = select(*columns).where(Message.mailbox_id == mailbox_id, clause)
                if content:
                    query = query.join(MessageContent, MessageContent.sha256 == Message.content_sha256)
                result = await connection.execute(query)
                if len(columns) == 4:
                    found.extend(
                        MessageInfo(uid, modseq, flags, split_keywords(keywords), None, None, None, None)
                        for uid, modseq, flags, keywords in result
                    )
                    continue
                for row in result:
                    found.append(
                        MessageInfo(
                            uid=row[0],
                            modseq=row[1],
                            flags=row[2],
                            keywords=split_keywords(row[3]),
                            internal_date=row[4],
                            size=row[5],
                            content_sha256=row[6],
                            queue_id=row[7],
                            data=row[8] if content else None,
                        )
                    )
        found.sort(key=lambda info: info.uid)
        return found

    async def prepare(self) -> None:
        """Run the hot IMAP queries once on no mailbox, so SQLAlchemy compiles and caches them.

        Without it the first SELECT and FETCH after start pay for statement
        compilation, which costs more than the queries on a large mailbox.
        """
        async with self.read() as session:
            await session.get(Mailbox, -1)
            connection = await session.connection()
            await connection.execute(_states_query(-1))
        await self.fetch_messages(-1, [1], details=False)
        await self.fetch_messages(-1, [1], content=True)

    async def changes_since(self, mailbox_id: int, modseq: int) -> MailboxChanges:
        """Return messages whose MODSEQ is above ``modseq`` and UIDs expunged after it.

        Sessions call this after every command, so it runs on a bare
        connection in one read transaction, without an ORM session.
        """
        async with self.engine.connect() as connection, connection.begin():
            row = (
                await connection.execute(
                    select(Mailbox.highestmodseq, Mailbox.uidnext, Mailbox.uidvalidity).where(
                        Mailbox.id == mailbox_id
                    )
                )
            ).one_or_none()
            if row is None:
                raise NotFound(f"mailbox {mailbox_id} not found")
            highest, uidnext, uidvalidity = row
            if highest <= modseq:
                return MailboxChanges(highest, uidnext, [], [], uidvalidity)
            changed = [
                MessageState(uid, mseq, flags, split_keywords(kw))
                for uid, mseq, flags, kw in await connection.execute(
                    select(Message.uid, Message.modseq, Message.flags, Message.keywords)
                    .where(Message.mailbox_id == mailbox_id, Message.modseq > modseq)
                    .order_by(Message.uid)
                )
            ]
            expunged = list(
                await connection.scalars(
                    select(Expunged.uid)
                    .where(Expunged.mailbox_id == mailbox_id, Expunged.modseq > modseq)
                    .order_by(Expunged.uid)
                )
            )
        return MailboxChanges(highest, uidnext, changed, expunged, uidvalidity)

    async def highest_modseq(self, mailbox_id: int) -> int | None:
        """Return the mailbox's HIGHESTMODSEQ, or None when it no longer exists."""
        async with self.engine.connect() as connection, connection.begin():
            return await connection.scalar(select(Mailbox.highestmodseq).where(Mailbox.id == mailbox_id))

    async def append_to(
        self,
        account_id: int,
        name: str,
        data: bytes,
        *,
        flags: int = 0,
        keywords: Sequence[str] = (),
        internal_date: dt.datetime | None = None,
    ) -> Appended:
        """Append one message to an account's mailbox found by name, in one transaction.

        It does what ``append`` does after a ``get_mailbox``, with one round of
        database work less, which matters for APPEND one message at a time.
        Raises NotFound when the account has no mailbox of that name.
        """
        name = canonical_name(name)
        async with self.engine.connect() as connection:
            # Core statements on a bare connection: the ORM adds nothing here, and each
            # statement less is one round trip less to the SQLite driver's thread.
            await connection.execution_options(**{WRITE_OPTION: True})
            async with connection.begin():
                # Reserve the UID and raise the MODSEQ in the same statement that finds the mailbox.
                row = (
                    await connection.execute(
                        update(Mailbox)
                        .where(Mailbox.account_id == account_id, Mailbox.name == name)
                        .values(uidnext=Mailbox.uidnext + 1, highestmodseq=Mailbox.highestmodseq + 1)
                        .returning(Mailbox.id, Mailbox.uidvalidity, Mailbox.uidnext, Mailbox.highestmodseq)
                    )
                ).one_or_none()
                if row is None:
                    raise NotFound(f"mailbox {name} not found")
                mailbox_id, uidvalidity, uidnext, modseq = row
                uid = uidnext - 1
                digest = await self._put_content(connection, data)  # type: ignore[arg-type]
                await connection.execute(
                    insert(Message).values(
                        mailbox_id=mailbox_id,
                        uid=uid,
                        modseq=modseq,
                        flags=flags,
                        keywords=" ".join(keywords),
                        internal_date=internal_date or self.clock(),
                        size=len(data),
                        content_sha256=digest,
                        queue_id=None,
                    )
                )
        self.notify_mailboxes([mailbox_id])
        return Appended(mailbox_id, uid, uidvalidity)

    async def highest_modseqs(self, mailbox_ids: Iterable[int]) -> dict[int, int]:
        """Return the HIGHESTMODSEQ of each mailbox that exists, in one query."""
        async with self.engine.connect() as connection, connection.begin():
            rows = await connection.execute(
                select(Mailbox.id, Mailbox.highestmodseq).where(Mailbox.id.in_(list(mailbox_ids)))
            )
            return {mailbox_id: modseq for mailbox_id, modseq in rows}

    # Flags -------------------------------------------------------------------

    async def store_flags(
        self,
        mailbox_id: int,
        uids: Sequence[int],
        mode: FlagMode,
        flags: int,
        keywords: Sequence[str] = (),
    ) -> list[MessageState]:
        """Change the flags of the messages with ``uids``; return the messages that changed.

        Only messages whose flags or keywords really change get the new MODSEQ,
        so a repeated STORE does not report changes to other sessions. Without
        keywords in play the whole change is one UPDATE per UID clause.
        """
        flags &= ALL_SYSTEM_FLAGS
        changed: list[MessageState] = []
        async with self.write() as session:
            modseq = await self._bump_modseq(session, mailbox_id)
            keywords_matter = bool(keywords) or mode is FlagMode.REPLACE
            for clause in uid_clauses(uids):
                if keywords_matter:
                    changed.extend(
                        await self._store_flags_rows(session, mailbox_id, clause, mode, flags, keywords, modseq)
                    )
                    continue
                if mode is FlagMode.ADD:
                    new_value = Message.flags.op("|")(flags)
                    differs = Message.flags.op("&")(flags) != flags
                else:
                    new_value = Message.flags.op("&")(~flags & ALL_SYSTEM_FLAGS)
                    differs = Message.flags.op("&")(flags) != 0
                # On the session's connection: as an ORM statement the UPDATE would also
                # run the ORM's bulk-update bookkeeping for every returned row.
                connection = await session.connection()
                rows = await connection.execute(
                    update(Message)
                    .where(Message.mailbox_id == mailbox_id, clause, differs)
                    .values(flags=new_value, modseq=modseq)
                    .returning(Message.uid, Message.flags, Message.keywords)
                )
                changed.extend(MessageState(uid, modseq, fl, split_keywords(kw)) for uid, fl, kw in rows)
            if not changed:
                # Nothing changed: give the MODSEQ back so that idle sessions are not woken.
                await session.execute(
                    update(Mailbox)
                    .where(Mailbox.id == mailbox_id, Mailbox.highestmodseq == modseq)
                    .values(highestmodseq=modseq - 1)
                )
        if changed:
            self.notify_mailboxes([mailbox_id])
        changed.sort(key=lambda state: state.uid)
        return changed

    async def _store_flags_rows(
        self,
        session: AsyncSession,
        mailbox_id: int,
        clause,
        mode: FlagMode,
        flags: int,
        keywords: Sequence[str],
        modseq: int,
    ) -> list[MessageState]:
        """Change flags and keywords row by row, because keywords are text that SQL cannot merge."""
        rows = await session.execute(
            select(Message.id, Message.uid, Message.flags, Message.keywords).where(
                Message.mailbox_id == mailbox_id, clause
            )
        )
        changed: list[MessageState] = []
        updates: list[dict] = []
        for message_id, uid, old_flags, old_text in rows:
            old_keywords = split_keywords(old_text)
            new_flags, new_keywords = _apply_flags(mode, old_flags, old_keywords, flags, keywords)
            if new_flags == old_flags and new_keywords == old_keywords:
                continue
            updates.append({"id": message_id, "flags": new_flags, "keywords": " ".join(new_keywords), "modseq": modseq})
            changed.append(MessageState(uid, modseq, new_flags, new_keywords))
        if updates:
            # ORM bulk UPDATE by primary key: one executemany for every row.
            await session.execute(update(Message), updates)
        return changed

    # Expunge, copy, move --------------------------------------------------------

    async def expunge(self, mailbox_id: int, uids: Sequence[int] | None = None) -> list[int]:
        """Remove the messages flagged \\Deleted (only those in ``uids`` when given); return their UIDs.

        Each removal leaves an Expunged tombstone so that other sessions learn
        of it. Messages expunged from an Outbox take their pending deliveries
        with them: those become cancelled in the same transaction.
        """
        async with self.write() as session:
            deleted_flag = Message.flags.op("&")(int(Flag.DELETED)) != 0
            clauses = uid_clauses(uids) if uids is not None else [None]
            victims: list[tuple[int, int, str, str | None]] = []
            for clause in clauses:
                query = select(Message.id, Message.uid, Message.content_sha256, Message.queue_id).where(
                    Message.mailbox_id == mailbox_id, deleted_flag
                )
                if clause is not None:
                    query = query.where(clause)
                victims.extend(tuple(row) for row in await session.execute(query))
            if not victims:
                return []
            await self._remove_messages(session, mailbox_id, victims)
        self.notify_mailboxes([mailbox_id])
        return sorted(uid for _id, uid, _digest, _queue in victims)

    async def _remove_messages(
        self, session: AsyncSession, mailbox_id: int, victims: list[tuple[int, int, str, str | None]]
    ) -> int:
        """Delete the given (id, uid, digest, queue_id) rows with tombstones; return the new MODSEQ."""
        modseq = await self._bump_modseq(session, mailbox_id)
        ids = [row[0] for row in victims]
        for i in range(0, len(ids), IN_CHUNK):
            await session.execute(delete(Message).where(Message.id.in_(ids[i : i + IN_CHUNK])))
        await session.execute(
            insert(Expunged), [{"mailbox_id": mailbox_id, "uid": uid, "modseq": modseq} for _i, uid, _d, _q in victims]
        )
        queue_ids = {queue_id for _i, _u, _d, queue_id in victims if queue_id}
        if queue_ids:
            await self._cancel_deliveries(session, queue_ids)
        await session.flush()
        await self._collect_contents(session, [digest for _i, _u, digest, _q in victims])
        return modseq

    async def _cancel_deliveries(self, session: AsyncSession, queue_ids: Iterable[str]) -> int:
        """Cancel every delivery of these queue entries that is not final; return how many.

        A queue entry whose deliveries are then all final leaves the queue, as
        after its last delivery attempt, which also frees its content. An
        attempt already in flight may still reach its peer, and its result is
        then ignored because its delivery is final or gone.
        """
        queue_ids = sorted(set(queue_ids))
        open_states = [s.value for s in DeliveryState if not s.final]
        now = self.clock()
        result = await session.execute(
            update(Delivery)
            .where(Delivery.queue_id.in_(list(queue_ids)), Delivery.state.in_(open_states))
            .values(
                state=DeliveryState.CANCELLED.value,
                last_reply="cancelled: the sender expunged the message from the Outbox",
                lease_owner=None,
                lease_expiry=None,
                updated=now,
            )
        )
        count = result.rowcount or 0
        log.info("cancelled %d pending deliveries of queue id(s) %s", count, ", ".join(queue_ids))
        for queue_id in queue_ids:
            # The queue's own clean-up (QueueMixin, part of every Store) removes the finished entry.
            await self._finish_if_final(session, queue_id)  # type: ignore[attr-defined]
        return count

    async def copy_messages(self, source_id: int, target_id: int, uids: Sequence[int]) -> CopyResult:
        """Copy messages with their flags, keywords and internal date; the content is shared.

        A copy never carries the Outbox queue id: only the Outbox copy is tied to
        the pending deliveries.
        """
        async with self.write() as session:
            source_uids, target_uids, uidvalidity = await self._copy(session, source_id, target_id, uids)
        if target_uids:
            self.notify_mailboxes([target_id])
        return CopyResult(uidvalidity, source_uids, target_uids)

    async def _copy(
        self, session: AsyncSession, source_id: int, target_id: int, uids: Sequence[int]
    ) -> tuple[list[int], list[int], int]:
        target = await session.get(Mailbox, target_id)
        if target is None:
            raise NotFound(f"mailbox {target_id} not found")
        rows: list = []
        for clause in uid_clauses(uids):
            rows.extend(
                await session.execute(
                    select(
                        Message.uid,
                        Message.flags,
                        Message.keywords,
                        Message.internal_date,
                        Message.size,
                        Message.content_sha256,
                    ).where(Message.mailbox_id == source_id, clause)
                )
            )
        rows.sort(key=lambda row: row[0])
        if not rows:
            return [], [], target.uidvalidity
        first_uid, modseq = await self._allocate(session, target_id, len(rows))
        await session.execute(
            insert(Message),
            [
                {
                    "mailbox_id": target_id,
                    "uid": first_uid + index,
                    "modseq": modseq,
                    "flags": flags,
                    "keywords": keywords,
                    "internal_date": internal_date,
                    "size": size,
                    "content_sha256": digest,
                    "queue_id": None,
                }
                for index, (_uid, flags, keywords, internal_date, size, digest) in enumerate(rows)
            ],
        )
        source_uids = [row[0] for row in rows]
        target_uids = [first_uid + index for index in range(len(rows))]
        return source_uids, target_uids, target.uidvalidity

    async def move_messages(self, source_id: int, target_id: int, uids: Sequence[int]) -> CopyResult:
        """Move messages in one transaction: copy to the target, then expunge from the source.

        Moving a message out of an Outbox cancels its pending deliveries, as
        expunging it would.
        """
        async with self.write() as session:
            source_uids, target_uids, uidvalidity = await self._copy(session, source_id, target_id, uids)
            if source_uids:
                victims: list[tuple[int, int, str, str | None]] = []
                for clause in uid_clauses(source_uids):
                    victims.extend(
                        tuple(row)
                        for row in await session.execute(
                            select(Message.id, Message.uid, Message.content_sha256, Message.queue_id).where(
                                Message.mailbox_id == source_id, clause
                            )
                        )
                    )
                await self._remove_messages(session, source_id, victims)
        if source_uids:
            self.notify_mailboxes([source_id, target_id])
        return CopyResult(uidvalidity, source_uids, target_uids)

    async def move_all_messages(self, source_id: int, target_id: int) -> int:
        """Move every message of a mailbox into another (RENAME of INBOX); return the count."""
        async with self.read() as session:
            uids = list(await session.scalars(select(Message.uid).where(Message.mailbox_id == source_id)))
        if not uids:
            return 0
        result = await self.move_messages(source_id, target_id, uids)
        return len(result.target_uids)

    async def cancel_outbox_message(self, queue_id: str) -> int:
        """Cancel the pending deliveries of one queue entry; return how many were cancelled."""
        async with self.write() as session:
            count = await self._cancel_deliveries(session, [queue_id])
        return count


__all__ = [
    "CopyResult",
    "FlagMode",
    "MailboxChanges",
    "MessageInfo",
    "MessageState",
    "MessagesMixin",
    "uid_ranges",
]
