"""Encode IMAP responses to bytes, and the errors that render their own replies.

Values (RFC 3501 section 4) are encoded by small functions that return
``bytes``: :func:`atom`, :func:`quoted`, :func:`literal`, :func:`string`
(quoted when it can be, a literal otherwise), :func:`astring`,
:func:`nstring`, :func:`number`, :func:`paren_list`, :func:`flag_list`,
:func:`mailbox` and :func:`date_time`. :func:`encode` walks nested Python
values (None, int, str, bytes, :class:`Atom`, tuples and lists).

Whole responses end in CRLF: :func:`tagged`, :func:`untagged`,
:func:`continuation` and :func:`fetch_response`. They are plain bytes joins,
so a FETCH of 10,000 messages' FLAGS stays cheap.

Errors: :class:`ImapError` carries an optional tag, a text and an RFC 5530
response code, and :meth:`ImapError.render` produces the tagged reply (or an
untagged one when no tag is known). :class:`CommandFailed` and its
subclasses render NO, :class:`BadCommand` renders BAD, :class:`Bye` renders an
untagged BYE after which the connection closes. The text of an error goes to
the client, so it must never contain internal detail; :class:`ServerBug`
carries only an id that the server also logs with the traceback.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import ClassVar

from mailstack.imap import utf7

__all__ = [
    "Atom",
    "AlreadyExists",
    "AuthenticationFailed",
    "AuthorizationFailed",
    "BadCharset",
    "BadCommand",
    "Bye",
    "Cannot",
    "ClientBug",
    "CommandFailed",
    "ContactAdmin",
    "Corruption",
    "Expired",
    "ExpungeIssued",
    "HasChildren",
    "ImapError",
    "InUse",
    "Limit",
    "NIL",
    "NoPerm",
    "Nonexistent",
    "OverQuota",
    "PrivacyRequired",
    "ReadOnly",
    "ServerBug",
    "TooBig",
    "TryCreate",
    "Unavailable",
    "astring",
    "atom",
    "continuation",
    "date_time",
    "encode",
    "fetch_response",
    "flag_list",
    "literal",
    "mailbox",
    "nstring",
    "number",
    "paren_list",
    "quoted",
    "string",
    "tagged",
    "untagged",
    "untagged_status",
]

NIL = b"NIL"
CRLF = b"\r\n"

# ATOM-CHAR of RFC 3501: any CHAR except atom-specials, i.e. not
# "(" ")" "{" SP CTL "%" "*" DQUOTE "\" "]".
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x20)) | {0x7F}
_ATOM_CHARS = frozenset(range(0x01, 0x80)) - _ATOM_SPECIALS
# Characters that a quoted string cannot carry, so the value needs a literal.
_QUOTED_FORBIDDEN = frozenset(b"\r\n\x00") | frozenset(range(0x80, 0x100))


class Atom(bytes):
    """Bytes that :func:`encode` writes as they are (an atom or pre-encoded value)."""

    __slots__ = ()


def atom(value: str | bytes) -> bytes:
    """Return ``value`` as an atom, raising ValueError if it is not one."""
    data = value.encode("ascii") if isinstance(value, str) else value
    if not data or not _ATOM_CHARS.issuperset(data):
        raise ValueError("not an IMAP atom: %r" % (data[:64],))
    return data


def quoted(value: str | bytes) -> bytes:
    """Return ``value`` as a quoted string; raises ValueError for CR, LF, NUL or 8-bit data."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if not _QUOTED_FORBIDDEN.isdisjoint(data):
        raise ValueError("value needs a literal, not a quoted string")
    if b"\\" in data or b'"' in data:
        data = data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + data + b'"'


def literal(value: bytes) -> bytes:
    """Return ``value`` as a synchronising literal ``{n}CRLF<bytes>``."""
    return b"{%d}\r\n" % len(value) + value


