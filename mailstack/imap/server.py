"""The asyncio side of the IMAP server: sockets, framing, limits, TLS, timeouts and IDLE.

Each connection reads one command at a time. A command is a line plus the
literals it announces. The announced size of every literal is checked before
any byte of it is read (8 KiB before login, the APPEND limit after). A
synchronising literal is asked for with ``+`` only after that check. The
parser turns the bytes into a typed command, and the session runs it.

Defences and where they sit:

- line length: ``imap.max_line_length`` per line, BAD when exceeded;
- bad commands: ``imap.max_bad_commands`` BAD replies, then BYE;
- autologout: ``imap.login_timeout`` before login, ``imap.idle_timeout`` after;
- connections: ``imap.max_connections`` in total and per client address,
  counted from accept, so on the TLS port before the handshake, which gets
  ``TLS_HANDSHAKE_TIMEOUT`` seconds;
- plaintext pipelined after STARTTLS is discarded, never read as TLS data.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import socket
import ssl
from collections import Counter

from mailstack.imap import commands as c
from mailstack.imap import response as r
from mailstack.imap.parser import NEED_DATA, ContinuationLine, LiteralRequest, Parser, decode_sasl_response
from mailstack.imap.session import ChangeHub, ClientInfo, Session, State
from mailstack.imap.throttle import LoginThrottle
from mailstack.logs import RepeatLimiter
from mailstack.settings import IMAPSection
from mailstack.store import Store

log = logging.getLogger(__name__)

# Largest literal accepted before login: enough for any user name and password.
PRE_AUTH_LITERAL_LIMIT = 8 * 1024
# How often an IDLE session checks HIGHESTMODSEQ for changes made by other processes.
CHANGE_POLL_INTERVAL = 0.5
READ_SIZE = 64 * 1024
# After login, a LITERAL+ literal over its limit is skipped when it is at most
# this many times the limit. A larger one closes the connection.
NON_SYNC_SKIP_FACTOR = 2
# Seconds a client on the TLS port has to finish the handshake. Its connection is
# counted against the limits from the moment it is accepted.
TLS_HANDSHAKE_TIMEOUT = 10.0
# Seconds the TLS listener waits after a failed accept (for example EMFILE) before the next.
ACCEPT_RETRY_DELAY = 0.1
LISTEN_BACKLOG = 100


class ConnectionClosed(Exception):
    """The client went away, or the server ends the connection after BYE."""


class Limits:
    """Counts open connections in total and per client address."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.open = 0
        self.by_address: Counter[str] = Counter()

    def acquire(self, address: str) -> str | None:
        """Count one connection; return the reason to refuse it, or None when it may proceed."""
        if self.open >= self.total:
            return "too many connections to this server"
        if self.by_address[address] >= self.per_address:
            return "too many connections from your address"
        self.open += 1
        self.by_address[address] += 1
        return None

    def release(self, address: str) -> None:
        self.open -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]


class TLSListener:
    """Listening sockets for TLS from the first byte, accepted by this class itself.

    ``asyncio.start_server(ssl=...)`` hands a connection over only after its
    handshake, so a client that never sends a ClientHello would escape the
    connection limits. Here each accepted socket goes to ``on_accept`` at once.
    """

    def __init__(self, sockets: list[socket.socket], on_accept) -> None:
        self.sockets = sockets
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._accept(sock, on_accept)) for sock in sockets]

    @classmethod
    async def bind(cls, host: str, port: int, on_accept) -> TLSListener:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, on_accept)

    async def _accept(self, sock: socket.socket, on_accept) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, peer = await loop.sock_accept(sock)
            except OSError as exc:
                log.warning("IMAP TLS listener: accept failed: %s", exc)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            on_accept(connection, peer)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for sock in self.sockets:
            sock.close()


