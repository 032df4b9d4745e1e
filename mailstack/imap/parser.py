"""A sans-IO parser for IMAP commands: feed bytes, take events.

The connection owns the socket and this parser owns the framing and grammar::

    parser = Parser()
    parser.feed(data)
    while True:
        try:
            event = parser.next_event()
        except ImapError as error:          # ParseError, or BadCharset for SEARCH
            write(error.render())            # tagged BAD/NO, or "* BAD" without a tag
            continue                         # the parser has already resynchronised
        if event is NEED_DATA:
            break                            # read more bytes, feed them, loop again
        if isinstance(event, LiteralRequest):
            if event.size <= limit_for(event):
                parser.accept_literal()
                if event.synchronizing:
                    write(b"+ Ready for literal data\\r\\n")
            else:
                parser.reject_literal()
                write(TooBig("...", tag=event.tag).render())
            continue
        if isinstance(event, ContinuationLine):
            ...                              # AUTHENTICATE response or IDLE's DONE
            continue
        handle(event)                        # a Command from mailstack.imap.commands

Events returned by :meth:`Parser.next_event`:

- :data:`NEED_DATA` when the buffer does not hold a complete event yet;
- a :class:`~mailstack.imap.commands.Command` once a whole command,
  with all of its literals, has arrived and parsed;
- :class:`LiteralRequest` when a line ends with a literal announcement
  ``{n}`` (synchronising) or ``{n+}`` (LITERAL+), before any byte of the
  literal is read. The parser then waits for :meth:`Parser.accept_literal`
  or :meth:`Parser.reject_literal`; until one is called, ``next_event``
  returns the same request again. After a rejected synchronising literal
  the client sends nothing more of that command. After a rejected
  non-synchronising literal the client sends the literal and the rest of
  the command anyway. So the parser skips ``n`` bytes and the remaining
  lines of the command (with any further ``{m+}`` literals in them) before
  it reads the next command. A connection may prefer to close instead when
  the announced size is absurd. No request is made for a literal that
  cannot belong to a valid command (an invalid tag, an unknown command, a
  third literal in APPEND, more than ``max_literals`` in one command): the
  parser raises the command's error at once instead.
- :class:`ContinuationLine` for the next line after
  :meth:`Parser.expect_continuation`: the client's reply to an
  AUTHENTICATE challenge (see :func:`decode_sasl_response`) or IDLE's ``DONE``.

Errors are raised from ``next_event`` as :class:`ParseError` (renders BAD)
and its subclasses, or as :class:`~mailstack.imap.response.BadCharset` (renders
``NO [BADCHARSET ...]``) for a SEARCH charset other than UTF-8 and US-ASCII.
Each carries the command's tag when it could be read. The parser has dropped
the offending command before raising, so the caller renders the error and
keeps calling ``next_event``; counting bad commands and closing the
connection after too many is the connection's job.

Limits: a command line (the text outside literals, summed over all lines of
one command) is at most ``max_line_length`` bytes, else :class:`LineTooLong`
and the rest of the line is skipped; parentheses and NOT/OR in search
programs nest at most ``max_nesting`` deep, else :class:`NestingTooDeep`.
One command carries at most ``max_literals`` literals, so a per-literal
size limit also bounds the memory of a whole command. Literal sizes are
checked by the connection through :class:`LiteralRequest`, whose
``received`` counts the literal bytes already accepted for the command.

A line may end in CRLF or a bare LF. After STARTTLS the connection calls
:meth:`Parser.discard_buffered`: bytes sent in clear after the command must
not be read as if they came over TLS.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass

from mailstack.imap import commands as c
from mailstack.imap import utf7
from mailstack.imap.response import BadCharset, BadCommand
from mailstack.imap.sequence import MAX_NUMBER, InvalidSequenceSet, SequenceSet

__all__ = [
    "NEED_DATA",
    "AuthenticationCancelled",
    "ContinuationLine",
    "Event",
    "LineTooLong",
    "LiteralRequest",
    "NeedData",
    "NestingTooDeep",
    "ParseError",
    "Parser",
    "UnknownCommand",
    "decode_sasl_response",
    "parse_command",
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_MAX_NESTING",
    "DEFAULT_MAX_LITERALS",
]

#: Default bound on the text of one command, outside literals (64 KiB).
DEFAULT_MAX_LINE_LENGTH = 65536
#: Default bound on nested parentheses, NOT and OR in one command.
DEFAULT_MAX_NESTING = 16
#: Default bound on the literals of one command. LOGIN needs two and APPEND
#: two (mailbox name and message); SEARCH may send each string as a literal.
DEFAULT_MAX_LITERALS = 32
#: Most ID field/value pairs a client may send (RFC 2971 section 3.3).
MAX_ID_PAIRS = 30


# --- events and errors ----------------------------------------------------------


class NeedData:
    """Type of :data:`NEED_DATA`: feed more bytes before the next event."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class LiteralRequest:
    """A literal of ``size`` bytes was announced; no byte of it has been read.

    ``command`` is the upper-case command name when the line showed it (for
    ``UID FETCH`` it is ``"UID"``), so the connection can allow large literals
    for APPEND only. ``synchronizing`` is False for LITERAL+ ``{n+}``: the
    client does not wait for ``+`` and sends the bytes at once. ``received``
    is the number of literal bytes already accepted for this command.
    """

    tag: str | None
    command: str | None
    size: int
    synchronizing: bool
    received: int = 0


@dataclass(frozen=True, slots=True)
class ContinuationLine:
    """One line sent by the client after a continuation request, without CRLF."""

    data: bytes

    @property
    def is_done(self) -> bool:
        """True for IDLE's terminating ``DONE`` (case-insensitive)."""
        return self.data.strip().upper() == b"DONE"


