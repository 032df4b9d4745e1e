"""The inbound MTA policy on port 25: mail for this server's domains, and nothing else.

Recipients are accepted only in a local domain and only when an account or
alias receives them: an unknown user gets 550 5.1.1, and any other domain
554 5.7.1, so the server is never an open relay. Addresses that try to route
through a local domain to somewhere else (``user%other@here``,
``other!user@here``, ``"user@other"@here``, a domain literal that is not one of
this server's addresses, a trailing dot) get the same 554 5.7.1. A source route
such as ``@relay:user@here.test`` is ignored, as RFC 5321 section 4.1.1.3 recommends,
so only its final mailbox counts.

A message that already carries more Received fields than the configured
maximum is a loop and gets 554 5.4.6. Accepted messages get Return-Path and
Received fields and are appended to every recipient's INBOX in one
transaction; the 250 goes out only after that commit.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
from collections.abc import Iterable

from mailstack.smtp import Envelope, Path, Reply, SessionState, SMTPError, SMTPHandler
from mailstack.store import Store, new_queue_id

log = logging.getLogger(__name__)

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
UNKNOWN_USER = Reply(550, "5.1.1", "No such user here")
LOOP_DETECTED = Reply(554, "5.4.6", "Too many Received header fields: mail loop detected")
POSTMASTER = "postmaster"


def count_received(content: bytes) -> int:
    """Return how many Received fields the header section of ``content`` has."""
    end = content.find(b"\r\n\r\n")
    headers = content if end < 0 else content[: end + 2]
    return sum(1 for line in headers.split(b"\r\n") if line[:9].lower() == b"received:")


def protocol_name(session: SessionState, envelope: Envelope) -> str:
    """Return the "with" protocol of the Received field (RFC 3848, RFC 6531 section 3.7.3)."""
    if envelope.smtp_utf8:
        name = "UTF8SMTP"
    elif session.extended_smtp:
        name = "ESMTP"
    else:
        name = "SMTP"
    if session.is_tls:
        name += "S"
    return name


class InboundHandler(SMTPHandler):
    """Accept mail for local recipients and store it in their INBOXes."""

    def __init__(
        self,
        store: Store,
        *,
        hostname: str,
        max_received_headers: int = 50,
        local_addresses: Iterable[str] = (),
        primary_domain: str | None = None,
    ) -> None:
        self.store = store
        # The first domain of [server] domains: its postmaster receives <postmaster>.
        self.primary_domain = primary_domain
        self.hostname = hostname
        self.max_received_headers = max_received_headers
        self.local_addresses = {_normalize_ip(address) for address in local_addresses} - {None}

    async def check_sender(self, session: SessionState, envelope: Envelope, path: Path) -> None:
        envelope.notes["accounts"] = {}
        log.info(
            "session %s: MAIL FROM:<%s> from %s (%s)",
            session.id,
            path.address,
            session.client_address,
            session.host_name,
        )

    async def check_recipient(self, session: SessionState, envelope: Envelope, path: Path) -> None:
        address = await self._local_address(path, session)
        account = await self.store.resolve_recipient(address)
        if account is None:
            raise SMTPError(UNKNOWN_USER, f"unknown recipient <{path.address}>")
        envelope.notes.setdefault("accounts", {})[path.address] = account.id
        log.info("session %s: RCPT TO:<%s> accepted for account %s", session.id, path.address, account.address)

    async def _local_address(self, path: Path, session: SessionState) -> str:
        """Return the address to look up for a local recipient; raise 554 5.7.1 for any other."""
        local, domain = path.local_part, path.domain
        if not domain and local.lower() == POSTMASTER:
            # RFC 5321 section 4.5.1: <postmaster> without a domain must be accepted.
            return await self._postmaster()
        if domain.endswith("."):
            raise SMTPError(RELAY_DENIED, f"trailing dot in <{path.address}>")
        if any(mark in local for mark in ("%", "!", "@", '"')):
            raise SMTPError(RELAY_DENIED, f"routing characters in the local part of <{path.address}>")
        if domain.startswith("["):
            literal = _normalize_ip(domain[1:-1].removeprefix("IPv6:").removeprefix("ipv6:"))
            if literal is None or literal not in self.local_addresses:
                raise SMTPError(RELAY_DENIED, f"foreign domain literal in <{path.address}>")
            if local.lower() != POSTMASTER:
                raise SMTPError(UNKNOWN_USER, f"only postmaster is served at a domain literal: <{path.address}>")
            return await self._postmaster()
        if not await self.store.is_local_domain(domain):
            raise SMTPError(RELAY_DENIED, f"domain of <{path.address}> is not served here")
        return path.address

    async def _postmaster(self) -> str:
        """Return the postmaster address of the primary domain, else of the first local domain that has one."""
        names = [domain.name for domain, _count in await self.store.list_domains()]
        if self.primary_domain in names:
            names.remove(self.primary_domain)
            names.insert(0, self.primary_domain)
        for name in names:
            address = f"{POSTMASTER}@{name}"
            if await self.store.resolve_recipient(address) is not None:
                return address
        raise SMTPError(UNKNOWN_USER, "no postmaster account or alias in any local domain")

    async def handle_message(self, session: SessionState, envelope: Envelope, content: bytes) -> Reply:
        hops = count_received(content)
        if hops > self.max_received_headers:
            raise SMTPError(LOOP_DETECTED, f"{hops} Received fields from <{envelope.mail_from}>")
        accounts: dict[str, int] = envelope.notes.get("accounts", {})
        message_id = new_queue_id()
        data = self._trace_fields(session, envelope, message_id) + content
        account_ids = sorted(set(accounts.values()))
        await self.store.deliver_local(data, account_ids)
        log.info(
            "session %s: message %s from <%s> delivered to %d recipient(s), %d octets",
            session.id,
            message_id,
            envelope.mail_from,
            len(account_ids),
            len(data),
        )
        return Reply(250, "2.0.0", f"Ok: queued as {message_id}")

    def _trace_fields(self, session: SessionState, envelope: Envelope, message_id: str) -> bytes:
        """Build the Return-Path and Received fields (RFC 5321 section 4.4) put above the message."""
        helo = _printable(session.host_name or "unknown")
        client = session.client_address
        recipients = envelope.rcpt_tos
        for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
        tls = f"\r\n\t(using {session.tls_version} with cipher {session.tls_cipher})" if session.is_tls else ""
        received = (
            f"Received: from {helo} ([{client}])\r\n"
            f"\tby {self.hostname} (mailstack) with {protocol_name(session, envelope)} id {message_id}"
            f"{tls}{for_clause};\r\n"
            f"\t{email.utils.format_datetime(self.store.clock())}\r\n"
        )
        return_path = f"Return-Path: <{envelope.mail_from}>\r\n"
        return (return_path + received).encode("utf-8")


def _normalize_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _printable(text: str) -> str:
    return "".join(ch if 33 <= ord(ch) < 127 else "?" for ch in text)[:255]