def string(value: str | bytes) -> bytes:
    """Return a quoted string when the value allows it, otherwise a literal."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) > 1024 or not _QUOTED_FORBIDDEN.isdisjoint(data):
        return literal(data)
    if b"\\" in data or b'"' in data:
        data = data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + data + b'"'


def nstring(value: str | bytes | None) -> bytes:
    """Return NIL for None, else :func:`string`."""
    return NIL if value is None else string(value)


def astring(value: str | bytes) -> bytes:
    """Return an atom when the value is one (``]`` allowed), else :func:`string`."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if data and _ATOM_CHARS.union(b"]").issuperset(data) and data.upper() != NIL:
        return data
    return string(data)


def number(value: int) -> bytes:
    return b"%d" % value


def paren_list(items: Iterable[bytes]) -> bytes:
    """Return already-encoded items as a parenthesised list."""
    return b"(" + b" ".join(items) + b")"


_flag_cache: dict[str, bytes] = {}


def flag_list(flags: Iterable[str]) -> bytes:
    """Return flags as ``(\\Seen $Label)``; flags are atoms or ``\\`` plus an atom."""
    cache = _flag_cache
    encoded = []
    for flag in flags:
        data = cache.get(flag)
        if data is None:
            data = flag.encode("ascii")
            body = data[1:] if data.startswith(b"\\") else data
            if body != b"*" and (not body or not _ATOM_CHARS.issuperset(body)):
                raise ValueError("not an IMAP flag: %r" % (flag[:64],))
            if len(cache) < 4096:
                cache[flag] = data
        encoded.append(data)
    return b"(" + b" ".join(encoded) + b")"


def mailbox(name: str) -> bytes:
    """Return a mailbox name encoded in modified UTF-7 as an astring (always quoted when not an atom)."""
    return astring(utf7.encode(name).encode("ascii"))


_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")


def date_time(value: datetime.datetime) -> bytes:
    """Return INTERNALDATE's quoted ``"dd-Mon-yyyy hh:mm:ss +zzzz"`` (naive values count as UTC)."""
    offset = value.utcoffset() or datetime.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = b"+" if minutes >= 0 else b"-"
    minutes = abs(minutes)
    return b'"%02d-%s-%04d %02d:%02d:%02d %s%02d%02d"' % (
        value.day,
        _MONTHS[value.month - 1],
        value.year,
        value.hour,
        value.minute,
        value.second,
        sign,
        minutes // 60,
        minutes % 60,
    )


def encode(value: object) -> bytes:
    """Encode nested values: None is NIL, int a number, str/bytes a string, Atom raw, tuples and lists lists."""
    if value is None:
        return NIL
    if isinstance(value, Atom):
        return bytes(value)
    if isinstance(value, (str, bytes)):
        return string(value)
    if isinstance(value, bool):
        raise TypeError("IMAP has no boolean value")
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, (list, tuple)):
        return b"(" + b" ".join(encode(item) for item in value) + b")"
    raise TypeError("cannot encode %r as an IMAP value" % type(value).__name__)


def _clean_text(text: str) -> bytes:
    # Response text is a single line of 7-bit characters: anything else would
    # let a value (for example a mailbox name) break the framing.
    data = text.encode("ascii", "replace")
    if b"\r" in data or b"\n" in data or b"\x00" in data:
        data = data.replace(b"\r", b" ").replace(b"\n", b" ").replace(b"\x00", b" ")
    return data


def _status_line(prefix: bytes, status: bytes, text: str, code: bytes | None) -> bytes:
    parts = [prefix, b" ", status, b" "]
    if code:
        parts += [b"[", code, b"] "]
    parts += [_clean_text(text) or b"done", CRLF]
    return b"".join(parts)


def tagged(tag: str, status: bytes, text: str, code: bytes | None = None) -> bytes:
    """Return ``tag OK|NO|BAD [code] text`` CRLF."""
    return _status_line(tag.encode("ascii", "replace"), status, text, code)


def untagged(data: bytes) -> bytes:
    """Return ``* data`` CRLF for pre-encoded data, e.g. ``b"3 EXISTS"``."""
    return b"* " + data + CRLF


def untagged_status(status: bytes, text: str, code: bytes | None = None) -> bytes:
    """Return ``* OK|NO|BAD|BYE|PREAUTH [code] text`` CRLF."""
    return _status_line(b"*", status, text, code)


def continuation(text: str = "") -> bytes:
    """Return a continuation request ``+ text`` CRLF (``+`` and a space when empty)."""
    return b"+ " + _clean_text(text) + CRLF


