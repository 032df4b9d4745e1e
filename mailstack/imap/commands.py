"""Typed IMAP commands, as the parser in :mod:`mailstack.imap.parser` produces them.

Every command is a frozen dataclass whose first field is the client's ``tag``.
Arguments arrive already decoded and checked against the grammar of RFC 3501
and of the extensions mailstack announces (UIDPLUS, MOVE, LITERAL+, IDLE, ID,
ENABLE, NAMESPACE, UNSELECT, SPECIAL-USE, SASL-IR):

- mailbox names are ``str``, decoded from modified UTF-7; ``INBOX`` in any
  letter case is returned as ``"INBOX"``;
- flags are ``str``: system flags in their canonical spelling (``"\\Seen"``),
  keywords as sent (keywords are case-insensitive, compare with
  ``str.casefold`` when needed);
- sequence sets are :class:`~mailstack.imap.sequence.SequenceSet`;
- UID variants are the same class with ``uid=True`` (``UID EXPUNGE`` is
  :class:`Expunge` with ``uid_set``);
- the macros ALL, FAST and FULL of FETCH are expanded into attributes;
- search strings are decoded with the command's CHARSET (UTF-8 or US-ASCII).

The session never handles wire bytes, and every command it receives is
syntactically valid. Semantic checks (is the mailbox there, may ``\\Recent``
be stored, is the sequence number within the mailbox) belong to the session.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field
from typing import ClassVar

from mailstack.imap.response import astring
from mailstack.imap.sequence import SequenceSet

__all__ = [
    "Append",
    "Authenticate",
    "Capability",
    "Check",
    "Close",
    "Command",
    "Copy",
    "Create",
    "DateField",
    "DateRelation",
    "Delete",
    "Enable",
    "Examine",
    "Expunge",
    "Fetch",
    "FetchAttribute",
    "FetchItem",
    "Id",
    "Idle",
    "List",
    "Login",
    "Logout",
    "Lsub",
    "Move",
    "Namespace",
    "Noop",
    "Rename",
    "Search",
    "SearchAll",
    "SearchAnd",
    "SearchDate",
    "SearchFlag",
    "SearchHeader",
    "SearchKey",
    "SearchModSeq",
    "SearchNot",
    "SearchOr",
    "SearchSequenceSet",
    "SearchSize",
    "SearchText",
    "Section",
    "SectionSpecifier",
    "Select",
    "SizeRelation",
    "StartTLS",
    "Status",
    "StatusItem",
    "Store",
    "StoreAction",
    "Subscribe",
    "Unselect",
    "Unsubscribe",
    "SYSTEM_FLAGS",
]

#: System flags of RFC 3501 section 2.3.2 in their canonical spelling.
SYSTEM_FLAGS: tuple[str, ...] = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")


@dataclass(frozen=True, slots=True)
class Command:
    """Base class of every command: the tag and the command name."""

    tag: str
    #: The command name as it appears on the wire, upper case.
    NAME: ClassVar[str] = ""

    @property
    def name(self) -> str:
        """Name for logs and replies, with the ``UID`` prefix of UID variants."""
        if getattr(self, "uid", False) or getattr(self, "uid_set", None) is not None:
            return "UID " + self.NAME
        return self.NAME


# --- commands without arguments ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Capability(Command):
    NAME: ClassVar[str] = "CAPABILITY"


@dataclass(frozen=True, slots=True)
class Noop(Command):
    NAME: ClassVar[str] = "NOOP"


@dataclass(frozen=True, slots=True)
class Logout(Command):
    NAME: ClassVar[str] = "LOGOUT"


@dataclass(frozen=True, slots=True)
class StartTLS(Command):
    NAME: ClassVar[str] = "STARTTLS"


@dataclass(frozen=True, slots=True)
class Check(Command):
    NAME: ClassVar[str] = "CHECK"


@dataclass(frozen=True, slots=True)
class Close(Command):
    NAME: ClassVar[str] = "CLOSE"


@dataclass(frozen=True, slots=True)
class Unselect(Command):
    NAME: ClassVar[str] = "UNSELECT"


@dataclass(frozen=True, slots=True)
class Idle(Command):
    """IDLE (RFC 2177): the client ends it with a ``DONE`` continuation line."""

    NAME: ClassVar[str] = "IDLE"


@dataclass(frozen=True, slots=True)
class Namespace(Command):
    NAME: ClassVar[str] = "NAMESPACE"


# --- authentication ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Login(Command):
    NAME: ClassVar[str] = "LOGIN"

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Authenticate(Command):
    """AUTHENTICATE with the SASL mechanism name in upper case.

    ``initial_response`` is the base64-decoded initial response of RFC 4959
    (``b""`` when the client sent ``=``), or None when the client sent none and
    the server must ask with an empty continuation.
    """

    NAME: ClassVar[str] = "AUTHENTICATE"

    mechanism: str
    initial_response: bytes | None = field(default=None, repr=False)


# --- mailboxes ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Select(Command):
    """SELECT; ``condstore`` is True for the ``(CONDSTORE)`` parameter of RFC 7162."""

    NAME: ClassVar[str] = "SELECT"

    mailbox: str
    condstore: bool = False


@dataclass(frozen=True, slots=True)
class Examine(Command):
    NAME: ClassVar[str] = "EXAMINE"

    mailbox: str
    condstore: bool = False


@dataclass(frozen=True, slots=True)
class Create(Command):
    """CREATE; ``special_use`` contains the ``(USE (...))`` attributes of RFC 6154."""

    NAME: ClassVar[str] = "CREATE"

    mailbox: str
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delete(Command):
    NAME: ClassVar[str] = "DELETE"

    mailbox: str


@dataclass(frozen=True, slots=True)
class Rename(Command):
    NAME: ClassVar[str] = "RENAME"

    old_name: str
    new_name: str


@dataclass(frozen=True, slots=True)
class Subscribe(Command):
    NAME: ClassVar[str] = "SUBSCRIBE"

    mailbox: str


@dataclass(frozen=True, slots=True)
class Unsubscribe(Command):
    NAME: ClassVar[str] = "UNSUBSCRIBE"

    mailbox: str


@dataclass(frozen=True, slots=True)
class List(Command):
    """LIST, including the extended form of RFC 5258 that SPECIAL-USE clients send.

    ``patterns`` has one entry for the basic form. Selection options (such as
    ``SPECIAL-USE`` or ``SUBSCRIBED``) and return options (such as
    ``SPECIAL-USE`` or ``CHILDREN``) are upper case.
    """

    NAME: ClassVar[str] = "LIST"

    reference: str
    patterns: tuple[str, ...]
    selection_options: tuple[str, ...] = ()
    return_options: tuple[str, ...] = ()

    @property
    def pattern(self) -> str:
        """The first (for the basic form, the only) pattern."""
        return self.patterns[0]


@dataclass(frozen=True, slots=True)
class Lsub(Command):
    NAME: ClassVar[str] = "LSUB"

    reference: str
    pattern: str


class StatusItem(enum.Enum):
    """Data items of STATUS (RFC 3501, RFC 7162 HIGHESTMODSEQ, RFC 7889, RFC 8438)."""

    MESSAGES = "MESSAGES"
    RECENT = "RECENT"
    UIDNEXT = "UIDNEXT"
    UIDVALIDITY = "UIDVALIDITY"
    UNSEEN = "UNSEEN"
    HIGHESTMODSEQ = "HIGHESTMODSEQ"
    APPENDLIMIT = "APPENDLIMIT"
    SIZE = "SIZE"


@dataclass(frozen=True, slots=True)
class Status(Command):
    NAME: ClassVar[str] = "STATUS"

    mailbox: str
    items: tuple[StatusItem, ...]


@dataclass(frozen=True, slots=True)
class Append(Command):
    """APPEND of one message; ``internal_date`` is timezone-aware when given."""

    NAME: ClassVar[str] = "APPEND"

    mailbox: str
    message: bytes = field(repr=False)
    flags: tuple[str, ...] = ()
    internal_date: datetime.datetime | None = None


# --- selected state -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expunge(Command):
    """EXPUNGE, or UID EXPUNGE (RFC 4315) when ``uid_set`` is given."""

    NAME: ClassVar[str] = "EXPUNGE"

    uid_set: SequenceSet | None = None


@dataclass(frozen=True, slots=True)
class Copy(Command):
    NAME: ClassVar[str] = "COPY"

    sequence_set: SequenceSet
    mailbox: str
    uid: bool = False


@dataclass(frozen=True, slots=True)
class Move(Command):
    NAME: ClassVar[str] = "MOVE"

    sequence_set: SequenceSet
    mailbox: str
    uid: bool = False


class StoreAction(enum.Enum):
    """The STORE operation: replace (``FLAGS``), add (``+FLAGS``) or remove (``-FLAGS``) flags."""

    REPLACE = ""
    ADD = "+"
    REMOVE = "-"


@dataclass(frozen=True, slots=True)
class Store(Command):
    """STORE; ``silent`` is the ``.SILENT`` suffix, ``unchanged_since`` RFC 7162's modifier."""

    NAME: ClassVar[str] = "STORE"

    sequence_set: SequenceSet
    action: StoreAction
    flags: tuple[str, ...]
    silent: bool = False
    uid: bool = False
    unchanged_since: int | None = None


