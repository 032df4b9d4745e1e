"""Listeners, connection limits and graceful shutdown for the SMTP services."""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from dataclasses import dataclass
from typing import Literal

from mailstack.logs import RepeatLimiter
from mailstack.smtp import replies
from mailstack.smtp.replies import Reply
from mailstack.smtp.session import TLS_HANDSHAKE_TIMEOUT, SMTPHandler, SMTPSession

log = logging.getLogger(__name__)

TLSMode = Literal["none", "starttls", "implicit"]

__all__ = ["TLS_HANDSHAKE_TIMEOUT", "Listener", "SMTPOptions", "SMTPServer", "TLSMode"]


@dataclass(frozen=True)
class SMTPOptions:
    """Limits shared by every listener of one service."""

    hostname: str
    max_message_size: int
    max_recipients: int = 100
    idle_timeout: float = 300.0
    max_connections: int = 500
    max_connections_per_address: int = 50
    # Text after the host name in the 220 greeting.
    ident: str = "ESMTP mailstack"

    def __post_init__(self) -> None:
        if self.max_message_size < 1 or self.max_recipients < 1:
            raise ValueError("max_message_size and max_recipients must be positive")
        if self.max_connections < 1 or self.max_connections_per_address < 1:
            raise ValueError("connection limits must be positive")
        if self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")


@dataclass(frozen=True)
class Listener:
    """Settings of one listening port.

    ``tls``: "starttls" offers STARTTLS, "implicit" runs TLS from the first
    byte (RFC 8314), "none" is plaintext only. ``require_tls`` refuses
    everything but EHLO, STARTTLS, NOOP and QUIT before TLS (530 5.7.0).
    ``require_auth`` refuses MAIL, RCPT and DATA before AUTH (530 5.7.0).
    Clients that the handler trusts skip both requirements.
    """

    name: str
    tls: TLSMode = "none"
    require_tls: bool = False
    require_auth: bool = False


class SMTPServer:
    """The sockets and sessions of one SMTP service (for example submission on 587 and 465).

    Counts connections in total and per client address across all of its
    listeners, and on :meth:`close` stops accepting, sends 421 to idle
    sessions, waits for running commands and then aborts what remains.
    """

    def __init__(
        self,
        name: str,
        handler: SMTPHandler,
        options: SMTPOptions,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.handler = handler
        self.options = options
        self.ssl_context = ssl_context
        self.sessions: set[SMTPSession] = set()
        self.closing = False
        self._per_address: collections.Counter[str] = collections.Counter()
        # Refused connections are logged at a bounded rate per client address.
        self.refusal_log = RepeatLimiter()
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()

    async def listen(self, host: str, port: int, listener: Listener) -> list[tuple[str, int]]:
        """Bind ``host``:``port`` (0 picks a free port) and return the bound socket addresses."""
        if listener.tls != "none" and self.ssl_context is None:
            raise ValueError(f"listener {listener.name} needs TLS but the server has no SSL context")
        loop = asyncio.get_running_loop()
        # Implicit-TLS listeners accept plain TCP too: the session counts the
        # connection first and then runs the handshake itself.
        server = await loop.create_server(
            lambda: SMTPSession(self, listener),
            host=host,
            port=port,
            reuse_address=True,
            start_serving=True,
        )
        self._servers.append(server)
        addresses = [sock.getsockname()[:2] for sock in server.sockets]
        for address in addresses:
            log.info("%s listening on %s port %d (%s, TLS %s)", self.name, address[0], address[1], listener.name, listener.tls)
        return addresses

    def _admit(self, session: SMTPSession) -> Reply | None:
        """Count a new connection, or return the 421 reply that refuses it."""
        if self.closing:
            return replies.SHUTTING_DOWN
        if len(self.sessions) >= self.options.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        if self._per_address[session.client_address] >= self.options.max_connections_per_address:
            return replies.TOO_MANY_FROM_ADDRESS
        self.sessions.add(session)
        self._per_address[session.client_address] += 1
        self._idle.clear()
        return None

    def _release(self, session: SMTPSession) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self._per_address[session.client_address] -= 1
        if self._per_address[session.client_address] <= 0:
            del self._per_address[session.client_address]
        if not self.sessions:
            self._idle.set()

    async def close(self, timeout: float) -> None:
        """Stop accepting, let running commands finish within ``timeout`` seconds, then abort."""
        self.closing = True
        for server in self._servers:
            server.close()
        for session in list(self.sessions):
            session.close_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%s: %d session(s) still open after %.1f s; aborting them", self.name, len(self.sessions), timeout)
            for session in list(self.sessions):
                session.abort()
        self._servers.clear()
        log.info("%s stopped", self.name)
