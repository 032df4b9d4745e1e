"""The relay queue: claiming due deliveries with a lease and recording attempts.

A delivery row is owned by one worker while its lease runs: ``claim_due`` sets
``lease_owner`` and ``lease_expiry`` in one transaction, so two workers (in one
process or in several sharing PostgreSQL) never send the same recipient at the
same time. A worker that dies leaves its lease behind, and the rows become due
again once ``lease_expiry`` has passed.

``record_attempts`` applies the outcome of one attempt in one transaction: the
new states, any delivery status notification for the sender's INBOX, and the
removal of the Outbox copy once every recipient of the message is final.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mailstack.store.base import NotFound, StoreBase
from mailstack.store.mailboxes import INBOX, OUTBOX
from mailstack.store.models import (
    Delivery,
    DeliveryState,
    Expunged,
    Mailbox,
    Message,
    MessageContent,
    OutboundMessage,
)

log = logging.getLogger(__name__)

# States a worker may pick up once next_attempt has come.
PENDING_STATES = (DeliveryState.QUEUED.value, DeliveryState.DEFERRED.value)
FINAL_STATES = tuple(state.value for state in DeliveryState if state.final)


@dataclass(frozen=True)
class ClaimedDelivery:
    """One recipient claimed by a worker, with what it needs to send the message."""

    id: int
    queue_id: str
    recipient: str
    domain: str
    attempts: int
    envelope_sender: str
    account_id: int | None
    content_sha256: str
    size: int
    queued_at: dt.datetime
    delay_warned: bool


@dataclass(frozen=True)
class AttemptResult:
    """The outcome of one attempt for one delivery row.

    ``state`` is DELIVERED, DEFERRED or BOUNCED; ``next_attempt`` is required
    for DEFERRED and ignored otherwise.
    """

    delivery_id: int
    state: DeliveryState
    reply: str
    next_attempt: dt.datetime | None = None


@dataclass(frozen=True)
class Notice:
    """A delivery status notification to put into the INBOX of a queued message's sender.

    ``delay`` marks a delay warning, which is stored at most once per message.
    """

    queue_id: str
    data: bytes
    delay: bool = False


@dataclass(frozen=True)
class DeliveryInfo:
    id: int
    recipient: str
    state: str
    attempts: int
    next_attempt: dt.datetime
    last_reply: str | None
    lease_owner: str | None
    lease_expiry: dt.datetime | None


@dataclass(frozen=True)
class QueueEntry:
    """A queued message with the state of each recipient, as ``mailstack queue`` shows it."""

    queue_id: str
    envelope_sender: str
    account_id: int | None
    size: int
    created: dt.datetime
    delay_warned: bool
    content_sha256: str
    deliveries: list[DeliveryInfo] = field(default_factory=list)


class QueueMixin(StoreBase):
    # Workers ---------------------------------------------------------------

    async def claim_due(self, owner: str, lease_seconds: float, *, limit: int = 100) -> list[ClaimedDelivery]:
        """Lease up to ``limit`` due deliveries to ``owner`` and return them.

        Due means queued or deferred, ``next_attempt`` reached, and no lease of
        another worker still running. PostgreSQL skips rows that another
        transaction has locked; SQLite serialises writers with BEGIN IMMEDIATE.
        """
        now = self.clock()
        expiry = now + dt.timedelta(seconds=lease_seconds)
        due = (
            Delivery.state.in_(PENDING_STATES),
            Delivery.next_attempt <= now,
            or_(Delivery.lease_expiry.is_(None), Delivery.lease_expiry <= now),
        )
        # A read first, so that an idle scan does not take SQLite's write lock.
        async with self.read() as session:
            if await session.scalar(select(Delivery.id).where(*due).limit(1)) is None:
                return []
        async with self.write() as session:
            query = select(Delivery.id).where(*due).order_by(Delivery.next_attempt, Delivery.id).limit(limit)
            if self.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)
            ids = list(await session.scalars(query))
            if not ids:
                return []
            await session.execute(
                update(Delivery).where(Delivery.id.in_(ids)).values(lease_owner=owner, lease_expiry=expiry)
            )
            rows = await session.execute(
                select(Delivery, OutboundMessage)
                .join(OutboundMessage, OutboundMessage.queue_id == Delivery.queue_id)
                .where(Delivery.id.in_(ids))
                .order_by(Delivery.queue_id, Delivery.domain, Delivery.id)
            )
            claimed = [
                ClaimedDelivery(
                    id=delivery.id,
                    queue_id=delivery.queue_id,
                    recipient=delivery.recipient,
                    domain=delivery.domain,
                    attempts=delivery.attempts,
                    envelope_sender=message.envelope_sender,
                    account_id=message.account_id,
                    content_sha256=message.content_sha256,
                    size=message.size,
                    queued_at=message.created,
                    delay_warned=message.delay_warned,
                )
                for delivery, message in rows
            ]
        log.debug("worker %s claimed %d deliveries", owner, len(claimed))
        return claimed

    async def load_content(self, sha256: str) -> bytes:
        """Return the stored bytes of a message by their SHA-256."""
        async with self.read() as session:
            data = await session.scalar(select(MessageContent.data).where(MessageContent.sha256 == sha256))
        if data is None:
            raise NotFound(f"message content {sha256} not found")
        return data

    async def load_queued_content(self, queue_id: str) -> bytes:
        """Return the bytes of a queued message; raise NotFound once it has left the queue."""
        async with self.read() as session:
            data = await session.scalar(
                select(MessageContent.data)
                .join(OutboundMessage, OutboundMessage.content_sha256 == MessageContent.sha256)
                .where(OutboundMessage.queue_id == queue_id)
            )
        if data is None:
            raise NotFound(f"queue id {queue_id} not found")
        return data

    async def renew_leases(self, owner: str, delivery_ids: Sequence[int], lease_seconds: float) -> int:
        """Extend ``owner``'s leases on pending rows to ``lease_seconds`` from now; return how many."""
        expiry = self.clock() + dt.timedelta(seconds=lease_seconds)
        async with self.write() as session:
            result = await session.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(list(delivery_ids)),
                    Delivery.lease_owner == owner,
                    Delivery.state.in_(PENDING_STATES + (DeliveryState.HELD.value,)),
                )
                .values(lease_expiry=expiry)
            )
        return result.rowcount or 0

    async def release_leases(self, owner: str) -> int:
        """Give back every lease ``owner`` holds, so other workers may retry at once."""
        async with self.write() as session:
            result = await session.execute(
                update(Delivery)
                .where(Delivery.lease_owner == owner, Delivery.state.in_(PENDING_STATES))
                .values(lease_owner=None, lease_expiry=None)
            )
        return result.rowcount or 0

    async def record_attempts(
        self,
        owner: str,
        results: Sequence[AttemptResult],
        *,
        notices: Sequence[Notice] = (),
    ) -> list[str]:
        """Store the outcome of one attempt, its notifications and the clean-up in one transaction.

        A result is applied only while its row is still leased to ``owner`` and
        not final, except DELIVERED, which is always applied to a non-final row:
        the peer has the message, so sending it again would duplicate it. A
        held row stays held when its attempt was deferred.

        Each notice goes into the INBOX of the account that queued the message.
        A delay notice is stored only for the first warning of a message. Every
        message whose deliveries are now all final leaves the Outbox and the
        queue. Returns the queue ids that left the queue.
        """
        now = self.clock()
        changed: set[int] = set()
        finished: list[str] = []
        async with self.write() as session:
            queue_ids: set[str] = set()
            for result in results:
                if result.state not in (DeliveryState.DELIVERED, DeliveryState.DEFERRED, DeliveryState.BOUNCED):
                    raise ValueError(f"an attempt cannot end in state {result.state.value}")
                queue_id = await self._apply_result(session, owner, result, now)
                if queue_id is not None:
                    queue_ids.add(queue_id)

            for notice in notices:
                mailbox_id = await self._store_notice(session, notice)
                if mailbox_id is not None:
                    changed.add(mailbox_id)
                queue_ids.add(notice.queue_id)

            for queue_id in sorted(queue_ids):
                removed = await self._finish_if_final(session, queue_id)
                if removed is not None:
                    changed.update(removed)
                    finished.append(queue_id)
        self.notify_mailboxes(changed)
        return finished

    async def _apply_result(
        self, session: AsyncSession, owner: str, result: AttemptResult, now: dt.datetime
    ) -> str | None:
        delivery = await session.get(Delivery, result.delivery_id)
        if delivery is None or delivery.state in FINAL_STATES:
            log.warning(
                "attempt result for delivery %s ignored: the delivery is gone or already final",
                result.delivery_id,
            )
            return None
        if result.state is not DeliveryState.DELIVERED and delivery.lease_owner != owner:
            log.warning(
                "attempt result for delivery %s ignored: worker %s no longer owns its lease",
                result.delivery_id,
                owner,
            )
            return None
        delivery.attempts += 1
        delivery.last_reply = result.reply
        delivery.updated = now
        delivery.lease_owner = None
        delivery.lease_expiry = None
        if result.state is DeliveryState.DEFERRED:
            if result.next_attempt is None:
                raise ValueError("a deferred result needs next_attempt")
            delivery.next_attempt = result.next_attempt
            if delivery.state != DeliveryState.HELD.value:
                delivery.state = DeliveryState.DEFERRED.value
        else:
            delivery.state = result.state.value
        return delivery.queue_id

    async def _store_notice(self, session: AsyncSession, notice: Notice) -> int | None:
        message = await session.get(OutboundMessage, notice.queue_id)
        if message is None:
            log.warning("notice for %s dropped: the message left the queue", notice.queue_id)
            return None
        if notice.delay:
            # Set the flag and test it in one statement, so concurrent workers warn once.
            result = await session.execute(
                update(OutboundMessage)
                .where(OutboundMessage.queue_id == notice.queue_id, OutboundMessage.delay_warned.is_(False))
                .values(delay_warned=True)
            )
            if not result.rowcount:
                return None
        if message.account_id is None:
            log.warning("notice for %s dropped: the sending account was removed", notice.queue_id)
            return None
        inbox = await session.scalar(
            select(Mailbox.id).where(Mailbox.account_id == message.account_id, Mailbox.name == INBOX)
        )
        if inbox is None:
            log.warning("notice for %s dropped: account %s has no INBOX", notice.queue_id, message.account_id)
            return None
        digest = await self._put_content(session, notice.data)
        await self._insert_message(session, inbox, digest, len(notice.data))
        log.info(
            "%s notice for %s stored in the INBOX of account %s",
            "delay" if notice.delay else "failure",
            notice.queue_id,
            message.account_id,
        )
        return inbox

    async def _finish_if_final(self, session: AsyncSession, queue_id: str) -> set[int] | None:
        """Remove a message from the queue and its Outbox copy if all its deliveries are final."""
        states = set(await session.scalars(select(Delivery.state).where(Delivery.queue_id == queue_id)))
        if not states or not states <= set(FINAL_STATES):
            return None
        return await self._remove_from_queue(session, queue_id)

    async def _remove_from_queue(self, session: AsyncSession, queue_id: str) -> set[int]:
        """Delete a queued message, its deliveries and its Outbox copies; return the changed mailboxes.

        Each removed copy leaves an expunge tombstone, so IMAP sessions see the
        removal by MODSEQ.
        """
        copies = (
            await session.execute(
                select(Message.id, Message.mailbox_id, Message.uid, Message.content_sha256)
                .join(Mailbox, Mailbox.id == Message.mailbox_id)
                .where(Message.queue_id == queue_id, Mailbox.name == OUTBOX)
            )
        ).all()
        digests = [row.content_sha256 for row in copies]
        changed: set[int] = set()
        for row in copies:
            modseq = await self._bump_modseq(session, row.mailbox_id)
            await session.execute(insert(Expunged).values(mailbox_id=row.mailbox_id, uid=row.uid, modseq=modseq))
            await session.execute(delete(Message).where(Message.id == row.id))
            changed.add(row.mailbox_id)
        message_digest = await session.scalar(
            select(OutboundMessage.content_sha256).where(OutboundMessage.queue_id == queue_id)
        )
        await session.execute(delete(Delivery).where(Delivery.queue_id == queue_id))
        await session.execute(delete(OutboundMessage).where(OutboundMessage.queue_id == queue_id))
        if message_digest is not None:
            digests.append(message_digest)
        await session.flush()
        await self._collect_contents(session, digests)
        return changed

    # Operators -------------------------------------------------------------

    async def list_queue(self, queue_id: str | None = None) -> list[QueueEntry]:
        """Return queued messages, oldest first, with every recipient's state."""
        async with self.read() as session:
            query = select(OutboundMessage).order_by(OutboundMessage.created, OutboundMessage.queue_id)
            if queue_id is not None:
                query = query.where(OutboundMessage.queue_id == queue_id)
            messages = list(await session.scalars(query))
            ids = [m.queue_id for m in messages]
            deliveries: dict[str, list[DeliveryInfo]] = {i: [] for i in ids}
            if ids:
                for row in await session.scalars(
                    select(Delivery).where(Delivery.queue_id.in_(ids)).order_by(Delivery.id)
                ):
                    deliveries[row.queue_id].append(
                        DeliveryInfo(
                            id=row.id,
                            recipient=row.recipient,
                            state=row.state,
                            attempts=row.attempts,
                            next_attempt=row.next_attempt,
                            last_reply=row.last_reply,
                            lease_owner=row.lease_owner,
                            lease_expiry=row.lease_expiry,
                        )
                    )
        return [
            QueueEntry(
                queue_id=m.queue_id,
                envelope_sender=m.envelope_sender,
                account_id=m.account_id,
                size=m.size,
                created=m.created,
                delay_warned=m.delay_warned,
                content_sha256=m.content_sha256,
                deliveries=deliveries[m.queue_id],
            )
            for m in messages
        ]

    async def get_queue_entry(self, queue_id: str) -> QueueEntry:
        entries = await self.list_queue(queue_id.upper())
        if not entries:
            raise NotFound(f"queue id {queue_id} not found")
        return entries[0]

    async def flush_queue(self, queue_id: str | None = None) -> int:
        """Make queued and deferred deliveries due now; return how many changed.

        Rows leased to a worker keep their lease, so a running attempt is not
        doubled.
        """
        now = self.clock()
        conditions = [Delivery.state.in_(PENDING_STATES)]
        if queue_id is not None:
            await self._require_queue_id(queue_id)
            conditions.append(Delivery.queue_id == queue_id.upper())
        async with self.write() as session:
            result = await session.execute(update(Delivery).where(*conditions).values(next_attempt=now, updated=now))
        count = result.rowcount or 0
        if count:
            self.notify_queue()
        log.info("queue flush%s: %d deliveries due now", f" of {queue_id}" if queue_id else "", count)
        return count

    async def hold_queue_entry(self, queue_id: str) -> int:
        """Keep every pending delivery of a message back until it is released."""
        await self._require_queue_id(queue_id)
        async with self.write() as session:
            result = await session.execute(
                update(Delivery)
                .where(Delivery.queue_id == queue_id.upper(), Delivery.state.in_(PENDING_STATES))
                .values(state=DeliveryState.HELD.value, updated=self.clock())
            )
        log.info("queue entry %s held", queue_id)
        return result.rowcount or 0

    async def release_queue_entry(self, queue_id: str) -> int:
        """Return the held deliveries of a message to the queue, due now."""
        await self._require_queue_id(queue_id)
        now = self.clock()
        async with self.write() as session:
            result = await session.execute(
                update(Delivery)
                .where(Delivery.queue_id == queue_id.upper(), Delivery.state == DeliveryState.HELD.value)
                .values(state=DeliveryState.QUEUED.value, next_attempt=now, updated=now)
            )
        count = result.rowcount or 0
        if count:
            self.notify_queue()
        log.info("queue entry %s released", queue_id)
        return count

    async def delete_queue_entry(self, queue_id: str) -> int:
        """Remove a message from the queue and the Outbox without a notification.

        Returns the number of recipients that were still pending. An attempt
        already in flight may still reach its peer.
        """
        await self._require_queue_id(queue_id)
        async with self.write() as session:
            pending = len(
                list(
                    await session.scalars(
                        select(Delivery.id).where(
                            Delivery.queue_id == queue_id.upper(), Delivery.state.not_in(FINAL_STATES)
                        )
                    )
                )
            )
            changed = await self._remove_from_queue(session, queue_id.upper())
        self.notify_mailboxes(changed)
        log.info("queue entry %s deleted with %d pending recipients", queue_id, pending)
        return pending

    async def _require_queue_id(self, queue_id: str) -> None:
        async with self.read() as session:
            found = await session.scalar(
                select(OutboundMessage.queue_id).where(OutboundMessage.queue_id == queue_id.upper())
            )
        if found is None:
            raise NotFound(f"queue id {queue_id} not found")

