"""The submission policy (RFC 6409): who may send, as whom, to where, and how a message is stored."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from mailstack.smtp import Envelope, Path, Reply, SessionState, SMTPError, SMTPHandler
from mailstack.store import Store, StoreError
from mailstack.store.addresses import AddressError, split_address
from mailstack.submission import headers
from mailstack.submission.throttle import AuthThrottle

log = logging.getLogger(__name__)

NULL_SENDER_REJECTED = Reply(553, "5.7.1", "The null sender is not allowed on submission")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by the authenticated user")
SENDER_UNKNOWN = Reply(553, "5.7.1", "Sender address rejected: not a local account")
USER_UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: no such user here")
LITERAL_REJECTED = Reply(550, "5.1.2", "Recipient address rejected: address literals are not relayed")
AUTH_LOCKED = Reply(421, "4.7.0", "Too many failed authentications; try again later", close=True)
COMMIT_FAILED = Reply(451, "4.3.0", "Message not stored because of a local error; try again later")

# How long the results of the account and domain lookups made at MAIL and RCPT
# are reused. A new or removed account or domain takes effect after at most
# this long; like Postfix's lookup caches, it spares the database the same
# question for every message of a busy sender.
LOOKUP_CACHE_SECONDS = 2.0

# Queue ids and Message-IDs need to be unique, not secret: a PRNG seeded once
# from the OS gives new_queue_id()'s format without a system call per message.
_ids = random.Random()

# Writes the message and its queue entries in one transaction and returns the
# queue id; the arguments are those of Store.submit.
SubmitFunction = Callable[..., Awaitable[str]]


class LookupCache:
    """Results of store lookups kept for ``ttl`` seconds, by key; bounded in size."""

    def __init__(self, ttl: float, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[tuple, tuple[float, Any]] = {}

    async def get(self, key: tuple, load: Callable[[], Awaitable[Any]]) -> Any:
        now = self.clock()
        found = self._entries.get(key)
        if found is not None and found[0] > now:
            return found[1]
        value = await load()
        if self.ttl > 0:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = (now + self.ttl, value)
        return value


@dataclass(frozen=True)
class Identity:
    """The account behind an authenticated session."""

    account_id: int
    address: str


class SubmissionHandler(SMTPHandler):
    supports_auth = True

    def __init__(
        self,
        store: Store,
        *,
        hostname: str,
        throttle: AuthThrottle,
        trusted_networks: tuple[str, ...] = (),
        submit: SubmitFunction | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
        lookup_cache_seconds: float = LOOKUP_CACHE_SECONDS,
    ) -> None:
        self.store = store
        self.hostname = hostname
        self.throttle = throttle
        self.trusted_networks = [ipaddress.ip_network(network, strict=False) for network in trusted_networks]
        self.submit = submit or store.submit
        self.clock = clock
        self.lookups = LookupCache(lookup_cache_seconds)

    def is_trusted(self, client_address: str) -> bool:
        if not self.trusted_networks:
            return False
        try:
            address = ipaddress.ip_address(client_address)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_networks)

    # AUTH -------------------------------------------------------------------

    async def authenticate(self, session: SessionState, mechanism: str, username: str, password: str) -> Identity | None:
        if self.throttle.is_locked(session.client_address, username):
            log.warning(
                "session %s: AUTH %s for %r from %s rejected: too many recent failures",
                session.id, mechanism, username, session.client_address,
            )
            raise SMTPError(AUTH_LOCKED, "AUTH lockout")
        account = await self.store.authenticate(username, password)
        if account is None:
            delay = self.throttle.record_failure(session.client_address, username)
            log.warning(
                "session %s: AUTH %s failed for %r from %s; replying in %.1f s",
                session.id, mechanism, username, session.client_address, delay,
            )
            if delay:
                await asyncio.sleep(delay)
            return None
        return Identity(account.id, account.address)

    # Envelope ---------------------------------------------------------------

    async def check_sender(self, session: SessionState, envelope: Envelope, path: Path) -> None:
        if path.is_null:
            raise SMTPError(NULL_SENDER_REJECTED)
        identity = session.auth_data if session.authenticated else None
        if isinstance(identity, Identity):
            allowed = await self.lookups.get(
                ("send-as", identity.account_id, path.address.lower()),
                lambda: self.store.may_send_as(identity.account_id, path.address),
            )
            if not allowed:
                raise SMTPError(SENDER_NOT_OWNED, f"{identity.address} may not send as {path.address}")
            envelope.notes["account_id"] = identity.account_id
        elif session.trusted:
            account_id = await self._account_for(path.address)
            if account_id is None:
                raise SMTPError(SENDER_UNKNOWN, f"trusted client used unknown sender {path.address}")
            envelope.notes["account_id"] = account_id
        else:
            # The listener's require_auth makes this unreachable; refuse anyway.
            raise SMTPError(Reply(530, "5.7.0", "Authentication required"))
        envelope.notes["local"] = set()
        envelope.notes["remote"] = []

    async def check_recipient(self, session: SessionState, envelope: Envelope, path: Path) -> None:
        address = path.address
        domain = path.domain
        if not domain:
            # RCPT TO:<Postmaster> without a domain means the postmaster of the sender's domain.
            domain = envelope.mail_from.rpartition("@")[2]
            address = f"postmaster@{domain}"
        if domain.startswith("["):
            raise SMTPError(LITERAL_REJECTED)
        local = await self.lookups.get(("domain", domain.lower()), lambda: self.store.is_local_domain(domain))
        if local:
            account_id = await self._account_for(address)
            if account_id is None:
                raise SMTPError(USER_UNKNOWN, f"unknown local recipient {address}")
            envelope.notes["local"].add(account_id)
            return
        try:
            split_address(address)
        except AddressError:
            # Valid SMTP, such as a quoted local part, but not storable in the queue.
            raise SMTPError(Reply(553, "5.1.3", "Recipient address syntax not supported here"), address) from None
        if address not in envelope.notes["remote"]:
            envelope.notes["remote"].append(address)

    async def _account_for(self, address: str) -> int | None:
        async def load() -> int | None:
            account = await self.store.resolve_recipient(address)
            return account.id if account is not None else None

        return await self.lookups.get(("account", address.lower()), load)

    # DATA -------------------------------------------------------------------

    async def handle_message(self, session: SessionState, envelope: Envelope, content: bytes) -> Reply:
        queue_id = f"{_ids.getrandbits(64):016X}"
        now = self.clock()
        protocol = headers.with_protocol_keyword(
            esmtp=session.extended_smtp,
            tls=session.is_tls,
            authenticated=session.authenticated,
            smtputf8=envelope.smtp_utf8,
        )
        received = headers.received_field(
            helo=session.host_name or "",
            client_address=session.client_address,
            hostname=self.hostname,
            protocol=protocol,
            queue_id=queue_id,
            tls_version=session.tls_version,
            tls_cipher=session.tls_cipher,
            recipients=envelope.rcpt_tos,
            now=now,
        )
        message = headers.prepend_fields(content, received=received, hostname=self.hostname, now=now)
        account_id = envelope.notes["account_id"]
        local = sorted(envelope.notes["local"])
        remote = list(envelope.notes["remote"])
        try:
            await self.submit(
                message,
                account_id=account_id,
                envelope_sender=envelope.mail_from,
                local_account_ids=local,
                remote_recipients=remote,
                queue_id=queue_id,
            )
        except (SQLAlchemyError, sqlite3.Error, StoreError, OSError, ValueError) as error:
            log.error(
                "session %s: storing message %s from <%s> failed: %s",
                session.id, queue_id, envelope.mail_from, error, exc_info=error,
            )
            raise SMTPError(COMMIT_FAILED, f"commit of {queue_id} failed") from error
        log.info(
            "session %s: accepted %s from <%s> (account %d): %d local, %d remote recipient(s), %d octets",
            session.id, queue_id, envelope.mail_from, account_id, len(local), len(remote), len(message),
        )
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
