"""One SMTP connection: aiosmtpd's protocol with mailstack's rules on top.

aiosmtpd (1.4.6) reads command lines, runs STARTTLS and dispatches commands.
This subclass replaces the commands whose rules differ (EHLO, HELO, AUTH,
MAIL, RCPT, DATA, STARTTLS) and keeps the rest. Policy lives in an
:class:`SMTPHandler`; this module only speaks the protocol.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import random
import secrets
from asyncio import sslproto
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, Envelope as _AiosmtpdEnvelope, Session as _AiosmtpdSession

from mailstack.smtp import replies
from mailstack.smtp.data import DataReader
from mailstack.smtp.paths import Path, PathError, parse_path_argument, split_parameters
from mailstack.smtp.replies import Reply, SMTPError, add_enhanced_code, printable

if TYPE_CHECKING:
    from mailstack.smtp.server import Listener, SMTPServer

log = logging.getLogger(__name__)

# Bytes taken from the stream reader per read during DATA. It must exceed what
# the reader can buffer (2 x READER_LIMIT plus one socket read of at most
# 256 KiB), so that one read empties the buffer and bytes pipelined after the
# final dot can be given back in order.
READ_SIZE = 4 * 1024 * 1024
# The stream reader's buffer limit: the longest command line read at once, and
# the amount buffered before reading from the socket pauses.
READER_LIMIT = 64 * 1024
# RFC 5321 section 4.5.3.1.4 allows 512 octets per command line; MAIL grows by
# the parameters this server advertises, and AUTH lines hold initial responses
# (RFC 4954 section 4 allows 12288 octets).
COMMAND_LIMITS = {"MAIL": 512 + 26 + 10 + 20 + 64, "RCPT": 512, "AUTH": 12288}

AUTH_MECHANISMS = ("PLAIN", "LOGIN")

# The HELP text for each command that SMTPSession implements. EXPN is left
# out because aiosmtpd answers it with 502 only.
COMMAND_SYNTAX = {
    "AUTH": "AUTH mechanism [initial-response]",
    "DATA": "DATA",
    "EHLO": "EHLO hostname",
    "HELO": "HELO hostname",
    "HELP": "HELP [command]",
    "MAIL": "MAIL FROM:<address> [SIZE=octets] [BODY=7BIT|8BITMIME] [SMTPUTF8]",
    "NOOP": "NOOP [string]",
    "QUIT": "QUIT",
    "RCPT": "RCPT TO:<address>",
    "RSET": "RSET",
    "STARTTLS": "STARTTLS",
    "VRFY": "VRFY address",
}

# Seconds an implicit-TLS client has to finish the TLS handshake. The
# connection counts against the limits from the moment it is accepted, so
# this bounds how long a client that never sends a ClientHello keeps a slot.
TLS_HANDSHAKE_TIMEOUT = 10.0

# Session ids only tell log lines apart, so a PRNG seeded once from the OS is
# enough; reading os.urandom for each connection was measurably slow.
_session_ids = random.Random()
_LOGIN_USERNAME_PROMPT = b"Username:"
_LOGIN_PASSWORD_PROMPT = b"Password:"


class SessionState(_AiosmtpdSession):
    """Connection state passed to handler hooks; a new one starts after STARTTLS.

    ``auth_data`` contains what :meth:`SMTPHandler.authenticate` returned.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.id = ""
        self.listener = ""
        self.client_address = ""
        self.trusted = False
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None

    @property
    def is_tls(self) -> bool:
        return self.tls_version is not None


class Envelope(_AiosmtpdEnvelope):
    """One mail transaction. ``notes`` is for the handler: data it found at MAIL and RCPT."""

    def __init__(self) -> None:
        super().__init__()
        self.body_type = "7BIT"
        self.declared_size: int | None = None
        self.notes: dict[str, Any] = {}