# --- FETCH --------------------------------------------------------------------


class FetchItem(enum.Enum):
    """Message data items of FETCH. ``BODY`` with a section is a body section."""

    FLAGS = "FLAGS"
    INTERNALDATE = "INTERNALDATE"
    RFC822_SIZE = "RFC822.SIZE"
    ENVELOPE = "ENVELOPE"
    BODYSTRUCTURE = "BODYSTRUCTURE"
    BODY = "BODY"
    UID = "UID"
    RFC822 = "RFC822"
    RFC822_HEADER = "RFC822.HEADER"
    RFC822_TEXT = "RFC822.TEXT"
    MODSEQ = "MODSEQ"


class SectionSpecifier(enum.Enum):
    """The text part of a section specification (RFC 3501 section 6.4.5)."""

    HEADER = "HEADER"
    HEADER_FIELDS = "HEADER.FIELDS"
    HEADER_FIELDS_NOT = "HEADER.FIELDS.NOT"
    TEXT = "TEXT"
    MIME = "MIME"


@dataclass(frozen=True, slots=True)
class Section:
    """A body section: part numbers, then an optional specifier.

    ``BODY[]`` is ``Section()``; ``BODY[1.2.HEADER.FIELDS (From To)]`` is
    ``Section((1, 2), SectionSpecifier.HEADER_FIELDS, ("FROM", "TO"))``.
    Header field names are upper case.
    """

    part: tuple[int, ...] = ()
    specifier: SectionSpecifier | None = None
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        pieces = [".".join(str(number) for number in self.part)] if self.part else []
        if self.specifier is not None:
            pieces.append(self.specifier.value)
        text = ".".join(pieces)
        if self.specifier in (SectionSpecifier.HEADER_FIELDS, SectionSpecifier.HEADER_FIELDS_NOT):
            # A field name may contain characters that an atom cannot, such as "(".
            text += " (" + " ".join(astring(name).decode("ascii") for name in self.fields) + ")"
        return text


