"""Domains, accounts and aliases."""

from __future__ import annotations

import logging

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from mailstack.store.addresses import normalize_address, normalize_domain, split_address
from mailstack.store.base import AlreadyExists, NotFound, StoreBase, StoreError
from mailstack.store.models import Account, Alias, Domain, Mailbox, Message, OutboundMessage
from mailstack.store.passwords import hash_password_async, needs_rehash, verify_password_async

log = logging.getLogger(__name__)

# Mailboxes every new account gets, with their RFC 6154 special-use attribute.
# RFC 6154 defines no attribute for an outbox, so Outbox has none.
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Outbox", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
)


class AccountsMixin(StoreBase):
    # Domains -------------------------------------------------------------

    async def add_domain(self, name: str) -> Domain:
        name = normalize_domain(name)
        async with self.write() as session:
            found = await session.scalar(select(Domain).where(Domain.name == name))
            if found is not None:
                raise AlreadyExists(f"domain {name} already exists")
            domain = Domain(name=name, created=self.clock())
            session.add(domain)
        log.info("domain added: %s", name)
        return domain

    async def ensure_domains(self, names: list[str] | tuple[str, ...]) -> None:
        """Add each domain in ``names`` that is not in the store yet."""
        for name in names:
            try:
                await self.add_domain(name)
            except AlreadyExists:
                pass

    async def list_domains(self) -> list[tuple[Domain, int]]:
        """Return every domain with its number of accounts."""
        async with self.read() as session:
            counts = (
                select(Account.domain_id, func.count(Account.id).label("accounts"))
                .group_by(Account.domain_id)
                .subquery()
            )
            rows = await session.execute(
                select(Domain, func.coalesce(counts.c.accounts, 0))
                .outerjoin(counts, counts.c.domain_id == Domain.id)
                .order_by(Domain.name)
            )
            return [(domain, count) for domain, count in rows]

    async def remove_domain(self, name: str) -> None:
        name = normalize_domain(name)
        async with self.write() as session:
            domain = await session.scalar(select(Domain).where(Domain.name == name))
            if domain is None:
                raise NotFound(f"domain {name} not found")
            accounts = await session.scalar(select(func.count()).where(Account.domain_id == domain.id))
            if accounts:
                raise StoreError(
                    f"domain {name} still has {accounts} account(s); remove them first with `mailstack user remove`"
                )
            await session.delete(domain)
        log.info("domain removed: %s", name)

    async def is_local_domain(self, name: str) -> bool:
        try:
            name = normalize_domain(name)
        except ValueError:
            return False
        async with self.read() as session:
            return await session.scalar(select(Domain.id).where(Domain.name == name)) is not None

    # Accounts ------------------------------------------------------------

    async def create_account(self, address: str, password: str) -> Account:
        """Create an account with its default mailboxes; its domain must exist."""
        address = normalize_address(address)
        _local, domain_name = split_address(address)
        password_hash = await hash_password_async(password)
        async with self.write() as session:
            domain = await session.scalar(select(Domain).where(Domain.name == domain_name))
            if domain is None:
                raise NotFound(f"domain {domain_name} not found; add it first with `mailstack domain add {domain_name}`")
            if await session.scalar(select(Account.id).where(Account.address == address)):
                raise AlreadyExists(f"account {address} already exists")
            if await session.scalar(select(Alias.id).where(Alias.address == address)):
                raise AlreadyExists(f"{address} is already an alias")
            account = Account(address=address, domain_id=domain.id, password_hash=password_hash, created=self.clock())
            session.add(account)
            await session.flush()
            uidvalidity = await self._next_uidvalidity(session)
            for offset, (name, special_use) in enumerate(DEFAULT_MAILBOXES):
                session.add(
                    Mailbox(
                        account_id=account.id,
                        name=name,
                        uidvalidity=uidvalidity + offset,
                        uidnext=1,
                        highestmodseq=1,
                        special_use=special_use,
                        subscribed=True,
                        created=self.clock(),
                    )
                )
        log.info("account created: %s", address)
        return account

    async def _next_uidvalidity(self, session) -> int:
        """Return a UIDVALIDITY above every one in use, based on the clock where possible."""
        highest = await session.scalar(select(func.max(Mailbox.uidvalidity))) or 0
        return max(int(self.clock().timestamp()), highest + 1)

    async def get_account(self, address: str) -> Account | None:
        try:
            address = normalize_address(address)
        except ValueError:
            return None
        async with self.read() as session:
            return await session.scalar(select(Account).where(Account.address == address))

    async def authenticate(self, address: str, password: str) -> Account | None:
        """Return the account if ``password`` is right, else None.

        An unknown or invalid address costs the same argon2 verification as a
        wrong password, so failure timing does not reveal which accounts exist.
        """
        account = await self.get_account(address)
        stored_hash = account.password_hash if account is not None else None
        ok = await verify_password_async(stored_hash, password)
        if not ok or account is None:
            return None
        if needs_rehash(account.password_hash):
            await self.change_password(account.address, password)
        return account

    async def change_password(self, address: str, password: str) -> None:
        address = normalize_address(address)
        password_hash = await hash_password_async(password)
        async with self.write() as session:
            result = await session.execute(
                update(Account).where(Account.address == address).values(password_hash=password_hash)
            )
            if result.rowcount == 0:
                raise NotFound(f"account {address} not found")
        log.info("password changed: %s", address)

    async def list_accounts(self, domain: str | None = None) -> list[Account]:
        async with self.read() as session:
            query = select(Account).order_by(Account.address)
            if domain is not None:
                query = query.join(Domain).where(Domain.name == normalize_domain(domain))
            return list(await session.scalars(query))

    async def remove_account(self, address: str) -> None:
        """Remove an account with its mailboxes, messages and aliases."""
        address = normalize_address(address)
        async with self.write() as session:
            account = await session.scalar(select(Account).where(Account.address == address))
            if account is None:
                raise NotFound(f"account {address} not found")
            digests = list(
                await session.scalars(
                    select(Message.content_sha256)
                    .join(Mailbox, Mailbox.id == Message.mailbox_id)
                    .where(Mailbox.account_id == account.id)
                )
            )
            await session.execute(delete(Mailbox).where(Mailbox.account_id == account.id))
            await session.execute(
                update(OutboundMessage).where(OutboundMessage.account_id == account.id).values(account_id=None)
            )
            await session.delete(account)
            await session.flush()
            await self._collect_contents(session, digests)
        log.info("account removed: %s", address)

    # Aliases -------------------------------------------------------------

    async def add_alias(self, alias: str, address: str) -> None:
        """Point ``alias`` at account ``address``; adding the same alias again changes nothing."""
        alias = normalize_address(alias)
        address = normalize_address(address)
        _local, alias_domain = split_address(alias)
        async with self.write() as session:
            account = await session.scalar(select(Account).where(Account.address == address))
            if account is None:
                raise NotFound(f"account {address} not found")
            if await session.scalar(select(Domain.id).where(Domain.name == alias_domain)) is None:
                raise NotFound(f"domain {alias_domain} not found")
            if await session.scalar(select(Account.id).where(Account.address == alias)):
                raise AlreadyExists(f"{alias} is an account")
            existing = await session.scalar(select(Alias).where(Alias.address == alias))
            if existing is not None:
                if existing.account_id == account.id:
                    return
                raise AlreadyExists(f"alias {alias} already exists for another account; remove it first")
            session.add(Alias(address=alias, account_id=account.id))
            try:
                await session.flush()
            except IntegrityError:
                raise AlreadyExists(f"alias {alias} already exists") from None
        log.info("alias added: %s -> %s", alias, address)

    async def remove_alias(self, alias: str) -> None:
        alias = normalize_address(alias)
        async with self.write() as session:
            result = await session.execute(delete(Alias).where(Alias.address == alias))
            if result.rowcount == 0:
                raise NotFound(f"alias {alias} not found")

    async def list_aliases(self, address: str) -> list[str]:
        address = normalize_address(address)
        async with self.read() as session:
            return list(
                await session.scalars(
                    select(Alias.address).join(Account, Account.id == Alias.account_id).where(Account.address == address)
                )
            )

    async def resolve_recipient(self, address: str) -> Account | None:
        """Return the account that receives mail for ``address`` (an account or an alias)."""
        try:
            address = normalize_address(address)
        except ValueError:
            return None
        async with self.read() as session:
            account = await session.scalar(select(Account).where(Account.address == address))
            if account is not None:
                return account
            return await session.scalar(
                select(Account).join(Alias, Alias.account_id == Account.id).where(Alias.address == address)
            )

    async def may_send_as(self, account_id: int, address: str) -> bool:
        """Tell whether the account may use ``address`` as envelope sender: its own or an alias."""
        try:
            address = normalize_address(address)
        except ValueError:
            return False
        async with self.read() as session:
            own = await session.scalar(select(Account.id).where(Account.id == account_id, Account.address == address))
            if own is not None:
                return True
            alias = await session.scalar(select(Alias.id).where(Alias.account_id == account_id, Alias.address == address))
            return alias is not None
