"""Sending one message to the mail hosts of one domain with aiosmtplib.

One SMTP transaction carries every recipient of the domain. Each recipient
ends the attempt with its own reply: the RCPT reply if that was not 2xx,
otherwise the reply to the end of DATA. Hosts are tried in the resolver's
order. The next host is tried after a connection failure, a TLS failure, a 4xx
or 5xx reply to the greeting or EHLO, or a 4xx reply to MAIL; any other reply
ends the attempt.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from mailstack.transfer.resolver import MailHost

log = logging.getLogger(__name__)

TLS_POLICIES = ("none", "opportunistic", "required", "verify")

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
# Keep recorded replies short and on one line; peers may send anything.
MAX_REPLY_TEXT = 500
# An idle connection stays open this long for the next message to the same host,
# which saves the TCP and TLS handshakes (Postfix keeps its cache 2 s by default).
CONNECTION_CACHE_TIME = 5.0
# Transactions sent over one connection before it is closed and replaced.
MAX_TRANSACTIONS_PER_CONNECTION = 100


@dataclass(frozen=True)
class Reply:
    """A reply to one recipient, from the peer or made up locally for a failure."""

    code: int
    status: str  # RFC 3463 enhanced status, taken from the reply or derived from the code
    text: str
    remote_host: str | None = None
    in_reply_to: str = ""

    @property
    def delivered(self) -> bool:
        return self.status.startswith("2")

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")

    def describe(self) -> str:
        """Return one line for the queue listing and the DSN, like Postfix's "host said: ...".

        The line names the peer and the command the reply answered when known.
        """
        line = f"{self.code} {self.text}" if self.code else self.text
        if self.remote_host:
            line = f"{self.remote_host} said: {line}"
        if self.in_reply_to:
            line = f"{line} (in reply to {self.in_reply_to})"
        return line


def peer_reply(code: int, message: str, host: str, in_reply_to: str) -> Reply:
    """Build a Reply from an SMTP reply, taking the enhanced status from its text when present."""
    text = " ".join(message.split())[:MAX_REPLY_TEXT]
    match = _ENHANCED.match(text)
    if match and match.group(1) == str(code)[0]:
        status = ".".join(match.groups())
    else:
        status = f"{str(code)[0]}.0.0"
    return Reply(code, status, text, host, in_reply_to)


def local_failure(status: str, text: str) -> Reply:
    """Build a Reply for a failure seen on this side (DNS, connection, TLS, policy).

    Its code is 0, which marks it as local, and ``permanent`` follows the
    enhanced status.
    """
    return Reply(0, status, " ".join(text.split())[:MAX_REPLY_TEXT])


@dataclass(frozen=True)
class ClientSettings:
    local_hostname: str
    port: int = 25
    tls_policy: str = "opportunistic"
    tls_ca_file: Path | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    # Addresses this server listens on; an outbound connection starts from the one
    # that fits the peer's address, so that peers see the server's own address.
    source_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.tls_policy not in TLS_POLICIES:
            raise ValueError(f"tls_policy must be one of {', '.join(TLS_POLICIES)}, not {self.tls_policy!r}")


class _TryNextHost(Exception):
    """This host did not take the transaction, so the next one is tried."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


class _Plaintext(Exception):
    """Opportunistic TLS failed on this address; retry it without TLS."""


class _Stale(Exception):
    """A cached connection broke before DATA; retry the address on a new connection."""


@dataclass
class _Cached:
    client: aiosmtplib.SMTP
    idle_since: float
    transactions: int


def choose_source(target: str, candidates: Sequence[str]) -> str | None:
    """Return the listen address to connect from to ``target``, or None for the system's choice.

    A candidate fits when it has the target's IP version and is a loopback
    address exactly when the target is one; wildcard addresses never fit.
    """
    try:
        peer = ipaddress.ip_address(target)
    except ValueError:
        return None
    for candidate in candidates:
        try:
            source = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if source.is_unspecified or source.version != peer.version:
            continue
        if source.is_loopback == peer.is_loopback:
            return candidate
    return None


def _temporary_status(message: str) -> str:
    """Return a reply text whose 5.x.x enhanced status, if any, is made 4.x.x."""
    match = _ENHANCED.match(message.lstrip())
    if match and match.group(1) == "5":
        text = message.lstrip()
        return "4" + text[1:]
    return message