@dataclass(frozen=True, slots=True)
class FetchAttribute:
    """One requested data item.

    ``section`` is set only for ``BODY[...]`` and ``BODY.PEEK[...]``; then
    ``peek`` marks the PEEK form and ``partial`` is ``(origin, length)`` of
    ``<origin.length>``.
    """

    item: FetchItem
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None

    @property
    def sets_seen(self) -> bool:
        """True when fetching this item sets ``\\Seen`` (RFC 3501 section 6.4.5)."""
        if self.item is FetchItem.BODY:
            return self.section is not None and not self.peek
        return self.item in (FetchItem.RFC822, FetchItem.RFC822_TEXT)

    @property
    def needs_content(self) -> bool:
        """True when the item is computed from the message bytes."""
        return self.item in (
            FetchItem.ENVELOPE,
            FetchItem.BODYSTRUCTURE,
            FetchItem.BODY,
            FetchItem.RFC822,
            FetchItem.RFC822_HEADER,
            FetchItem.RFC822_TEXT,
        )

    @property
    def response_name(self) -> bytes:
        """The item's name in the FETCH response, e.g. ``BODY[HEADER]<0>``.

        PEEK is dropped and a partial shows only its origin, as RFC 3501 requires.
        """
        if self.section is None:
            return self.item.value.encode("ascii")
        name = "BODY[" + str(self.section) + "]"
        if self.partial is not None:
            name += "<%d>" % self.partial[0]
        return name.encode("ascii")