class IMAPServer:
    """Every listener and connection of one IMAP service."""

    def __init__(self, store: Store, config: IMAPSection, ssl_context: ssl.SSLContext | None) -> None:
        self.store = store
        self.config = config
        self.ssl_context = ssl_context
        self.hub = ChangeHub(store, CHANGE_POLL_INTERVAL)
        self.throttle = LoginThrottle(
            limit=config.auth_failure_limit, window=config.auth_failure_window, delay=config.auth_failure_delay
        )
        self.limits = Limits(config.max_connections, config.max_connections_per_address)
        self._refusal_log = RepeatLimiter()
        self.servers: list[asyncio.base_events.Server | TLSListener] = []
        self.connections: dict[asyncio.Task, Connection] = {}
        # Connections on the TLS port, each until its session ends; in ``handshakes`` until TLS is up.
        self.tls_tasks: set[asyncio.Task] = set()
        self.handshakes: set[asyncio.Task] = set()
        self.closing = False
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(3)

    async def prepare(self) -> None:
        """Compile the hot queries before the first client comes, so its first SELECT is not slower."""
        await self.store.prepare()
        await self.store.get_mailbox(-1, "INBOX")

    async def listen(self, host: str, port: int, *, implicit_tls: bool) -> asyncio.base_events.Server | TLSListener:
        """Bind one listener; ``implicit_tls`` makes it a TLS-on-connect listener like port 993."""
        server: asyncio.base_events.Server | TLSListener
        if implicit_tls:
            if self.ssl_context is None:
                raise ValueError("implicit TLS listener requested, but the IMAP server has no SSL context")
            server = await TLSListener.bind(host, port, self._accept_tls)
        else:
            server = await asyncio.start_server(
                lambda reader, writer: self._serve(reader, writer, implicit_tls), host, port, reuse_address=True
            )
        self.servers.append(server)
        for sock in server.sockets:
            log.info("IMAP listening on %s port %d (%s)", *sock.getsockname()[:2], "TLS" if implicit_tls else "STARTTLS")
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, implicit_tls: bool) -> None:
        peer = writer.get_extra_info("peername") or ("unknown", 0)
        address, port = str(peer[0]), int(peer[1])
        session_id = f"{self._prefix}-{next(self._ids)}"
        if self.closing:
            writer.close()
            return
        refusal = self.limits.acquire(address)
        if refusal is not None:
            self._log_refusal(session_id, address, refusal)
            with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError):
                writer.write(r.untagged_status(b"BYE", refusal, b"UNAVAILABLE"))
                await asyncio.wait_for(writer.drain(), 5)
            writer.close()
            return
        try:
            await self._run_session(reader, writer, ClientInfo(address, port, session_id), implicit_tls)
        finally:
            self.limits.release(address)

    async def _run_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: ClientInfo, implicit_tls: bool
    ) -> None:
        task = asyncio.current_task()
        connection = Connection(self, reader, writer, client, implicit_tls)
        if task is not None:
            self.connections[task] = connection
        try:
            await connection.run()
        except asyncio.CancelledError:
            pass
        finally:
            if task is not None:
                self.connections.pop(task, None)

    def _log_refusal(self, session_id: str, address: str, refusal) -> None:
        allowed, suppressed = self._refusal_log.allow(address)
        if not allowed:
            return
        more = f" ({suppressed} more from this address not logged)" if suppressed else ""
        log.warning("IMAP connection %s from %s refused: %s%s", session_id, address, refusal, more)

    def _accept_tls(self, sock: socket.socket, peer: tuple) -> None:
        """Count a connection accepted on the TLS port, then start its handshake in a task."""
        address, port = str(peer[0]), int(peer[1])
        session_id = f"{self._prefix}-{next(self._ids)}"
        if self.closing:
            sock.close()
            return
        refusal = self.limits.acquire(address)
        if refusal is not None:
            # Closed without a handshake, which would cost more than the refused client is worth.
            self._log_refusal(session_id, address, refusal)
            sock.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve_tls(sock, ClientInfo(address, port, session_id)))
        self.tls_tasks.add(task)
        self.handshakes.add(task)
        task.add_done_callback(self.tls_tasks.discard)

    async def _serve_tls(self, sock: socket.socket, client: ClientInfo) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        try:
            reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(reader)
            try:
                transport, _protocol = await loop.connect_accepted_socket(
                    lambda: protocol, sock, ssl=self.ssl_context, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT
                )
            except (ssl.SSLError, ConnectionError, OSError, asyncio.TimeoutError) as exc:
                log.info(
                    "IMAP connection %s from %s: TLS handshake failed: %s: %s",
                    client.session_id, client.address, type(exc).__name__, exc,
                )
                sock.close()
                return
            except asyncio.CancelledError:
                sock.close()
                return
            finally:
                if task is not None:
                    self.handshakes.discard(task)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await self._run_session(reader, writer, client, implicit_tls=True)
        finally:
            self.limits.release(client.address)

    async def close(self, timeout: float) -> None:
        """Stop accepting, end idle sessions, and give running commands ``timeout`` seconds to finish."""
        if self.closing:
            return
        self.closing = True
        for server in self.servers:
            server.close()
        handshakes = list(self.handshakes)
        for task in handshakes:
            task.cancel()
        # Sessions waiting for the client end at once; those running a command finish it first.
        for task, connection in list(self.connections.items()):
            if not connection.busy:
                task.cancel()
        pending = list(self.connections) + handshakes
        if pending:
            _done, still = await asyncio.wait(pending, timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                log.warning("IMAP: %d sessions cancelled at shutdown after %.1f s", len(still), timeout)
                await asyncio.wait(still, timeout=1)
        self.hub.close()
        log.info("IMAP stopped")


class Connection:
    """One client connection: framing and the command loop around a Session."""

    def __init__(
        self,
        server: IMAPServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: ClientInfo,
        implicit_tls: bool,
    ) -> None:
        self.server = server
        self.config = server.config
        self.reader = reader
        self.writer = writer
        self.client = client
        self.bad_commands = 0
        self.busy = False
        self._literal_rejected = False
        self._literal_total = 0
        self.parser = Parser(max_line_length=server.config.max_line_length)
        # Responses queued by the session; written in one call per flush, because each
        # transport write is a separate TLS record and system call.
        self.output: list[bytes] = []
        self.session = Session(
            store=server.store,
            config=server.config,
            hub=server.hub,
            throttle=server.throttle,
            client=client,
            tls_active=implicit_tls,
            emit=self.output.append,
            drain=self.drain,
        )

    # I/O ------------------------------------------------------------------------------

    @property
    def timeout(self) -> float:
        if self.session.state is State.NOT_AUTHENTICATED:
            return self.config.login_timeout
        return self.config.idle_timeout

    async def drain(self) -> None:
        """Write the queued responses and wait until the transport buffer is low again."""
        if self.output:
            self.writer.write(b"".join(self.output))
            self.output.clear()
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        """Write the queued responses followed by ``data``."""
        self.output.append(data)
        await self.drain()

    async def receive(self, timeout: float | None = None) -> None:
        """Read what the client sent and feed it to the parser; raise ConnectionClosed at EOF or timeout."""
        try:
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout or self.timeout)
        except asyncio.TimeoutError:
            raise ConnectionClosed("autologout") from None
        if not data:
            raise ConnectionClosed("client closed the connection")
        self.parser.feed(data)

    def literal_limit(self, request: LiteralRequest) -> int:
        if self.session.state is State.NOT_AUTHENTICATED:
            return PRE_AUTH_LITERAL_LIMIT
        if request.command == "APPEND":
            return self.config.append_limit
        return self.config.max_line_length

    async def next_event(self) -> c.Command | ContinuationLine | None:
        """Return the next command or continuation line; None after a rejected command.

        Literal announcements are decided here, before any literal byte is read.
        """
        while True:
            try:
                event = self.parser.next_event()
            except r.ImapError as exc:
                self._literal_total = 0
                log.info("session %s: rejected command: %s", self.client.session_id, exc.text)
                await self.reject(exc, exc.tag)
                return None
            if event is NEED_DATA:
                await self.receive()
                continue
            if isinstance(event, LiteralRequest):
                await self.decide_literal(event)
                if self.parser.pending_literal is None and self._literal_rejected:
                    self._literal_rejected = False
                    self._literal_total = 0
                    return None
                continue
            self._literal_total = 0
            return event  # type: ignore[return-value]

    async def decide_literal(self, request: LiteralRequest) -> None:
        limit = self.literal_limit(request)
        # One command may carry several literals; together they get twice the limit of one,
        # so a chain of literals cannot fill memory either.
        self._literal_total += request.size
        if request.size <= limit and self._literal_total <= 2 * limit:
            self.parser.accept_literal()
            if request.synchronizing:
                await self.send(r.continuation("ready for literal data"))
            return
        error: r.ImapError
        if self.session.state is State.NOT_AUTHENTICATED:
            error = r.BadCommand(f"literal of {request.size} bytes exceeds the {limit} bytes allowed before login")
        elif request.command == "APPEND":
            error = r.TooBig(f"message of {request.size} bytes exceeds the APPEND limit of {limit} bytes")
        else:
            error = r.BadCommand(f"literal of {request.size} bytes exceeds the limit of {limit} bytes")
        log.info("session %s: literal of %d bytes rejected (limit %d)", self.client.session_id, request.size, limit)
        if not request.synchronizing and (
            self.session.state is State.NOT_AUTHENTICATED or request.size > limit * NON_SYNC_SKIP_FACTOR
        ):
            # A LITERAL+ literal is already on its way; skipping that much is not worth it.
            await self.send(error.render(request.tag or "*"))
            raise ConnectionClosed("non-synchronising literal over the limit")
        self.parser.reject_literal()
        self._literal_rejected = True
        await self.reject(error, request.tag)

    # Command loop -------------------------------------------------------------------

    async def run(self) -> None:
        client = self.client
        log.info(
            "IMAP session %s from %s:%d started (%s)",
            client.session_id, client.address, client.port, "TLS" if self.session.tls_active else "plain",
        )
        reason = "logout"
        try:
            greeting = r.untagged_status(b"OK", "mailstack IMAP4rev1 ready", self.session.capability_code())
            await self.send(greeting)
            while self.session.state is not State.LOGOUT:
                if not await self.step():
                    break
        except ConnectionClosed as exc:
            reason = str(exc)
            with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError):
                if reason == "autologout":
                    self.writer.write(r.untagged_status(b"BYE", "autologout: idle for too long"))
                elif reason.startswith("non-synchronising"):
                    self.writer.write(r.untagged_status(b"BYE", "literal too large; closing the connection"))
                await asyncio.wait_for(self.writer.drain(), 5)
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            reason = f"connection error: {exc.__class__.__name__}"
        except Exception:
            # A failure outside any command (for example in framing) leaves the
            # stream in an unknown state, so the session ends instead of going on.
            error_id = secrets.token_hex(4)
            reason = f"internal error, id {error_id}"
            log.exception("IMAP session %s failed, error id %s", client.session_id, error_id)
            with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError):
                self.writer.write(r.untagged_status(b"BYE", f"internal server error, id {error_id}", b"SERVERBUG"))
                await asyncio.wait_for(self.writer.drain(), 5)
        except asyncio.CancelledError:
            reason = "server shutdown"
            with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
                self.writer.write(r.untagged_status(b"BYE", "server shutting down"))
                await asyncio.wait_for(self.writer.drain(), 1)
            raise
        finally:
            self.session.close()
            with contextlib.suppress(Exception):
                self.writer.close()
            log.info("IMAP session %s ended: %s", client.session_id, reason)

    async def step(self) -> bool:
        """Read and run one command; return False when the connection must close."""
        self.busy = False
        if self.server.closing:
            await self.send(r.untagged_status(b"BYE", "server shutting down"))
            return False
        event = await self.next_event()
        if event is None:
            return self.bad_commands < self.config.max_bad_commands
        if isinstance(event, ContinuationLine):
            # A stray line where a command was expected (for example DONE after IDLE ended).
            return await self.reject(r.BadCommand("unexpected continuation line"), None)
        self.busy = True
        log.debug("session %s: %s %s", self.client.session_id, event.tag, event.name)
        return await self.execute(event)

    async def reject(self, error: r.ImapError, tag: str | None) -> bool:
        await self.send(error.render(tag))
        if isinstance(error, r.BadCommand):
            return await self.count_bad()
        return True

    async def count_bad(self) -> bool:
        self.bad_commands += 1
        if self.bad_commands >= self.config.max_bad_commands:
            log.warning("session %s: too many bad commands, closing", self.client.session_id)
            await self.send(r.untagged_status(b"BYE", "too many invalid commands"))
            return False
        return True

    async def read_continuation(self) -> ContinuationLine:
        self.parser.expect_continuation()
        while True:
            event = self.parser.next_event()
            if event is NEED_DATA:
                await self.receive()
                continue
            assert isinstance(event, ContinuationLine)
            return event

    async def execute(self, command: c.Command) -> bool:
        session = self.session
        try:
            session.check_state(command)
            if isinstance(command, c.StartTLS):
                return await self.starttls(command)
            if isinstance(command, c.Idle):
                return await self.idle(command)
            if isinstance(command, c.Authenticate) and command.initial_response is None:
                session.check_authenticate(command)
                await self.send(r.continuation(""))
                line = await self.read_continuation()
                command = c.Authenticate(command.tag, command.mechanism, decode_sasl_response(line, command.tag))
            reply = await session.handle(command)
        except r.Bye as exc:
            await self.send(exc.render())
            return False
        except r.ImapError as exc:
            await self.send(exc.render(command.tag))
            if isinstance(exc, r.BadCommand):
                return await self.count_bad()
            return True
        except (ConnectionClosed, ConnectionError, OSError, asyncio.CancelledError):
            raise
        except Exception:
            error_id = secrets.token_hex(4)
            log.exception("session %s: %s failed, error id %s", self.client.session_id, command.name, error_id)
            await self.send(r.ServerBug(error_id).render(command.tag))
            return True
        await self.send(reply)
        return session.state is not State.LOGOUT

    async def starttls(self, command: c.StartTLS) -> bool:
        if self.session.tls_active:
            raise r.BadCommand("TLS is already active")
        context = self.server.ssl_context
        if context is None:
            raise r.Unavailable("TLS is not configured on this server")
        # Stop reading before the OK goes out: the client's TLS handshake follows the OK
        # at once, and bytes read into the plaintext buffer would never reach TLS.
        self.writer.transport.pause_reading()
        # Bytes the client sent after STARTTLS and before the OK were never protected;
        # reading them as commands after the handshake would allow command injection.
        dropped = self.parser.discard_buffered()
        buffered = getattr(self.reader, "_buffer", None)
        if buffered:
            dropped += len(buffered)
            buffered.clear()
        if dropped:
            log.warning("session %s: discarded %d plaintext bytes sent after STARTTLS", self.client.session_id, dropped)
        await self.send(r.tagged(command.tag, b"OK", "begin TLS negotiation now"))
        try:
            await asyncio.wait_for(self.writer.start_tls(context), self.config.login_timeout)
        except (ssl.SSLError, asyncio.TimeoutError, ConnectionError, OSError) as exc:
            log.info("session %s: TLS handshake failed: %s", self.client.session_id, exc)
            raise ConnectionClosed("TLS handshake failed") from None
        self.session.tls_active = True
        log.info("session %s: TLS started", self.client.session_id)
        return True

    async def idle(self, command: c.Idle) -> bool:
        """Run IDLE: send changes as they happen until the client sends DONE."""
        session = self.session
        if session.view is not None:
            await session.sync(allow_expunge=True)
        await self.send(r.continuation("idling"))
        self.busy = False
        read = asyncio.ensure_future(self.read_continuation())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.idle_timeout
        if session.view is not None:
            self.server.hub.start_idle(session.view.mailbox_id, session.changed, session.view.modseq)
        try:
            while not read.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ConnectionClosed("autologout")
                waiter = asyncio.ensure_future(session.changed.wait())
                done, _pending = await asyncio.wait(
                    {read, waiter}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                if waiter in done and session.view is not None and await session.sync(allow_expunge=True):
                    await self.drain()
        except r.Bye as exc:
            read.cancel()
            await self.send(exc.render())
            return False
        except BaseException:
            read.cancel()
            raise
        finally:
            self.server.hub.stop_idle(session.changed)
        self.busy = True
        line = read.result()
        if not line.is_done:
            await self.send(r.tagged(command.tag, b"BAD", "expected DONE to end IDLE"))
            return await self.count_bad()
        await self.send(r.tagged(command.tag, b"OK", "IDLE terminated"))
        return True