Event = c.Command | LiteralRequest | ContinuationLine | NeedData


class ParseError(BadCommand):
    """The client sent something that is not a valid command; renders BAD."""


class UnknownCommand(ParseError):
    """The command name is not one this server implements."""


class LineTooLong(ParseError):
    """The command text exceeds the parser's ``max_line_length``."""


class NestingTooDeep(ParseError):
    """Parentheses or NOT/OR nest deeper than the parser's ``max_nesting``."""


class AuthenticationCancelled(ParseError):
    """The client cancelled AUTHENTICATE by sending ``*`` (RFC 3501 requires a tagged BAD)."""


def decode_sasl_response(line: ContinuationLine | bytes, tag: str | None = None) -> bytes:
    """Decode a client's base64 reply to an AUTHENTICATE challenge.

    Raises :class:`AuthenticationCancelled` for ``*`` and :class:`ParseError`
    for anything that is not base64.
    """
    data = line.data if isinstance(line, ContinuationLine) else line
    data = data.strip()
    if data == b"*":
        raise AuthenticationCancelled("authentication cancelled by the client", tag=tag)
    if data == b"=":
        # "=" is RFC 4959's empty initial response; some clients send it here too.
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError("invalid base64 in the authentication response", tag=tag) from None


# --- framing ---------------------------------------------------------------------

_LITERAL_MARKER = re.compile(rb"\{(\d{1,20})(\+?)\}\Z")
_TAG_CHARS = frozenset(range(0x21, 0x7F)) - frozenset(b'(){%*"\\+')

_COMMAND = 0  # reading command lines
_DECIDE = 1  # a LiteralRequest waits for accept_literal/reject_literal
_LITERAL = 2  # reading accepted literal bytes
_SKIP_LITERAL = 3  # skipping the bytes of a rejected non-synchronising literal
_SKIP_COMMAND = 4  # skipping the remaining lines of a rejected command
_SKIP_LINE = 5  # skipping the rest of an over-long line
_CONTINUATION = 6  # the next line is a ContinuationLine


def _extract_tag(line: bytes) -> str | None:
    tag = line.split(b" ", 1)[0].rstrip(b"\r\n")
    if tag and len(tag) <= 64 and _TAG_CHARS.issuperset(tag):
        return tag.decode("ascii")
    return None


def _extract_command(line: bytes) -> str | None:
    words = line.split(b" ", 2)
    if len(words) < 2:
        return None
    name = words[1].rstrip(b"\r\n")
    if not name.isalpha() or len(name) > 32:
        return None
    return name.decode("ascii").upper()