class SMTPHandler:
    """The policy of one listener kind; subclasses override the hooks they need.

    A hook answers a command by raising :class:`SMTPError` with its reply, or
    by returning normally to accept it. Any other exception becomes
    451 4.3.0 with a log reference.
    """

    # Whether AUTH is offered (only ever over TLS).
    supports_auth = False

    def is_trusted(self, client_address: str) -> bool:
        """Tell whether a client may skip STARTTLS and AUTH on listeners that require them."""
        return False

    async def authenticate(self, session: SessionState, mechanism: str, username: str, password: str) -> Any:
        """Return an identity for valid credentials, None for invalid ones; may raise SMTPError."""
        return None

    async def check_sender(self, session: SessionState, envelope: Envelope, path: Path) -> None:
        """Accept or reject MAIL FROM; ``path.is_null`` for ``<>``."""

    async def check_recipient(self, session: SessionState, envelope: Envelope, path: Path) -> None:
        """Accept or reject one RCPT TO; the session adds it to the envelope afterwards."""

    async def handle_message(self, session: SessionState, envelope: Envelope, content: bytes) -> Reply:
        """Store the message and return the final reply; answer 250 only after a durable commit."""
        raise NotImplementedError


# The separator aiosmtpd's command loop asks for: it calls readuntil() without one.
_COMMAND_LINE = object()


class CommandLineReader(asyncio.StreamReader):
    """A stream reader whose command lines end only at CRLF (RFC 5321 section 2.3.8).

    aiosmtpd reads each command with ``readuntil()``, which ends a line at a
    bare LF, so ``FOO\\nBAR\\r\\n`` became two commands. Called without a
    separator, this reader reads up to CRLF instead and passes a line that
    contains a bare LF to ``reject_bare_lf`` (one reply), then reads the next.
    Explicit separators (AUTH responses) behave as in the base class.
    """

    reject_bare_lf: Callable[[], Awaitable[None]]
    # Set after a line over the limit: aiosmtpd then reads up to its end, and
    # that tail is discarded, so it needs no check.
    _discarding = False

    async def readuntil(self, separator: Any = _COMMAND_LINE) -> bytes:
        if separator is not _COMMAND_LINE:
            return await super().readuntil(separator)
        while True:
            try:
                line = await super().readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                self._discarding = True
                raise
            if self._discarding:
                self._discarding = False
                return line
            if b"\n" not in line[:-2]:
                return line
            await self.reject_bare_lf()


class _SessionLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"{self.extra['name']} session {self.extra['session']}: {msg}", kwargs