@dataclass(frozen=True, slots=True)
class Fetch(Command):
    """FETCH; ``changed_since`` is RFC 7162's ``(CHANGEDSINCE n)`` modifier.

    The attributes are those the client asked for, in its order, with macros
    expanded. For ``UID FETCH`` the session adds UID to the response itself.
    """

    NAME: ClassVar[str] = "FETCH"

    sequence_set: SequenceSet
    attributes: tuple[FetchAttribute, ...]
    uid: bool = False
    changed_since: int | None = None


# --- SEARCH -------------------------------------------------------------------


class SearchKey:
    """Base class of the nodes of a search program."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class SearchAll(SearchKey):
    """ALL: matches every message."""


@dataclass(frozen=True, slots=True)
class SearchAnd(SearchKey):
    """All keys must match: the top level of SEARCH and each parenthesised list."""

    keys: tuple[SearchKey, ...]


@dataclass(frozen=True, slots=True)
class SearchOr(SearchKey):
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True, slots=True)
class SearchNot(SearchKey):
    key: SearchKey


@dataclass(frozen=True, slots=True)
class SearchFlag(SearchKey):
    """A flag or keyword test: ``SEEN`` is ``SearchFlag("\\Seen", True)``, ``UNSEEN`` False.

    NEW becomes ``SearchAnd((SearchFlag("\\Recent", True), SearchFlag("\\Seen", False)))``
    and OLD ``SearchFlag("\\Recent", False)``.
    """

    flag: str
    present: bool = True


class DateField(enum.Enum):
    """The date that a date key compares: INTERNALDATE, or the Date: header for the SENT* keys."""

    INTERNAL = "INTERNAL"
    SENT = "SENT"


class DateRelation(enum.Enum):
    BEFORE = "BEFORE"
    ON = "ON"
    SINCE = "SINCE"


@dataclass(frozen=True, slots=True)
class SearchDate(SearchKey):
    """BEFORE/ON/SINCE and SENTBEFORE/SENTON/SENTSINCE; dates ignore time and zone."""

    field: DateField
    relation: DateRelation
    date: datetime.date


class SizeRelation(enum.Enum):
    LARGER = "LARGER"
    SMALLER = "SMALLER"


@dataclass(frozen=True, slots=True)
class SearchSize(SearchKey):
    """LARGER n (RFC822.SIZE > n) or SMALLER n (RFC822.SIZE < n)."""

    relation: SizeRelation
    size: int


@dataclass(frozen=True, slots=True)
class SearchHeader(SearchKey):
    """A substring test on a header field; BCC, CC, FROM, SUBJECT, TO and HEADER.

    ``name`` is upper case. An empty ``value`` matches every message that has
    the field (RFC 3501, HEADER key).
    """

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class SearchText(SearchKey):
    """BODY (``include_headers`` False) or TEXT (True): a substring test."""

    value: str
    include_headers: bool = False


@dataclass(frozen=True, slots=True)
class SearchSequenceSet(SearchKey):
    """A bare sequence set (``uid`` False) or ``UID set`` (``uid`` True)."""

    sequence_set: SequenceSet
    uid: bool = False


@dataclass(frozen=True, slots=True)
class SearchModSeq(SearchKey):
    """MODSEQ n of RFC 7162: messages whose mod-sequence is at least ``modseq``."""

    modseq: int


@dataclass(frozen=True, slots=True)
class Search(Command):
    """SEARCH; ``charset`` is None when the client named none (then US-ASCII)."""

    NAME: ClassVar[str] = "SEARCH"

    key: SearchKey
    charset: str | None = None
    uid: bool = False


# --- other ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Id(Command):
    """ID (RFC 2971): field/value pairs, or None for ``ID NIL``."""

    NAME: ClassVar[str] = "ID"

    parameters: tuple[tuple[str, str | None], ...] | None


@dataclass(frozen=True, slots=True)
class Enable(Command):
    """ENABLE (RFC 5161) with the capability names in upper case."""

    NAME: ClassVar[str] = "ENABLE"

    capabilities: tuple[str, ...]