class Parser:
    """Incremental IMAP command parser; see the module docstring for the protocol."""

    def __init__(
        self,
        *,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_nesting: int = DEFAULT_MAX_NESTING,
        max_literals: int = DEFAULT_MAX_LITERALS,
    ) -> None:
        self.max_line_length = max_line_length
        self.max_nesting = max_nesting
        self.max_literals = max_literals
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer already searched for LF
        self._state = _COMMAND
        self._parts: list[bytes] = []  # lines and literal data of the current command
        self._text_size = 0  # command text so far, outside literals
        self._tag: str | None = None
        self._command: str | None = None
        self._pending: LiteralRequest | None = None
        self._remaining = 0  # bytes still to read or skip in a literal
        self._literal_count = 0  # literals announced in the current command
        self._literal_bytes = 0  # literal bytes accepted for the current command

    # -- public API --

    def feed(self, data: bytes) -> None:
        """Append bytes received from the client."""
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Number of received bytes not consumed yet."""
        return len(self._buffer)

    @property
    def pending_literal(self) -> LiteralRequest | None:
        """The literal request awaiting a decision, if any."""
        return self._pending if self._state == _DECIDE else None

    def discard_buffered(self) -> int:
        """Drop every unread byte and any partial command; return how many bytes were dropped.

        Call it right after a STARTTLS handshake starts, so that plaintext sent
        behind the STARTTLS command is never taken as a command.
        """
        dropped = len(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        self._reset_command()
        self._state = _COMMAND
        return dropped

    def accept_literal(self) -> None:
        """Accept the pending literal: its bytes become part of the command."""
        if self._state != _DECIDE or self._pending is None:
            raise RuntimeError("no literal is waiting for a decision")
        self._remaining = self._pending.size
        self._literal_bytes += self._pending.size
        self._pending = None
        self._state = _LITERAL

    def reject_literal(self) -> None:
        """Reject the pending literal and drop the command it belongs to.

        The caller sends the tagged error. For a non-synchronising literal the
        parser then skips the literal's bytes and the rest of the command.
        """
        if self._state != _DECIDE or self._pending is None:
            raise RuntimeError("no literal is waiting for a decision")
        request = self._pending
        self._reset_command()
        if request.synchronizing:
            self._state = _COMMAND
        else:
            self._remaining = request.size
            self._state = _SKIP_LITERAL

    def expect_continuation(self) -> None:
        """Make the next event a :class:`ContinuationLine` instead of a command."""
        if self._state not in (_COMMAND, _CONTINUATION) or self._parts:
            raise RuntimeError("cannot expect a continuation line in the middle of a command")
        self._state = _CONTINUATION

    def next_event(self) -> Event:
        """Return the next event, or raise a :class:`ParseError` for an invalid command."""
        while True:
            state = self._state
            if state == _DECIDE:
                assert self._pending is not None
                return self._pending
            if state in (_LITERAL, _SKIP_LITERAL):
                if not self._consume_literal():
                    return NEED_DATA
                continue
            line = self._take_line()
            if line is None:
                if state == _SKIP_COMMAND and len(self._buffer) > self.max_line_length:
                    # The rejected command already got its error reply, so drop the rest quietly.
                    self._state = state = _SKIP_LINE
                if state == _SKIP_LINE or len(self._buffer) + self._text_size <= self.max_line_length:
                    if self._state == _SKIP_LINE:
                        self._buffer.clear()
                        self._scanned = 0
                    return NEED_DATA
                # The line is too long and not finished: report it now and
                # skip the rest, so that a hostile client cannot fill memory.
                tag = self._tag if self._parts else _extract_tag(bytes(self._buffer[:80]))
                self._reset_command()
                self._buffer.clear()
                self._scanned = 0
                self._state = _SKIP_LINE
                raise LineTooLong("command line too long (maximum %d bytes)" % self.max_line_length, tag=tag)
            if state == _SKIP_LINE:
                self._state = _COMMAND
                continue
            if state == _CONTINUATION:
                self._state = _COMMAND
                if len(line) > self.max_line_length:
                    raise LineTooLong("continuation line too long", tag=None)
                return ContinuationLine(_strip_eol(line))
            if state == _SKIP_COMMAND:
                marker = _LITERAL_MARKER.search(_strip_eol(line))
                if marker and marker.group(2):
                    self._remaining = int(marker.group(1))
                    self._state = _SKIP_LITERAL
                else:
                    self._state = _COMMAND
                continue
            event = self._command_line(line)
            if event is not None:
                return event

    # -- internals --

    def _drop_command(self, marker: re.Match[bytes] | None) -> str | None:
        """Forget the current command and return its tag.

        A LITERAL+ literal announced by its last line is skipped, because the
        client sends it without waiting for a continuation request.
        """
        tag = self._tag
        self._reset_command()
        if marker is not None and marker.group(2):
            self._remaining = int(marker.group(1))
            self._state = _SKIP_LITERAL
        return tag

    def _reset_command(self) -> None:
        self._parts = []
        self._text_size = 0
        self._tag = None
        self._command = None
        self._pending = None
        self._literal_count = 0
        self._literal_bytes = 0

    def _take_line(self) -> bytes | None:
        index = self._buffer.find(b"\n", self._scanned)
        if index < 0:
            self._scanned = len(self._buffer)
            return None
        line = bytes(self._buffer[: index + 1])
        del self._buffer[: index + 1]
        self._scanned = 0
        return line

    def _consume_literal(self) -> bool:
        take = min(self._remaining, len(self._buffer))
        if take:
            if self._state == _LITERAL:
                self._parts.append(bytes(self._buffer[:take]))
            del self._buffer[:take]
            self._remaining -= take
            self._scanned = 0
        if self._remaining:
            return False
        self._state = _COMMAND if self._state == _LITERAL else _SKIP_COMMAND
        return True

    def _command_line(self, line: bytes) -> Event | None:
        body = _strip_eol(line)
        if not self._parts:
            self._tag = _extract_tag(body)
            self._command = _extract_command(body)
        self._text_size += len(body) + 2
        marker = _LITERAL_MARKER.search(body)
        if self._text_size > self.max_line_length:
            tag = self._drop_command(marker)
            raise LineTooLong("command line too long (maximum %d bytes)" % self.max_line_length, tag=tag)
        if marker is not None and len(self._parts) == 0:
            # Reject a literal of a command that cannot be valid before any
            # byte of it is read, so garbage never costs a literal's memory.
            if self._tag is None:
                self._drop_command(marker)
                raise ParseError("missing or invalid tag", tag=None)
            if self._command not in _COMMANDS and self._command != "UID":
                words = body.split(b" ", 2)
                name = words[1][:32].decode("ascii", "backslashreplace") if len(words) > 1 else ""
                tag = self._drop_command(marker)
                raise UnknownCommand("unknown command %s" % name, tag=tag)
        if marker is not None:
            if self._literal_count >= self.max_literals:
                tag = self._drop_command(marker)
                raise ParseError("too many literals in one command (maximum %d)" % self.max_literals, tag=tag)
            if self._command == "APPEND" and self._literal_count >= 2:
                tag = self._drop_command(marker)
                raise ParseError("APPEND takes one message; MULTIAPPEND is not supported", tag=tag)
            self._literal_count += 1
            self._parts.append(body + b"\r\n")
            self._pending = LiteralRequest(
                tag=self._tag,
                command=self._command,
                size=int(marker.group(1)),
                synchronizing=not marker.group(2),
                received=self._literal_bytes,
            )
            self._state = _DECIDE
            return self._pending
        self._parts.append(body)
        data = b"".join(self._parts)
        tag = self._tag
        self._reset_command()
        if not data.strip():
            # An empty line is a harmless client quirk: ignore it.
            return None
        return parse_command(data, max_nesting=self.max_nesting, known_tag=tag)


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


# --- grammar --------------------------------------------------------------------

_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x20)) | {0x7F}
_ATOM_CHARS = frozenset(range(0x01, 0x80)) - _ATOM_SPECIALS
# RFC 3501 atoms are 7-bit, but clients such as Python's imaplib send UTF-8
# search strings and passwords unquoted, so an astring also accepts 8-bit
# bytes. Mailbox names still reject them when decoding modified UTF-7.
_ASTRING_CHARS = _ATOM_CHARS | {ord("]")} | frozenset(range(0x80, 0x100))
_LIST_CHARS = _ASTRING_CHARS | {ord("%"), ord("*")}
_SEQUENCE_CHARS = frozenset(b"0123456789:,*")
_FETCH_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.")
_DIGITS = frozenset(b"0123456789")
_INLINE_LITERAL = re.compile(rb"\{(\d{1,20})\+?\}\r\n")
_MONTHS = {
    name: index + 1
    for index, name in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
    )
}
_SYSTEM_FLAGS = {flag.upper(): flag for flag in c.SYSTEM_FLAGS}
_CHARSETS = {"UTF-8": "UTF-8", "US-ASCII": "US-ASCII"}


class _Reader:
    """Recursive-descent reader over one complete command, literals included."""

    __slots__ = ("data", "pos", "tag", "depth", "max_depth")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.pos = 0
        self.tag: str | None = None
        self.depth = 0
        self.max_depth = max_depth

    def error(self, message: str) -> ParseError:
        return ParseError(message, tag=self.tag)

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < len(self.data) else None

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def end(self) -> None:
        if self.pos < len(self.data):
            excerpt = self.data[self.pos : self.pos + 20].decode("ascii", "backslashreplace")
            raise self.error("unexpected characters at position %d: %s" % (self.pos, excerpt))

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise self.error("expected a space at position %d" % self.pos)
        self.pos += 1

    def expect(self, char: bytes) -> None:
        if self.data[self.pos : self.pos + len(char)] != char:
            raise self.error("expected %r at position %d" % (char.decode("ascii"), self.pos))
        self.pos += len(char)

    def take_while(self, allowed: frozenset[int]) -> bytes:
        data = self.data
        start = pos = self.pos
        end = len(data)
        while pos < end and data[pos] in allowed:
            pos += 1
        self.pos = pos
        return data[start:pos]

    def atom(self, what: str = "an atom") -> bytes:
        value = self.take_while(_ATOM_CHARS)
        if not value:
            raise self.error("expected %s at position %d" % (what, self.pos))
        return value

    def keyword(self) -> str:
        return self.atom("a keyword").decode("ascii").upper()

    def number(self, nonzero: bool = False) -> int:
        digits = self.take_while(_DIGITS)
        if not digits or len(digits) > 20:
            raise self.error("expected a number at position %d" % self.pos)
        value = int(digits)
        if value > MAX_NUMBER or (nonzero and value == 0):
            raise self.error("number %d out of range" % value)
        return value

    def number64(self) -> int:
        digits = self.take_while(_DIGITS)
        if not digits or len(digits) > 20 or int(digits) >= 2**63:
            raise self.error("expected a 63-bit number at position %d" % self.pos)
        return int(digits)

    def quoted(self) -> bytes:
        data = self.data
        pos = self.pos + 1
        out = bytearray()
        end = len(data)
        while True:
            if pos >= end:
                raise self.error("unterminated quoted string")
            char = data[pos]
            if char == 0x22:
                self.pos = pos + 1
                return bytes(out)
            if char == 0x5C:
                pos += 1
                if pos >= end or data[pos] not in (0x22, 0x5C):
                    raise self.error("invalid escape in quoted string")
                char = data[pos]
            elif char in (0x0D, 0x0A, 0x00):
                raise self.error("invalid character in quoted string")
            out.append(char)
            pos += 1

    def literal(self) -> bytes:
        match = _INLINE_LITERAL.match(self.data, self.pos)
        if match is None:
            raise self.error("invalid literal at position %d" % self.pos)
        size = int(match.group(1))
        start = match.end()
        if start + size > len(self.data):
            raise self.error("literal shorter than announced")
        self.pos = start + size
        return self.data[start : self.pos]

    def string(self) -> bytes:
        char = self.peek()
        if char == 0x22:
            return self.quoted()
        if char == 0x7B:
            return self.literal()
        raise self.error("expected a string at position %d" % self.pos)

    def astring(self) -> bytes:
        char = self.peek()
        if char == 0x22:
            return self.quoted()
        if char == 0x7B:
            return self.literal()
        value = self.take_while(_ASTRING_CHARS)
        if not value:
            raise self.error("expected an astring at position %d" % self.pos)
        return value

    def nstring(self) -> bytes | None:
        if self.data[self.pos : self.pos + 3].upper() == b"NIL" and (
            self.pos + 3 == len(self.data) or self.data[self.pos + 3] not in _ATOM_CHARS
        ):
            self.pos += 3
            return None
        return self.string()

    def text(self, value: bytes, what: str) -> str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error("%s is not valid UTF-8" % what) from None

    def mailbox(self) -> str:
        raw = self.astring()
        if raw.upper() == b"INBOX":
            return "INBOX"
        try:
            return utf7.decode(raw)
        except ValueError as error:
            raise self.error("invalid mailbox name: %s" % error) from None

    def list_mailbox(self) -> str:
        char = self.peek()
        if char in (0x22, 0x7B):
            raw = self.string()
        else:
            raw = self.take_while(_LIST_CHARS)
            if not raw:
                raise self.error("expected a mailbox pattern at position %d" % self.pos)
        try:
            return utf7.decode(raw)
        except ValueError as error:
            raise self.error("invalid mailbox pattern: %s" % error) from None

    def sequence_set(self) -> SequenceSet:
        raw = self.take_while(_SEQUENCE_CHARS)
        if not raw:
            raise self.error("expected a sequence set at position %d" % self.pos)
        try:
            return SequenceSet.parse(raw)
        except InvalidSequenceSet as error:
            raise self.error(error.text) from None

    def flag(self) -> str:
        if self.peek() == 0x5C:
            self.pos += 1
            name = self.atom("a flag name").decode("ascii")
            canonical = _SYSTEM_FLAGS.get("\\" + name.upper())
            return canonical if canonical is not None else "\\" + name
        return self.atom("a flag").decode("ascii")

    def flag_list(self) -> tuple[str, ...]:
        self.expect(b"(")
        flags: list[str] = []
        while self.peek() != 0x29:
            if flags:
                self.sp()
            flags.append(self.flag())
        self.pos += 1
        return tuple(flags)

    def enter(self) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise NestingTooDeep("nesting deeper than %d levels" % self.max_depth, tag=self.tag)

    def leave(self) -> None:
        self.depth -= 1


def parse_command(data: bytes, *, max_nesting: int = DEFAULT_MAX_NESTING, known_tag: str | None = None) -> c.Command:
    """Parse one complete command (without the final CRLF, literals inline).

    Most callers use :class:`Parser`; this is the grammar alone, useful in tests.
    """
    reader = _Reader(data, max_nesting)
    reader.tag = known_tag
    raw_tag = reader.take_while(_TAG_CHARS)
    if not raw_tag:
        raise ParseError("missing or invalid tag", tag=None)
    reader.tag = tag = raw_tag.decode("ascii")
    reader.sp()
    name = reader.keyword()
    uid = False
    if name == "UID":
        reader.sp()
        name = reader.keyword()
        if name not in _UID_COMMANDS:
            raise UnknownCommand("UID %s is not a command" % name[:32], tag=tag)
        uid = True
    handler = _COMMANDS.get(name)
    if handler is None:
        raise UnknownCommand("unknown command %s" % name[:32], tag=tag)
    try:
        command = handler(reader, tag, uid)
    except RecursionError:
        raise NestingTooDeep("command nests too deep", tag=tag) from None
    reader.end()
    return command


# --- command handlers -------------------------------------------------------------


def _no_arguments(cls: type[c.Command]) -> Callable[[_Reader, str, bool], c.Command]:
    def handler(reader: _Reader, tag: str, uid: bool) -> c.Command:
        return cls(tag)

    return handler


def _login(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    username = reader.text(reader.astring(), "user name")
    reader.sp()
    password = reader.text(reader.astring(), "password")
    return c.Login(tag, username, password)


def _authenticate(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    mechanism = reader.keyword()
    initial: bytes | None = None
    if not reader.at_end():
        reader.sp()
        raw = reader.take_while(frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="))
        if raw == b"=":
            initial = b""
        else:
            try:
                initial = base64.b64decode(raw, validate=True) if raw else None
            except (binascii.Error, ValueError):
                initial = None
            if initial is None:
                raise reader.error("invalid base64 in the initial response")
    return c.Authenticate(tag, mechanism, initial)


def _select(cls: type[c.Select] | type[c.Examine]) -> Callable[[_Reader, str, bool], c.Command]:
    def handler(reader: _Reader, tag: str, uid: bool) -> c.Command:
        reader.sp()
        mailbox = reader.mailbox()
        condstore = False
        if not reader.at_end():
            reader.sp()
            reader.expect(b"(")
            while reader.peek() != 0x29:
                if reader.peek() is None:
                    raise reader.error("unterminated parameter list")
                if condstore:
                    reader.sp()
                parameter = reader.keyword()
                if parameter != "CONDSTORE":
                    raise reader.error("unsupported %s parameter %s" % (cls.NAME, parameter[:32]))
                condstore = True
            reader.pos += 1
        return cls(tag, mailbox, condstore)

    return handler


def _create(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    mailbox = reader.mailbox()
    special_use: tuple[str, ...] = ()
    if not reader.at_end():
        reader.sp()
        reader.expect(b"(")
        if reader.keyword() != "USE":
            raise reader.error("unsupported CREATE parameter")
        reader.sp()
        special_use = reader.flag_list()
        reader.expect(b")")
    return c.Create(tag, mailbox, special_use)


def _mailbox_only(cls: type[c.Delete] | type[c.Subscribe] | type[c.Unsubscribe]) -> Callable[[_Reader, str, bool], c.Command]:
    def handler(reader: _Reader, tag: str, uid: bool) -> c.Command:
        reader.sp()
        return cls(tag, reader.mailbox())

    return handler


def _rename(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    old_name = reader.mailbox()
    reader.sp()
    new_name = reader.mailbox()
    return c.Rename(tag, old_name, new_name)


def _option_list(reader: _Reader) -> tuple[str, ...]:
    reader.expect(b"(")
    options: list[str] = []
    while reader.peek() != 0x29:
        if options:
            reader.sp()
        options.append(reader.keyword())
    reader.pos += 1
    return tuple(options)


def _reference(reader: _Reader) -> str:
    try:
        return utf7.decode(reader.astring())
    except ValueError as error:
        raise reader.error("invalid reference name: %s" % error) from None


def _list(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    selection: tuple[str, ...] = ()
    if reader.peek() == 0x28:
        selection = _option_list(reader)
        reader.sp()
    reference = _reference(reader)
    reader.sp()
    if reader.peek() == 0x28:
        reader.pos += 1
        patterns = [reader.list_mailbox()]
        while reader.peek() == 0x20:
            reader.pos += 1
            patterns.append(reader.list_mailbox())
        reader.expect(b")")
    else:
        patterns = [reader.list_mailbox()]
    return_options: tuple[str, ...] = ()
    if not reader.at_end():
        reader.sp()
        if reader.keyword() != "RETURN":
            raise reader.error("expected RETURN options")
        reader.sp()
        return_options = _option_list(reader)
    return c.List(tag, reference, tuple(patterns), selection, return_options)


def _lsub(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    reference = _reference(reader)
    reader.sp()
    return c.Lsub(tag, reference, reader.list_mailbox())


_STATUS_ITEMS = {item.value: item for item in c.StatusItem}


def _status(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    mailbox = reader.mailbox()
    reader.sp()
    items = []
    for name in _option_list(reader):
        item = _STATUS_ITEMS.get(name)
        if item is None:
            raise reader.error("unknown STATUS item %s" % name[:32])
        items.append(item)
    if not items:
        raise reader.error("STATUS needs at least one item")
    return c.Status(tag, mailbox, tuple(items))


def _date_time(reader: _Reader) -> datetime.datetime:
    raw = reader.quoted()
    match = re.fullmatch(
        rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)", raw
    )
    month = _MONTHS.get(match.group(2).decode("ascii").upper()) if match else None
    if match is None or month is None:
        raise reader.error("invalid date-time %r" % raw[:40].decode("ascii", "replace"))
    offset = datetime.timedelta(hours=int(match.group(8)), minutes=int(match.group(9)))
    if match.group(7) == b"-":
        offset = -offset
    try:
        return datetime.datetime(
            int(match.group(3)),
            month,
            int(match.group(1)),
            int(match.group(4)),
            int(match.group(5)),
            int(match.group(6)),
            tzinfo=datetime.timezone(offset),
        )
    except ValueError:
        raise reader.error("invalid date-time %r" % raw[:40].decode("ascii", "replace")) from None


def _append(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    mailbox = reader.mailbox()
    reader.sp()
    flags: tuple[str, ...] = ()
    internal_date = None
    if reader.peek() == 0x28:
        flags = reader.flag_list()
        if "\\*" in flags:
            raise reader.error("\\* is not a flag")
        reader.sp()
    if reader.peek() == 0x22:
        internal_date = _date_time(reader)
        reader.sp()
    if reader.peek() != 0x7B:
        raise reader.error("APPEND needs the message as a literal")
    message = reader.literal()
    return c.Append(tag, mailbox, message, flags, internal_date)


def _expunge(reader: _Reader, tag: str, uid: bool) -> c.Command:
    if not uid:
        return c.Expunge(tag)
    reader.sp()
    return c.Expunge(tag, reader.sequence_set())


def _copy_move(cls: type[c.Copy] | type[c.Move]) -> Callable[[_Reader, str, bool], c.Command]:
    def handler(reader: _Reader, tag: str, uid: bool) -> c.Command:
        reader.sp()
        sequence_set = reader.sequence_set()
        reader.sp()
        return cls(tag, sequence_set, reader.mailbox(), uid)

    return handler


def _store(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    sequence_set = reader.sequence_set()
    reader.sp()
    unchanged_since = None
    if reader.peek() == 0x28:
        reader.pos += 1
        if reader.keyword() != "UNCHANGEDSINCE":
            raise reader.error("unsupported STORE modifier")
        reader.sp()
        unchanged_since = reader.number64()
        reader.expect(b")")
        reader.sp()
    action = c.StoreAction.REPLACE
    if reader.peek() == 0x2B:
        action = c.StoreAction.ADD
        reader.pos += 1
    elif reader.peek() == 0x2D:
        action = c.StoreAction.REMOVE
        reader.pos += 1
    item = reader.keyword()
    if item not in ("FLAGS", "FLAGS.SILENT"):
        raise reader.error("expected FLAGS or FLAGS.SILENT, got %s" % item[:32])
    reader.sp()
    if reader.peek() == 0x28:
        flags = reader.flag_list()
    else:
        flags_list = [reader.flag()]
        while reader.peek() == 0x20:
            reader.pos += 1
            flags_list.append(reader.flag())
        flags = tuple(flags_list)
    if "\\*" in flags:
        raise reader.error("\\* is not a flag")
    return c.Store(tag, sequence_set, action, flags, item.endswith(".SILENT"), uid, unchanged_since)


_FETCH_SIMPLE = {
    "FLAGS": c.FetchItem.FLAGS,
    "INTERNALDATE": c.FetchItem.INTERNALDATE,
    "RFC822.SIZE": c.FetchItem.RFC822_SIZE,
    "ENVELOPE": c.FetchItem.ENVELOPE,
    "BODYSTRUCTURE": c.FetchItem.BODYSTRUCTURE,
    "BODY": c.FetchItem.BODY,
    "UID": c.FetchItem.UID,
    "RFC822": c.FetchItem.RFC822,
    "RFC822.HEADER": c.FetchItem.RFC822_HEADER,
    "RFC822.TEXT": c.FetchItem.RFC822_TEXT,
    "MODSEQ": c.FetchItem.MODSEQ,
}
_FLAGS = c.FetchAttribute(c.FetchItem.FLAGS)
_INTERNALDATE = c.FetchAttribute(c.FetchItem.INTERNALDATE)
_SIZE = c.FetchAttribute(c.FetchItem.RFC822_SIZE)
_ENVELOPE = c.FetchAttribute(c.FetchItem.ENVELOPE)
_FETCH_MACROS = {
    "ALL": (_FLAGS, _INTERNALDATE, _SIZE, _ENVELOPE),
    "FAST": (_FLAGS, _INTERNALDATE, _SIZE),
    "FULL": (_FLAGS, _INTERNALDATE, _SIZE, _ENVELOPE, c.FetchAttribute(c.FetchItem.BODY)),
}
_SECTION_TEXTS = {specifier.value: specifier for specifier in c.SectionSpecifier}
_HEADER_NAME_CHARS = frozenset(range(0x21, 0x7F)) - {ord(":")}


def _section(reader: _Reader) -> c.Section:
    reader.expect(b"[")
    part: list[int] = []
    specifier = None
    fields: tuple[str, ...] = ()
    while reader.peek() != 0x5D:
        if reader.peek() in _DIGITS:
            part.append(reader.number(nonzero=True))
            if reader.peek() == 0x2E:
                reader.pos += 1
                continue
            break
        name = reader.take_while(_FETCH_NAME_CHARS).decode("ascii").upper()
        specifier = _SECTION_TEXTS.get(name)
        if specifier is None:
            raise reader.error("invalid section %r" % name[:32])
        if specifier is c.SectionSpecifier.MIME and not part:
            raise reader.error("MIME needs a part number")
        if specifier in (c.SectionSpecifier.HEADER_FIELDS, c.SectionSpecifier.HEADER_FIELDS_NOT):
            reader.sp()
            reader.expect(b"(")
            names: list[str] = []
            while True:
                raw = reader.astring()
                if not raw or not _HEADER_NAME_CHARS.issuperset(raw):
                    raise reader.error("invalid header field name")
                names.append(raw.decode("ascii").upper())
                if reader.peek() != 0x20:
                    break
                reader.pos += 1
            reader.expect(b")")
            fields = tuple(names)
        break
    reader.expect(b"]")
    return c.Section(tuple(part), specifier, fields)


def _fetch_attribute(reader: _Reader) -> c.FetchAttribute:
    name = reader.take_while(_FETCH_NAME_CHARS).decode("ascii").upper()
    if not name:
        raise reader.error("expected a FETCH item at position %d" % reader.pos)
    if reader.peek() == 0x5B and name in ("BODY", "BODY.PEEK"):
        section = _section(reader)
        partial = None
        if reader.peek() == 0x3C:
            reader.pos += 1
            origin = reader.number()
            reader.expect(b".")
            length = reader.number(nonzero=True)
            reader.expect(b">")
            partial = (origin, length)
        return c.FetchAttribute(c.FetchItem.BODY, section, name == "BODY.PEEK", partial)
    item = _FETCH_SIMPLE.get(name)
    if item is None:
        raise reader.error("unknown FETCH item %s" % name[:32])
    return c.FetchAttribute(item)


def _fetch(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    sequence_set = reader.sequence_set()
    reader.sp()
    attributes: tuple[c.FetchAttribute, ...]
    if reader.peek() == 0x28:
        reader.pos += 1
        items = [_fetch_attribute(reader)]
        while reader.peek() == 0x20:
            reader.pos += 1
            items.append(_fetch_attribute(reader))
        reader.expect(b")")
        attributes = tuple(items)
    else:
        start = reader.pos
        word = reader.take_while(_FETCH_NAME_CHARS).decode("ascii").upper()
        if word in _FETCH_MACROS and reader.peek() != 0x5B:
            attributes = _FETCH_MACROS[word]
        else:
            reader.pos = start
            attributes = (_fetch_attribute(reader),)
    changed_since = None
    if not reader.at_end():
        reader.sp()
        reader.expect(b"(")
        if reader.keyword() != "CHANGEDSINCE":
            raise reader.error("unsupported FETCH modifier")
        reader.sp()
        changed_since = reader.number64()
        reader.expect(b")")
    return c.Fetch(tag, sequence_set, attributes, uid, changed_since)


# --- SEARCH ---

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "RECENT": ("\\Recent", True),
    "SEEN": ("\\Seen", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
    "OLD": ("\\Recent", False),
}
_HEADER_KEYS = ("BCC", "CC", "FROM", "SUBJECT", "TO")
_DATE_KEYS = {
    "BEFORE": (c.DateField.INTERNAL, c.DateRelation.BEFORE),
    "ON": (c.DateField.INTERNAL, c.DateRelation.ON),
    "SINCE": (c.DateField.INTERNAL, c.DateRelation.SINCE),
    "SENTBEFORE": (c.DateField.SENT, c.DateRelation.BEFORE),
    "SENTON": (c.DateField.SENT, c.DateRelation.ON),
    "SENTSINCE": (c.DateField.SENT, c.DateRelation.SINCE),
}
_NEW = c.SearchAnd((c.SearchFlag("\\Recent", True), c.SearchFlag("\\Seen", False)))


def _search_date(reader: _Reader) -> datetime.date:
    if reader.peek() == 0x22:
        raw = reader.quoted()
    else:
        raw = reader.take_while(_ATOM_CHARS)
    match = re.fullmatch(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})", raw)
    month = _MONTHS.get(match.group(2).decode("ascii").upper()) if match else None
    if match is None or month is None:
        raise reader.error("invalid date %r" % raw[:40].decode("ascii", "replace"))
    try:
        return datetime.date(int(match.group(3)), month, int(match.group(1)))
    except ValueError:
        raise reader.error("invalid date %r" % raw[:40].decode("ascii", "replace")) from None


def _search_key(reader: _Reader) -> c.SearchKey:
    char = reader.peek()
    if char == 0x28:
        reader.enter()
        reader.pos += 1
        keys = [_search_key(reader)]
        while reader.peek() == 0x20:
            reader.pos += 1
            keys.append(_search_key(reader))
        reader.expect(b")")
        reader.leave()
        return keys[0] if len(keys) == 1 else c.SearchAnd(tuple(keys))
    if char is not None and char in _SEQUENCE_CHARS:
        return c.SearchSequenceSet(reader.sequence_set())
    name = reader.keyword()
    if name == "ALL":
        return c.SearchAll()
    flag = _FLAG_KEYS.get(name)
    if flag is not None:
        return c.SearchFlag(*flag)
    if name == "NEW":
        return _NEW
    if name in _HEADER_KEYS:
        reader.sp()
        return c.SearchHeader(name, reader.text(reader.astring(), name))
    date_key = _DATE_KEYS.get(name)
    if date_key is not None:
        reader.sp()
        return c.SearchDate(date_key[0], date_key[1], _search_date(reader))
    if name in ("KEYWORD", "UNKEYWORD"):
        reader.sp()
        keyword = reader.atom("a keyword").decode("ascii")
        return c.SearchFlag(keyword, name == "KEYWORD")
    if name in ("BODY", "TEXT"):
        reader.sp()
        return c.SearchText(reader.text(reader.astring(), name), name == "TEXT")
    if name == "HEADER":
        reader.sp()
        field_name = reader.astring()
        if not field_name or not _HEADER_NAME_CHARS.issuperset(field_name):
            raise reader.error("invalid header field name")
        reader.sp()
        return c.SearchHeader(field_name.decode("ascii").upper(), reader.text(reader.astring(), "HEADER"))
    if name in ("LARGER", "SMALLER"):
        reader.sp()
        return c.SearchSize(c.SizeRelation(name), reader.number())
    if name == "UID":
        reader.sp()
        return c.SearchSequenceSet(reader.sequence_set(), uid=True)
    if name == "NOT":
        reader.sp()
        reader.enter()
        key = _search_key(reader)
        reader.leave()
        return c.SearchNot(key)
    if name == "OR":
        reader.sp()
        reader.enter()
        left = _search_key(reader)
        reader.sp()
        right = _search_key(reader)
        reader.leave()
        return c.SearchOr(left, right)
    if name == "MODSEQ":
        reader.sp()
        if reader.peek() == 0x22:
            # An entry name and type (RFC 7162 section 3.1.5) narrow the test to
            # one flag's mod-sequence; the per-message MODSEQ is an upper bound.
            reader.quoted()
            reader.sp()
            entry_type = reader.keyword()
            if entry_type not in ("PRIV", "SHARED", "ALL"):
                raise reader.error("invalid MODSEQ entry type")
            reader.sp()
        return c.SearchModSeq(reader.number64())
    raise reader.error("unknown search key %s" % name[:32])


def _search(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    charset = None
    start = reader.pos
    if reader.take_while(_ATOM_CHARS).upper() == b"CHARSET":
        reader.sp()
        name = reader.text(reader.astring(), "charset").upper()
        charset = _CHARSETS.get(name)
        if charset is None:
            raise BadCharset("unsupported charset %s" % name[:32], tag=tag)
        reader.sp()
    else:
        reader.pos = start
    keys = [_search_key(reader)]
    while reader.peek() == 0x20:
        reader.pos += 1
        keys.append(_search_key(reader))
    if charset == "US-ASCII":
        for key in keys:
            _check_ascii(reader, key)
    key = keys[0] if len(keys) == 1 else c.SearchAnd(tuple(keys))
    return c.Search(tag, key, charset, uid)


def _check_ascii(reader: _Reader, key: c.SearchKey) -> None:
    if isinstance(key, (c.SearchHeader, c.SearchText)) and not key.value.isascii():
        raise reader.error("8-bit search string with CHARSET US-ASCII")
    if isinstance(key, c.SearchAnd):
        for inner in key.keys:
            _check_ascii(reader, inner)
    elif isinstance(key, c.SearchOr):
        _check_ascii(reader, key.left)
        _check_ascii(reader, key.right)
    elif isinstance(key, c.SearchNot):
        _check_ascii(reader, key.key)


def _id(reader: _Reader, tag: str, uid: bool) -> c.Command:
    reader.sp()
    if reader.peek() != 0x28:
        if reader.keyword() != "NIL":
            raise reader.error("ID needs a parameter list or NIL")
        return c.Id(tag, None)
    reader.pos += 1
    pairs: list[tuple[str, str | None]] = []
    while reader.peek() != 0x29:
        if pairs:
            reader.sp()
        key = reader.text(reader.string(), "ID field")
        reader.sp()
        value = reader.nstring()
        pairs.append((key, None if value is None else reader.text(value, "ID value")))
        if len(pairs) > MAX_ID_PAIRS:
            raise reader.error("more than %d ID parameters" % MAX_ID_PAIRS)
    reader.pos += 1
    return c.Id(tag, tuple(pairs))


def _enable(reader: _Reader, tag: str, uid: bool) -> c.Command:
    names = []
    while not reader.at_end():
        reader.sp()
        names.append(reader.keyword())
    if not names:
        raise reader.error("ENABLE needs at least one capability")
    return c.Enable(tag, tuple(names))


_COMMANDS: dict[str, Callable[[_Reader, str, bool], c.Command]] = {
    "CAPABILITY": _no_arguments(c.Capability),
    "NOOP": _no_arguments(c.Noop),
    "LOGOUT": _no_arguments(c.Logout),
    "STARTTLS": _no_arguments(c.StartTLS),
    "CHECK": _no_arguments(c.Check),
    "CLOSE": _no_arguments(c.Close),
    "UNSELECT": _no_arguments(c.Unselect),
    "IDLE": _no_arguments(c.Idle),
    "NAMESPACE": _no_arguments(c.Namespace),
    "LOGIN": _login,
    "AUTHENTICATE": _authenticate,
    "SELECT": _select(c.Select),
    "EXAMINE": _select(c.Examine),
    "CREATE": _create,
    "DELETE": _mailbox_only(c.Delete),
    "RENAME": _rename,
    "SUBSCRIBE": _mailbox_only(c.Subscribe),
    "UNSUBSCRIBE": _mailbox_only(c.Unsubscribe),
    "LIST": _list,
    "LSUB": _lsub,
    "STATUS": _status,
    "APPEND": _append,
    "EXPUNGE": _expunge,
    "COPY": _copy_move(c.Copy),
    "MOVE": _copy_move(c.Move),
    "STORE": _store,
    "FETCH": _fetch,
    "SEARCH": _search,
    "ID": _id,
    "ENABLE": _enable,
}
_UID_COMMANDS = frozenset({"COPY", "MOVE", "STORE", "FETCH", "SEARCH", "EXPUNGE"})