class SMTPSession(SMTP):
    """The protocol for one connection; created by :class:`SMTPServer` per accepted socket."""

    # Read by aiosmtpd's constructor to size the stream reader.
    line_length_limit = READER_LIMIT

    def __init__(self, server: SMTPServer, listener: Listener) -> None:
        options = server.options
        super().__init__(
            # aiosmtpd's own hook object: empty, because the hooks live in server.handler.
            object(),
            data_size_limit=options.max_message_size,
            enable_SMTPUTF8=True,
            hostname=options.hostname,
            ident=options.ident,
            tls_context=server.ssl_context if listener.tls == "starttls" else None,
            require_starttls=listener.require_tls and listener.tls == "starttls",
            timeout=options.idle_timeout,
            auth_require_tls=False,
            loop=asyncio.get_running_loop(),
        )
        self.server = server
        self.handler: SMTPHandler = server.handler
        self.listener = listener
        self.options = options
        self.session_id = f"{_session_ids.getrandbits(40):010X}"
        self.log = _SessionLog(log, {"name": server.name, "session": self.session_id})
        self.client_address = ""
        self.busy = False
        self._admitted = False
        self._refused = False
        self._greeted = False
        self._close_after_reply = False
        self._released = False
        # The socket of an implicit-TLS connection while its handshake runs.
        self._handshake_transport: asyncio.BaseTransport | None = None
        # An instance copy: aiosmtpd keeps this mapping on the class and grows it
        # at every EHLO, which would let the limits creep up across sessions.
        self.command_size_limits = defaultdict(lambda: self.command_size_limit, COMMAND_LIMITS)
        self._smtp_methods = {name: self._tracked(method) for name, method in self._smtp_methods.items()}
        # aiosmtpd builds a plain StreamReader in its constructor and offers no
        # hook to choose the class. CommandLineReader has no constructor of its
        # own, so changing the class of that object is safe.
        self._stream_reader.__class__ = CommandLineReader
        self._stream_reader.reject_bare_lf = self._reject_bare_lf

    # Connection life cycle ------------------------------------------------

    def _create_session(self) -> SessionState:
        return SessionState(self.loop)

    def _create_envelope(self) -> Envelope:
        return Envelope()

    @property
    def max_command_size_limit(self) -> int:
        return max(self.command_size_limits.values(), default=self.command_size_limit)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgrade = self._admitted
        if not upgrade:
            peer = transport.get_extra_info("peername")
            self.client_address = str(peer[0]) if peer else ""
            refusal = self.server._admit(self)
            if refusal is not None:
                self._refused = True
                allowed, suppressed = self.server.refusal_log.allow(self.client_address)
                if allowed:
                    more = f" ({suppressed} more from this address not logged)" if suppressed else ""
                    self.log.warning("connection from %s refused: %s%s", self.client_address, refusal.render(), more)
                if self.listener.tls != "implicit":
                    # A client on an implicit-TLS port expects a ClientHello
                    # reply, so it gets no plaintext 421, only the close.
                    transport.write(refusal.render().encode("ascii") + b"\r\n")
                transport.close()
                return
            self._admitted = True
            if self.listener.tls == "implicit":
                self._start_implicit_tls(transport)
                return
        elif self._handshake_transport is not None:
            # The implicit-TLS handshake has finished: the session starts now.
            self._handshake_transport = None
            upgrade = False
        self._start_session(transport, upgrade)

    def _start_implicit_tls(self, transport: asyncio.BaseTransport) -> None:
        """Put the server side of a TLS handshake (RFC 8314) between the socket and this session.

        The connection is counted already. The TLS layer is installed before
        this call returns, so no byte of the ClientHello reaches the SMTP
        reader. The TLS layer calls connection_made() again after the
        handshake, and the SMTP session starts then.
        """
        waiter = self.loop.create_future()
        waiter.add_done_callback(self._implicit_tls_done)
        tls_protocol = sslproto.SSLProtocol(
            self.loop,
            self,
            self.server.ssl_context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )
        self._handshake_transport = transport
        transport.set_protocol(tls_protocol)
        tls_protocol.connection_made(transport)

    def _implicit_tls_done(self, waiter: asyncio.Future) -> None:
        if self._handshake_transport is None:
            return
        # The handshake failed, timed out or the peer closed first: the TLS
        # layer has closed the socket and never calls connection_lost() here.
        self._handshake_transport = None
        error = None if waiter.cancelled() else waiter.exception()
        reason = repr(error) if error is not None else "connection closed by the peer"
        self.log.info("TLS handshake with %s failed: %s", self.client_address, reason)
        self._release()

    def _start_session(self, transport: asyncio.BaseTransport, upgrade: bool) -> None:
        super().connection_made(transport)
        state: SessionState = self.session  # type: ignore[assignment]
        state.id = self.session_id
        state.listener = self.listener.name
        state.client_address = self.client_address
        state.trusted = self.handler.is_trusted(self.client_address)
        if state.trusted:
            self.require_starttls = False
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            state.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            state.tls_cipher = cipher[0] if cipher else None
        if upgrade:
            self.log.info("TLS established: %s %s", state.tls_version, state.tls_cipher)
        else:
            self.log.info(
                "opened: peer %s, listener %s, %s",
                self.client_address,
                self.listener.name,
                f"TLS {state.tls_version}" if state.tls_version else "plaintext",
            )

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.server._release(self)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if not self._released:
            self._release()
            self.log.info("closed%s", f": {error}" if error else "")
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        return super().eof_received()

    def _timeout_cb(self) -> None:
        self.log.info("idle timeout after %.0f s", self.options.idle_timeout)
        self._write_now(replies.TIMEOUT)
        super()._timeout_cb()

    def _write_now(self, reply: Reply) -> None:
        """Send ``reply`` without waiting (for timeouts and shutdown)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply.render().encode("ascii") + b"\r\n")  # type: ignore[union-attr]

    def close_idle(self) -> bool:
        """Send 421 and close when no command is running; return whether it did."""
        if self._handshake_transport is not None:
            self._handshake_transport.abort()  # type: ignore[attr-defined]
            return True
        if self.busy or self.transport is None:
            return False
        self._write_now(replies.SHUTTING_DOWN)
        self.transport.close()
        return True

    def abort(self) -> None:
        if self._handshake_transport is not None:
            self._handshake_transport.abort()  # type: ignore[attr-defined]
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    async def _reject_bare_lf(self) -> None:
        self.log.info("command line with a bare LF rejected")
        await self.reply(replies.BARE_LF_IN_COMMAND)

    # Replies ----------------------------------------------------------------

    def _tracked(self, method):
        async def run(arg):
            self.busy = True
            try:
                await method(arg)
            finally:
                self.busy = False

        return run

    async def push(self, status: str | bytes) -> None:
        """Send one reply line as printable ASCII; aiosmtpd sends its own replies through here too."""
        line = printable(status.decode("ascii", "replace") if isinstance(status, bytes) else status)
        if self._greeted:
            line = add_enhanced_code(line)
        else:
            # The greeting is the first line; RFC 2034 gives it no enhanced code.
            self._greeted = True
        await super().push(line)
        final = line[3:4] == " " and not line.startswith(("334", "354"))
        if final and (self._close_after_reply or self.server.closing) and self.transport is not None:
            if not self._close_after_reply:
                await super().push(replies.SHUTTING_DOWN.render())
            self.transport.close()

    async def reply(self, reply: Reply) -> None:
        if reply.close:
            self._close_after_reply = True
        await self.push(reply.render())

    async def handle_exception(self, error: Exception) -> str:
        """Turn an exception from a command into its reply: the one place replies leave handlers."""
        if isinstance(error, SMTPError):
            reply = error.reply
            self.log.info("rejected: %s%s", reply.render(), f" ({error.reason})" if error.reason else "")
        else:
            reference = secrets.token_hex(4).upper()
            self.log.error("unexpected error, reference %s", reference, exc_info=error)
            reply = replies.internal_error(reference)
        if reply.close:
            self._close_after_reply = True
        return reply.render()

    # Commands ---------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self.session  # type: ignore[return-value]

    @property
    def is_tls(self) -> bool:
        return self.state.is_tls

    def _check_helo(self) -> None:
        if not self.state.host_name:
            raise SMTPError(replies.BAD_SEQUENCE_NEED_EHLO)

    def _check_auth(self) -> None:
        if self.listener.require_auth and not self.state.authenticated and not self.state.trusted:
            if self.listener.require_tls and not self.is_tls:
                raise SMTPError(replies.TLS_REQUIRED)
            raise SMTPError(replies.AUTH_REQUIRED)

    async def _send_lines(self, lines: list[str]) -> None:
        lines = [printable(line) for line in lines]
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self._writer.write(text.encode("ascii"))
        await self._writer.drain()

    def _offers_auth(self) -> bool:
        return self.handler.supports_auth and self.is_tls

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            raise SMTPError(Reply(501, "5.5.4", "Syntax: EHLO hostname"))
        self._set_rset_state()
        self.state.host_name = hostname
        self.state.extended_smtp = True
        lines = [
            f"{self.hostname} greets {hostname}",
            f"SIZE {self.options.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls_context is not None and not self.is_tls:
            lines.append("STARTTLS")
        if self._offers_auth():
            lines.append("AUTH " + " ".join(AUTH_MECHANISMS))
        lines.append("HELP")
        self.log.debug("EHLO %s", hostname)
        await self._send_lines(lines)

    async def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname:
            raise SMTPError(Reply(501, "5.5.4", "Syntax: HELO hostname"))
        self._set_rset_state()
        self.state.host_name = hostname
        self.state.extended_smtp = False
        await self._send_lines([self.hostname])

    def _supported_commands(self) -> list[str]:
        commands = set(self._smtp_methods) & COMMAND_SYNTAX.keys()
        if self.tls_context is None or self.is_tls:
            commands.discard("STARTTLS")
        if not self.handler.supports_auth:
            commands.discard("AUTH")
        return sorted(commands)

    async def smtp_HELP(self, arg: str | None) -> None:
        """Reply 214 with the commands, or with the syntax of one (RFC 5321 section 4.1.1.8)."""
        commands = self._supported_commands()
        if not arg:
            await self.reply(Reply(214, "2.0.0", f"Supported commands: {' '.join(commands)}"))
            return
        topic = arg.strip().upper()
        if topic not in commands:
            raise SMTPError(Reply(504, "5.5.4", f"No help for that topic; supported commands: {' '.join(commands)}"))
        await self.reply(Reply(214, "2.0.0", f"Syntax: {COMMAND_SYNTAX[topic]}"))

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            raise SMTPError(Reply(501, "5.5.4", "Syntax: STARTTLS"))
        if self.is_tls:
            raise SMTPError(Reply(503, "5.5.1", "TLS already active"))
        if self.tls_context is None:
            raise SMTPError(Reply(502, "5.5.1", "STARTTLS not offered on this port"))
        # aiosmtpd sends 220, runs the handshake, and in connection_made()
        # empties the read buffer, so plaintext pipelined after STARTTLS is
        # discarded as RFC 3207 section 4 requires.
        await super().smtp_STARTTLS(arg)

    # AUTH (RFC 4954) --------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        if not self.handler.supports_auth:
            raise SMTPError(Reply(502, "5.5.1", "AUTH not available on this port"))
        self._check_helo()
        if not self.state.extended_smtp:
            raise SMTPError(replies.BAD_SEQUENCE_NEED_EHLO)
        if not self.is_tls:
            raise SMTPError(replies.TLS_REQUIRED)
        if self.state.authenticated:
            raise SMTPError(Reply(503, "5.5.1", "Already authenticated"))
        if self.envelope.mail_from is not None:
            raise SMTPError(Reply(503, "5.5.1", "AUTH not allowed during a mail transaction"))
        words = (arg or "").split()
        if not 1 <= len(words) <= 2:
            raise SMTPError(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
        mechanism = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        if mechanism == "PLAIN":
            username, password = await self._read_plain(initial)
        elif mechanism == "LOGIN":
            username, password = await self._read_login(initial)
        else:
            raise SMTPError(Reply(504, "5.5.4", f"Unrecognized authentication type; use one of {' '.join(AUTH_MECHANISMS)}"))
        identity = await self.handler.authenticate(self.state, mechanism, username, password)
        if identity is None:
            raise SMTPError(Reply(535, "5.7.8", "Authentication credentials invalid"), f"AUTH {mechanism} failed for {username!r}")
        self.state.authenticated = True
        self.state.auth_data = identity
        self.log.info("AUTH %s succeeded for %s", mechanism, username)
        await self.reply(Reply(235, "2.7.0", "Authentication successful"))

    async def _challenge(self, prompt: bytes) -> bytes:
        """Send a 334 challenge and return the decoded response; never logs the response."""
        await self.push(b"334 " + base64.b64encode(prompt))
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as error:
            await self._reader.read(error.consumed)
            raise SMTPError(Reply(500, "5.5.6", "Authentication exchange line is too long")) from None
        return _decode_response(line.strip())

    async def _read_plain(self, initial: str | None) -> tuple[str, str]:
        data = await self._challenge(b"") if initial is None else _decode_response(initial.encode("ascii", "replace"))
        parts = data.split(b"\0")
        if len(parts) != 3:
            raise SMTPError(Reply(501, "5.5.2", "Malformed PLAIN response: expected authzid NUL authcid NUL password"))
        authzid, username, password = (_decode_utf8(part) for part in parts)
        if authzid and authzid != username:
            # Acting for another user (proxy authorization) is not supported.
            raise SMTPError(Reply(535, "5.7.8", "Authentication credentials invalid"), "authzid differs from authcid")
        return username, password

    async def _read_login(self, initial: str | None) -> tuple[str, str]:
        if initial is None:
            username_data = await self._challenge(_LOGIN_USERNAME_PROMPT)
        else:
            username_data = _decode_response(initial.encode("ascii", "replace"))
        password_data = await self._challenge(_LOGIN_PASSWORD_PROMPT)
        return _decode_utf8(username_data), _decode_utf8(password_data)

    # The mail transaction ----------------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._check_helo()
        self._check_auth()
        envelope: Envelope = self.envelope  # type: ignore[assignment]
        if envelope.mail_from is not None:
            raise SMTPError(replies.BAD_SEQUENCE_NESTED_MAIL)
        if not arg or not arg.upper().startswith("FROM:"):
            raise SMTPError(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]"))
        path, params = self._parse_path(arg, "FROM")
        parameters = self._mail_parameters(params)
        smtputf8 = "SMTPUTF8" in parameters
        if not path.address.isascii() and not smtputf8:
            raise SMTPError(replies.NEEDS_SMTPUTF8)
        await self.handler.check_sender(self.state, envelope, path)
        envelope.mail_from = path.address
        envelope.mail_options = params
        envelope.smtp_utf8 = smtputf8
        envelope.body_type = parameters.get("BODY") or "7BIT"
        size = parameters.get("SIZE")
        envelope.declared_size = int(size) if size else None
        self.log.debug("MAIL FROM:<%s>", path.address)
        await self.reply(replies.SENDER_OK)

    def _parse_path(self, arg: str, keyword: str) -> tuple[Path, list[str]]:
        try:
            path, params = parse_path_argument(arg, keyword)
        except PathError as error:
            raise SMTPError(replies.BAD_ADDRESS_SYNTAX, str(error)) from None
        if params and not self.state.extended_smtp:
            raise SMTPError(Reply(501, "5.5.4", "Parameters need EHLO"))
        return path, params

    def _mail_parameters(self, params: list[str]) -> dict[str, str | None]:
        try:
            parameters = split_parameters(params)
        except PathError as error:
            raise SMTPError(Reply(501, "5.5.4", str(error).capitalize())) from None
        for keyword, value in parameters.items():
            if keyword == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise SMTPError(Reply(501, "5.5.4", "Syntax: SIZE=<octets>"))
                if int(value) > self.options.max_message_size:
                    raise SMTPError(replies.SIZE_EXCEEDED, f"declared SIZE {value}")
            elif keyword == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise SMTPError(Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME"))
                parameters["BODY"] = value.upper()
            elif keyword == "SMTPUTF8":
                if value is not None:
                    raise SMTPError(Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
            elif keyword == "AUTH":
                # RFC 4954 section 5: the original submitter, for trusted relays only; ignored.
                continue
            else:
                raise SMTPError(replies.PARAMETER_UNKNOWN, f"MAIL parameter {keyword}")
        return parameters

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._check_helo()
        self._check_auth()
        envelope: Envelope = self.envelope  # type: ignore[assignment]
        if envelope.mail_from is None:
            raise SMTPError(replies.BAD_SEQUENCE_NEED_MAIL)
        if not arg or not arg.upper().startswith("TO:"):
            raise SMTPError(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        path, params = self._parse_path(arg, "TO")
        if path.is_null:
            raise SMTPError(replies.BAD_ADDRESS_SYNTAX, "null recipient")
        if params:
            raise SMTPError(replies.PARAMETER_UNKNOWN, f"RCPT parameters {params}")
        if not path.address.isascii() and not envelope.smtp_utf8:
            raise SMTPError(replies.NEEDS_SMTPUTF8)
        if len(envelope.rcpt_tos) >= self.options.max_recipients:
            raise SMTPError(replies.TOO_MANY_RECIPIENTS, f"limit {self.options.max_recipients}")
        await self.handler.check_recipient(self.state, envelope, path)
        envelope.rcpt_tos.append(path.address)
        self.log.debug("RCPT TO:<%s>", path.address)
        await self.reply(replies.RECIPIENT_OK)

    async def smtp_DATA(self, arg: str | None) -> None:
        self._check_helo()
        self._check_auth()
        envelope: Envelope = self.envelope  # type: ignore[assignment]
        if envelope.mail_from is None:
            raise SMTPError(replies.BAD_SEQUENCE_NEED_MAIL)
        if not envelope.rcpt_tos:
            raise SMTPError(replies.BAD_SEQUENCE_NEED_RCPT)
        if arg:
            raise SMTPError(Reply(501, "5.5.4", "Syntax: DATA"))
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader = DataReader(self.options.max_message_size)
        while True:
            chunk = await self._reader.read(READ_SIZE)
            if not chunk:
                # The peer closed the connection in the middle of the data.
                raise ConnectionResetError("connection closed during DATA")
            self._reset_timeout()
            rest = reader.feed(chunk)
            if rest is not None:
                break
        if rest and not self._reader.at_eof():
            # One read emptied the reader's buffer (READ_SIZE exceeds it), so
            # feeding the rest back keeps pipelined commands in order. After
            # the peer's EOF the rest is dropped: aiosmtpd ends the session then.
            self._reader.feed_data(rest)
        # The transaction ends here whatever the outcome.
        self._set_post_data_state()
        problem = reader.error
        if problem is not None:
            raise SMTPError(problem, f"message data from <{envelope.mail_from}> rejected after {reader.size} octets")
        reply = await self.handler.handle_message(self.state, envelope, reader.content)
        await self.reply(reply)


def _decode_response(blob: bytes) -> bytes:
    if blob == b"*":
        raise SMTPError(Reply(501, "5.7.0", "Authentication cancelled"))
    if blob == b"=":
        return b""
    try:
        return base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise SMTPError(Reply(501, "5.5.2", "Cannot decode base64 response")) from None


def _decode_utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SMTPError(Reply(501, "5.5.2", "Credentials must be UTF-8")) from None


__all__ = ["Envelope", "SMTPHandler", "SMTPSession", "SessionState"]