def fetch_response(sequence_number: int, items: Iterable[bytes]) -> bytes:
    """Return ``* n FETCH (items)`` CRLF; items are pre-encoded ``NAME value`` pairs."""
    return b"* %d FETCH (" % sequence_number + b" ".join(items) + b")\r\n"


# --- errors --------------------------------------------------------------------


class ImapError(Exception):
    """An error that renders its own reply: status, optional response code, text."""

    status: ClassVar[bytes] = b"NO"
    code: bytes | None = None

    def __init__(self, text: str, *, tag: str | None = None, code: bytes | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.tag = tag
        if code is not None:
            self.code = code

    def render(self, tag: str | None = None) -> bytes:
        """Return the reply, tagged with ``tag`` or the error's own tag, else untagged."""
        tag = tag or self.tag
        if tag is None:
            return untagged_status(self.status, self.text, self.code)
        return tagged(tag, self.status, self.text, self.code)


class CommandFailed(ImapError):
    """NO: the command was valid but could not be carried out."""

    status = b"NO"


class BadCommand(ImapError):
    """BAD: the command was invalid (syntax, or not allowed in this state)."""

    status = b"BAD"


class Bye(ImapError):
    """BYE: the server closes the connection after this untagged reply."""

    status = b"BYE"

    def render(self, tag: str | None = None) -> bytes:
        return untagged_status(self.status, self.text, self.code)


class ClientBug(BadCommand):
    code = b"CLIENTBUG"


class Expired(CommandFailed):
    """NO [EXPIRED]: the credentials are valid but have expired."""

    code = b"EXPIRED"


class HasChildren(CommandFailed):
    """NO [HASCHILDREN]: the mailbox has child mailboxes (a response code of IMAP4rev2, RFC 9051)."""

    code = b"HASCHILDREN"


class Nonexistent(CommandFailed):
    code = b"NONEXISTENT"


class AlreadyExists(CommandFailed):
    code = b"ALREADYEXISTS"


class Cannot(CommandFailed):
    code = b"CANNOT"


class TryCreate(CommandFailed):
    code = b"TRYCREATE"


class AuthenticationFailed(CommandFailed):
    code = b"AUTHENTICATIONFAILED"


class AuthorizationFailed(CommandFailed):
    code = b"AUTHORIZATIONFAILED"


class PrivacyRequired(CommandFailed):
    code = b"PRIVACYREQUIRED"


class ContactAdmin(CommandFailed):
    code = b"CONTACTADMIN"


class NoPerm(CommandFailed):
    code = b"NOPERM"


class InUse(CommandFailed):
    code = b"INUSE"


class ExpungeIssued(CommandFailed):
    code = b"EXPUNGEISSUED"


class Corruption(CommandFailed):
    code = b"CORRUPTION"


class Limit(CommandFailed):
    code = b"LIMIT"


class OverQuota(CommandFailed):
    code = b"OVERQUOTA"


class Unavailable(CommandFailed):
    code = b"UNAVAILABLE"


class ReadOnly(CommandFailed):
    """NO [READ-ONLY]: a change was asked of a mailbox opened with EXAMINE."""

    code = b"READ-ONLY"


class TooBig(CommandFailed):
    """NO [TOOBIG]: a literal or message above the limit (RFC 7889 uses it for APPENDLIMIT)."""

    code = b"TOOBIG"


class BadCharset(CommandFailed):
    """NO [BADCHARSET (...)]: a SEARCH CHARSET the server does not support."""

    def __init__(
        self, text: str, *, tag: str | None = None, supported: tuple[str, ...] = ("UTF-8", "US-ASCII")
    ) -> None:
        super().__init__(text, tag=tag, code=b"BADCHARSET (" + " ".join(supported).encode("ascii") + b")")


class ServerBug(CommandFailed):
    """NO [SERVERBUG]: an unexpected failure; the client sees only the id, the log has the rest."""

    code = b"SERVERBUG"

    def __init__(self, error_id: str, *, tag: str | None = None) -> None:
        super().__init__("internal server error, id %s" % error_id, tag=tag)
        self.error_id = error_id
