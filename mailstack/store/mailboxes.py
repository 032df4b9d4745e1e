"""Mailboxes of an account: list, create, rename, delete, status."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Integer, func, select

from mailstack.store.base import AlreadyExists, NotFound, StoreBase, StoreError
from mailstack.store.models import Flag, Mailbox, Message

log = logging.getLogger(__name__)

INBOX = "INBOX"
OUTBOX = "Outbox"


def canonical_name(name: str) -> str:
    """Return ``name`` with INBOX spelled upper-case; INBOX is case-insensitive (RFC 3501)."""
    if name.upper() == INBOX:
        return INBOX
    if name.upper().startswith(INBOX + "/"):
        return INBOX + name[len(INBOX):]
    return name


@dataclass(frozen=True)
class MailboxStatus:
    messages: int
    unseen: int
    uidnext: int
    uidvalidity: int
    highestmodseq: int
    size: int


class MailboxesMixin(StoreBase):
    async def list_mailboxes(self, account_id: int) -> list[Mailbox]:
        async with self.read() as session:
            return list(
                await session.scalars(select(Mailbox).where(Mailbox.account_id == account_id).order_by(Mailbox.name))
            )

    async def get_mailbox(self, account_id: int, name: str) -> Mailbox | None:
        async with self.read() as session:
            return await session.scalar(
                select(Mailbox).where(Mailbox.account_id == account_id, Mailbox.name == canonical_name(name))
            )

    async def get_mailbox_by_id(self, mailbox_id: int) -> Mailbox | None:
        async with self.read() as session:
            return await session.get(Mailbox, mailbox_id)

    async def create_mailbox(self, account_id: int, name: str, *, special_use: str | None = None) -> Mailbox:
        name = canonical_name(name)
        async with self.write() as session:
            found = await session.scalar(select(Mailbox.id).where(Mailbox.account_id == account_id, Mailbox.name == name))
            if found is not None:
                raise AlreadyExists(f"mailbox {name} already exists")
            highest = await session.scalar(select(func.max(Mailbox.uidvalidity))) or 0
            mailbox = Mailbox(
                account_id=account_id,
                name=name,
                uidvalidity=max(int(self.clock().timestamp()), highest + 1),
                uidnext=1,
                highestmodseq=1,
                special_use=special_use,
                subscribed=True,
                created=self.clock(),
            )
            session.add(mailbox)
        return mailbox

    async def rename_mailbox(self, account_id: int, old: str, new: str) -> None:
        """Rename a mailbox and its children.

        Renaming INBOX moves its messages into a new mailbox and leaves INBOX
        empty, as RFC 3501 requires; that case is handled by the IMAP layer
        through ``move`` and is rejected here.
        """
        old = canonical_name(old)
        new = canonical_name(new)
        if old == INBOX:
            raise StoreError("INBOX cannot be renamed in place")
        async with self.write() as session:
            mailboxes = list(await session.scalars(select(Mailbox).where(Mailbox.account_id == account_id)))
            by_name = {m.name: m for m in mailboxes}
            if old not in by_name:
                raise NotFound(f"mailbox {old} not found")
            if new in by_name:
                raise AlreadyExists(f"mailbox {new} already exists")
            highest = await session.scalar(select(func.max(Mailbox.uidvalidity))) or 0
            uidvalidity = max(int(self.clock().timestamp()), highest + 1)
            for mailbox in mailboxes:
                if mailbox.name == old or mailbox.name.startswith(old + "/"):
                    mailbox.name = new + mailbox.name[len(old):]
                    # A renamed mailbox is a different name to clients: new UIDVALIDITY.
                    mailbox.uidvalidity = uidvalidity
                    uidvalidity += 1

    async def delete_mailbox(self, account_id: int, name: str) -> None:
        name = canonical_name(name)
        if name == INBOX:
            raise StoreError("INBOX cannot be deleted")
        async with self.write() as session:
            mailbox = await session.scalar(select(Mailbox).where(Mailbox.account_id == account_id, Mailbox.name == name))
            if mailbox is None:
                raise NotFound(f"mailbox {name} not found")
            if mailbox.special_use is not None or name == OUTBOX:
                raise StoreError(f"mailbox {name} is a special-use mailbox and cannot be deleted")
            digests = list(await session.scalars(select(Message.content_sha256).where(Message.mailbox_id == mailbox.id)))
            await session.delete(mailbox)
            await session.flush()
            await self._collect_contents(session, digests)
            mailbox_id = mailbox.id
        self.notify_mailboxes([mailbox_id])

    async def set_subscribed(self, account_id: int, name: str, subscribed: bool) -> None:
        name = canonical_name(name)
        async with self.write() as session:
            mailbox = await session.scalar(select(Mailbox).where(Mailbox.account_id == account_id, Mailbox.name == name))
            if mailbox is None:
                raise NotFound(f"mailbox {name} not found")
            mailbox.subscribed = subscribed

    async def mailbox_status(self, mailbox_id: int) -> MailboxStatus:
        async with self.read() as session:
            mailbox = await session.get(Mailbox, mailbox_id)
            if mailbox is None:
                raise NotFound(f"mailbox {mailbox_id} not found")
            count, size, seen = (
                await session.execute(
                    select(
                        func.count(Message.id),
                        func.coalesce(func.sum(Message.size), 0),
                        func.coalesce(func.sum((Message.flags.op("&")(int(Flag.SEEN)) != 0).cast(Integer)), 0),
                    ).where(Message.mailbox_id == mailbox_id)
                )
            ).one()
            return MailboxStatus(
                messages=count,
                unseen=count - seen,
                uidnext=mailbox.uidnext,
                uidvalidity=mailbox.uidvalidity,
                highestmodseq=mailbox.highestmodseq,
                size=size,
            )

