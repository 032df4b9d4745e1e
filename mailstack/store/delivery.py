"""Storing new mail: appends, local delivery and submission with its queue entries."""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import insert, select

from mailstack.store.addresses import split_address
from mailstack.store.base import NotFound, StoreBase
from mailstack.store.mailboxes import INBOX, OUTBOX
from mailstack.store.models import Delivery, DeliveryState, Mailbox, OutboundMessage

log = logging.getLogger(__name__)


def new_queue_id() -> str:
    """Return a random queue id: 16 upper-case hex digits, unique with overwhelming odds."""
    return secrets.token_hex(8).upper()


@dataclass(frozen=True)
class Appended:
    mailbox_id: int
    uid: int
    uidvalidity: int


class DeliveryMixin(StoreBase):
    async def append(
        self,
        mailbox_id: int,
        data: bytes,
        *,
        flags: int = 0,
        keywords: Sequence[str] = (),
        internal_date: dt.datetime | None = None,
    ) -> Appended:
        """Append one message to a mailbox and return its UID."""
        async with self.write() as session:
            mailbox = await session.get(Mailbox, mailbox_id)
            if mailbox is None:
                raise NotFound(f"mailbox {mailbox_id} not found")
            digest = await self._put_content(session, data)
            uid = await self._insert_message(
                session,
                mailbox_id,
                digest,
                len(data),
                flags=flags,
                keywords=" ".join(keywords),
                internal_date=internal_date,
            )
            uidvalidity = mailbox.uidvalidity
        self.notify_mailboxes([mailbox_id])
        return Appended(mailbox_id, uid, uidvalidity)

    async def _inbox_ids(self, session, account_ids: Iterable[int]) -> dict[int, int]:
        ids = set(account_ids)
        if not ids:
            return {}
        rows = await session.execute(
            select(Mailbox.account_id, Mailbox.id).where(Mailbox.account_id.in_(ids), Mailbox.name == INBOX)
        )
        found = dict(rows.all())
        missing = ids - set(found)
        if missing:
            raise NotFound(f"no INBOX for account(s) {sorted(missing)}")
        return found

    async def deliver_local(self, data: bytes, account_ids: Iterable[int]) -> list[Appended]:
        """Append ``data`` to the INBOX of every account in one transaction."""
        appended = []
        async with self.write() as session:
            inboxes = await self._inbox_ids(session, account_ids)
            digest = await self._put_content(session, data)
            for mailbox_id in inboxes.values():
                uid = await self._insert_message(session, mailbox_id, digest, len(data))
                appended.append(Appended(mailbox_id, uid, 0))
        self.notify_mailboxes(a.mailbox_id for a in appended)
        return appended

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
        """Store a submitted message in one transaction and return its queue id.

        Each local recipient gets a copy in its INBOX. When there are remote
        recipients, the message goes into the sender's Outbox with one delivery
        row per remote recipient. Nothing is visible before the commit, and the
        queue listeners are woken after it.
        """
        queue_id = queue_id or new_queue_id()
        changed: list[int] = []
        async with self.write() as session:
            digest = await self._put_content(session, data)
            inboxes = await self._inbox_ids(session, local_account_ids)
            for mailbox_id in inboxes.values():
                await self._insert_message(session, mailbox_id, digest, len(data))
                changed.append(mailbox_id)
            if remote_recipients:
                outbox = await session.scalar(
                    select(Mailbox.id).where(Mailbox.account_id == account_id, Mailbox.name == OUTBOX)
                )
                if outbox is None:
                    raise NotFound(f"account {account_id} has no Outbox")
                now = self.clock()
                await session.execute(
                    insert(OutboundMessage).values(
                        queue_id=queue_id,
                        account_id=account_id,
                        envelope_sender=envelope_sender,
                        content_sha256=digest,
                        size=len(data),
                        created=now,
                        delay_warned=False,
                    )
                )
                await session.execute(
                    insert(Delivery),
                    [
                        {
                            "queue_id": queue_id,
                            "recipient": recipient,
                            "domain": split_address(recipient)[1],
                            "state": DeliveryState.QUEUED.value,
                            "attempts": 0,
                            "next_attempt": now,
                            "created": now,
                            "updated": now,
                        }
                        for recipient in remote_recipients
                    ],
                )
                await self._insert_message(session, outbox, digest, len(data), queue_id=queue_id)
                changed.append(outbox)
        self.notify_mailboxes(changed)
        if remote_recipients:
            self.notify_queue()
        return queue_id