def _overflow(results: dict[str, Reply]) -> list[str]:
    """Return the recipients that a RCPT reply deferred for exceeding the peer's recipient limit."""
    return [
        recipient
        for recipient, reply in results.items()
        if reply.code == 452 and reply.in_reply_to == "RCPT TO" and reply.status in ("4.5.3", "4.0.0")
    ]


def _encoding_needed(sender: str, recipients: Sequence[str]) -> bool:
    return not (sender.isascii() and all(r.isascii() for r in recipients))


def _has_8bit(data: bytes) -> bool:
    return not data.isascii()


class Sender:
    """The SMTP client side of the relay."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._unverified = ssl.create_default_context()
        self._unverified.check_hostname = False
        self._unverified.verify_mode = ssl.CERT_NONE
        self._unverified.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.tls_policy == "verify":
            ca_file = settings.tls_ca_file
            cafile = str(ca_file) if ca_file is not None and str(ca_file) not in ("", ".") else None
            self._verified = ssl.create_default_context(cafile=cafile)
            self._verified.minimum_version = ssl.TLSVersion.TLSv1_2
        else:
            self._verified = None
        self._cache: dict[tuple[str, str], list[_Cached]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task] = set()
        self._closed = False

    async def close(self) -> None:
        """Close every cached connection with QUIT."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
        entries = [entry for cached in self._cache.values() for entry in cached]
        self._cache.clear()
        await asyncio.gather(*(self._close(entry.client) for entry in entries), *self._closing)

    async def send(
        self,
        hosts: Sequence[MailHost],
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        log_id: str = "",
    ) -> dict[str, Reply]:
        """Send ``data`` to ``recipients`` through the first host that takes the transaction.

        Returns one Reply per recipient. Connection, TLS and SMTP errors become
        temporary Replies, so only a bug here raises.
        """
        last: Reply | None = None
        for host in hosts:
            for address in host.addresses:
                label = f"{host.name}[{address}]"
                use_tls = self.settings.tls_policy != "none"
                cached = True
                while True:
                    try:
                        return await self._transaction(
                            host, address, label, use_tls, cached, sender, recipients, data, log_id
                        )
                    except _Plaintext:
                        log.info("%s: STARTTLS with %s failed; retrying without TLS", log_id, label)
                        use_tls = False
                        continue
                    except _Stale:
                        log.info("%s: cached connection to %s broke; opening a new one", log_id, label)
                        cached = False
                        continue
                    except _TryNextHost as exc:
                        last = exc.reply
                        log.info("%s: %s; trying the next host", log_id, exc.reply.describe())
                        break
        if last is None:
            last = local_failure("4.4.4", "no mail host to connect to")
        return {recipient: last for recipient in recipients}

    async def _transaction(
        self,
        host: MailHost,
        address: str,
        label: str,
        use_tls: bool,
        cached: bool,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        log_id: str,
    ) -> dict[str, Reply]:
        key = (host.name, address)
        entry = await self._checkout(key) if cached else None
        if entry is not None:
            client, transactions = entry.client, entry.transactions
            log.info("%s: reusing the connection to %s", log_id, label)
        else:
            client, transactions = await self._connect(host, address, label, use_tls, log_id), 0
        reusable = False
        try:
            result = await self._envelope_and_data(client, label, sender, recipients, data, log_id)
            await self._send_overflow(client, label, sender, data, log_id, result)
            reusable = client.is_connected
            return result
        except aiosmtplib.SMTPServerDisconnected as exc:
            if entry is not None:
                # Nothing was sent after MAIL yet, so a new connection cannot duplicate the message.
                raise _Stale() from exc
            raise _TryNextHost(local_failure("4.4.2", f"lost connection with {label}: {exc}")) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            raise _TryNextHost(local_failure("4.4.2", f"conversation with {label} timed out")) from exc
        except (OSError, aiosmtplib.SMTPException) as exc:
            raise _TryNextHost(local_failure("4.4.2", f"conversation with {label} failed: {exc}")) from exc
        finally:
            if reusable:
                self._checkin(key, client, transactions + 1)
            else:
                await self._close(client)

    async def _connect(
        self, host: MailHost, address: str, label: str, use_tls: bool, log_id: str
    ) -> aiosmtplib.SMTP:
        """Open a session with the greeting, EHLO and STARTTLS as the policy requires; raise _TryNextHost."""
        settings = self.settings
        source = choose_source(address, settings.source_addresses)
        client = aiosmtplib.SMTP(
            hostname=address,
            port=settings.port,
            local_hostname=settings.local_hostname,
            timeout=settings.command_timeout,
            start_tls=False,
            source_address=(source, 0) if source else None,
        )
        try:
            try:
                await client.connect(timeout=settings.connect_timeout)
            except aiosmtplib.SMTPConnectResponseError as exc:
                raise _TryNextHost(peer_reply(exc.code, exc.message, label, "initial connection")) from exc
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise _TryNextHost(local_failure("4.4.1", f"connection to {label} failed: {exc}")) from exc
            log.info("%s: connected to %s", log_id, label)
            await self._hello(client, label)
            await self._maybe_starttls(client, host, label, use_tls)
        except aiosmtplib.SMTPServerDisconnected as exc:
            await self._close(client)
            raise _TryNextHost(local_failure("4.4.2", f"lost connection with {label}: {exc}")) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            await self._close(client)
            raise _TryNextHost(local_failure("4.4.2", f"conversation with {label} timed out")) from exc
        except (OSError, aiosmtplib.SMTPException) as exc:
            await self._close(client)
            raise _TryNextHost(local_failure("4.4.2", f"conversation with {label} failed: {exc}")) from exc
        except BaseException:
            await self._close(client)
            raise
        return client

    # Connection cache ---------------------------------------------------------

    async def _checkout(self, key: tuple[str, str]) -> _Cached | None:
        """Return a live cached connection for ``key``, reset for a new transaction, or None."""
        entries = self._cache.get(key)
        now = asyncio.get_running_loop().time()
        while entries:
            entry = entries.pop()
            if now - entry.idle_since > CONNECTION_CACHE_TIME or not entry.client.is_connected:
                await self._close(entry.client)
                continue
            try:
                await entry.client.rset()
            except (aiosmtplib.SMTPException, OSError):
                entry.client.close()
                continue
            return entry
        return None

    def _checkin(self, key: tuple[str, str], client: aiosmtplib.SMTP, transactions: int) -> None:
        if self._closed or transactions >= MAX_TRANSACTIONS_PER_CONNECTION:
            self._close_later(client)
            return
        loop = asyncio.get_running_loop()
        self._cache.setdefault(key, []).append(_Cached(client, loop.time(), transactions))
        if self._expiry is None:
            self._expiry = loop.call_later(CONNECTION_CACHE_TIME, self._expire)

    def _expire(self) -> None:
        """Close the cached connections idle for longer than CONNECTION_CACHE_TIME."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for key, entries in list(self._cache.items()):
            keep = []
            for entry in entries:
                if now - entry.idle_since >= CONNECTION_CACHE_TIME:
                    self._close_later(entry.client)
                else:
                    keep.append(entry)
            if keep:
                self._cache[key] = keep
            else:
                del self._cache[key]
        if self._cache and not self._closed:
            self._expiry = loop.call_later(CONNECTION_CACHE_TIME, self._expire)

    async def _hello(self, client: aiosmtplib.SMTP, label: str) -> None:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError as exc:
            if exc.code >= 500 and client.is_connected:
                try:
                    await client.helo()
                    return
                except aiosmtplib.SMTPHeloError as helo_exc:
                    raise _TryNextHost(peer_reply(helo_exc.code, helo_exc.message, label, "HELO")) from helo_exc
            raise _TryNextHost(peer_reply(exc.code, exc.message, label, "EHLO")) from exc

    async def _maybe_starttls(self, client: aiosmtplib.SMTP, host: MailHost, label: str, use_tls: bool) -> None:
        policy = self.settings.tls_policy
        if not use_tls:
            return
        offered = client.supports_extension("starttls")
        if not offered:
            if policy in ("required", "verify"):
                raise _TryNextHost(local_failure("4.7.4", f"TLS is required, but {label} does not offer STARTTLS"))
            return
        context = self._verified if policy == "verify" else self._unverified
        try:
            await client.starttls(tls_context=context, server_hostname=host.name)
        except aiosmtplib.SMTPResponseException as exc:
            if policy == "opportunistic":
                raise _Plaintext() from exc
            raise _TryNextHost(peer_reply(exc.code, exc.message, label, "STARTTLS")) from exc
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
            if policy == "opportunistic":
                raise _Plaintext() from exc
            raise _TryNextHost(local_failure("4.7.5", f"TLS handshake with {label} failed: {exc}")) from exc
        await client.ehlo()

    async def _envelope_and_data(
        self,
        client: aiosmtplib.SMTP,
        label: str,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        log_id: str,
    ) -> dict[str, Reply]:
        options: list[str] = []
        encoding = "ascii"
        if _encoding_needed(sender, recipients):
            if not client.supports_extension("smtputf8"):
                reply = local_failure(
                    "5.6.7", f"{label} does not support SMTPUTF8, which the addresses of this message need"
                )
                return {recipient: reply for recipient in recipients}
            options.append("SMTPUTF8")
            encoding = "utf-8"
        if client.supports_extension("size"):
            limit = client.esmtp_extensions.get("size", "")
            if limit.isdigit() and 0 < int(limit) < len(data):
                reply = local_failure("5.3.4", f"message size {len(data)} exceeds the limit {limit} of {label}")
                return {recipient: reply for recipient in recipients}
            options.append(f"SIZE={len(data)}")
        if _has_8bit(data) and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")

        try:
            await client.mail(sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPSenderRefused as exc:
            reply = peer_reply(exc.code, exc.message, label, "MAIL FROM")
            if reply.permanent:
                return {recipient: reply for recipient in recipients}
            raise _TryNextHost(reply) from exc

        results: dict[str, Reply] = {}
        accepted: list[str] = []
        for recipient in recipients:
            try:
                await client.rcpt(recipient, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
                code, message = exc.code, exc.message
                if code == 552:
                    # RFC 5321 section 4.5.3.1.10: 552 to RCPT means too many
                    # recipients, which the client treats as temporary.
                    code, message = 452, _temporary_status(message)
                results[recipient] = peer_reply(code, message, label, "RCPT TO")
                log.info("%s: %s rejected %s: %s", log_id, label, recipient, results[recipient].text)
                continue
            accepted.append(recipient)
        if not accepted:
            await self._reset(client)
            return results

        try:
            response = await client.data(data)
            reply = peer_reply(response.code, response.message, label, "end of DATA")
        except aiosmtplib.SMTPDataError as exc:
            reply = peer_reply(exc.code, exc.message, label, "DATA")
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            # The peer may or may not have the message now. Sending it again risks a
            # duplicate and dropping it risks a loss, so the attempt is deferred.
            reply = local_failure("4.4.2", f"connection with {label} broke during DATA: {exc}")
        for recipient in accepted:
            results[recipient] = reply
        if reply.delivered:
            log.info("%s: %s accepted %d recipient(s): %s", log_id, label, len(accepted), reply.text)
        return results

    async def _send_overflow(
        self,
        client: aiosmtplib.SMTP,
        label: str,
        sender: str,
        data: bytes,
        log_id: str,
        results: dict[str, Reply],
    ) -> None:
        """Send to the recipients rejected with "too many recipients" in further transactions.

        A peer with a recipient limit replies 452 to the recipients beyond it
        (RFC 5321 section 4.5.3.1.10). They get the message in more
        transactions on the same connection for as long as each transaction
        delivers to some of them. ``results`` is updated in place.
        """
        remaining = _overflow(results)
        while remaining and client.is_connected:
            log.info("%s: %s limits recipients; %d more in a new transaction", log_id, label, len(remaining))
            try:
                more = await self._envelope_and_data(client, label, sender, remaining, data, log_id)
            except (aiosmtplib.SMTPException, OSError, _TryNextHost) as exc:
                # Earlier transactions delivered; the rest stay deferred with their 452.
                log.info("%s: further transaction with %s failed: %s", log_id, label, exc)
                client.close()
                return
            results.update(more)
            left = _overflow(more)
            if len(left) == len(remaining):
                return
            remaining = left

    def _close_later(self, client: aiosmtplib.SMTP) -> None:
        task = asyncio.get_running_loop().create_task(self._close(client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _reset(self, client: aiosmtplib.SMTP) -> None:
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            pass

    async def _close(self, client: aiosmtplib.SMTP) -> None:
        if not client.is_connected:
            return
        try:
            await client.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError):
            client.close()
