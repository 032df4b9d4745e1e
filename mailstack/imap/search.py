"""SEARCH evaluation: in SQL where the store can, in Python on the message content otherwise.

Keys on flags, internal dates, sizes, UIDs, sequence numbers and MODSEQ become
one WHERE clause. Keys on header fields and text (FROM, SUBJECT, HEADER, BODY,
TEXT, SENTBEFORE, ...) need the message bytes: the SQL part first narrows the
candidates, then those keys are tested on each remaining message. An OR or
NOT with a content key inside is evaluated wholly in Python.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import and_, false, func, not_, or_, select, true

from mailstack.imap import commands as c
from mailstack.imap import mime
from mailstack.imap.view import MailboxView, split_flags
from mailstack.store.messages import uid_ranges
from mailstack.store.models import Message, MessageContent

log = logging.getLogger(__name__)

# A sequence or UID set with more ranges than this is tested in Python, because
# one BETWEEN term per range would exceed SQLite's expression depth.
MAX_SQL_RANGES = 50
# Maximum search keys in one SEARCH, counting every key, OR and NOT in the whole program.
# A flat AND of about 1000 keys exceeds SQLite's expression depth of 1000, and 256
# keys of the deepest SQL form (a set of MAX_SQL_RANGES ranges each) stay below it.
MAX_SEARCH_KEYS = 256
CONTENT_BATCH = 200
CONTENT_BATCH_BYTES = 16 * 1024 * 1024


@dataclass
class Candidate:
    """One message under test, with its MIME tree parsed only when a key needs it."""

    uid: int
    sequence_number: int
    modseq: int
    flags: int
    keywords: tuple[str, ...]
    internal_date: dt.datetime
    size: int
    data: bytes | None = None
    _tree: mime.MimePart | None = None

    @property
    def tree(self) -> mime.MimePart:
        if self._tree is None:
            self._tree = mime.parse(self.data or b"")
        return self._tree

    def release(self) -> None:
        """Drop the content and its MIME tree."""
        self.data = None
        self._tree = None


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)


def needs_content(key: c.SearchKey) -> bool:
    if isinstance(key, (c.SearchHeader, c.SearchText)):
        return True
    if isinstance(key, c.SearchDate):
        return key.field is c.DateField.SENT
    if isinstance(key, c.SearchAnd):
        return any(needs_content(k) for k in key.keys)
    if isinstance(key, c.SearchOr):
        return needs_content(key.left) or needs_content(key.right)
    if isinstance(key, c.SearchNot):
        return needs_content(key.key)
    return False


def count_keys(key: c.SearchKey) -> int:
    """Return the number of search keys in ``key``; a parenthesised list counts only its members."""
    if isinstance(key, c.SearchAnd):
        return sum(count_keys(k) for k in key.keys)
    if isinstance(key, c.SearchOr):
        return 1 + count_keys(key.left) + count_keys(key.right)
    if isinstance(key, c.SearchNot):
        return 1 + count_keys(key.key)
    return 1


class SearchCompiler:
    """Turns a search program into a SQL clause plus a Python test for what SQL cannot do."""

    def __init__(self, view: MailboxView) -> None:
        self.view = view
        self._set_cache: dict[int, list[int]] = {}

    # SQL ------------------------------------------------------------------------

    def sql(self, key: c.SearchKey):
        """Return a SQL clause for ``key``, or None when it must be tested in Python."""
        if isinstance(key, c.SearchAll):
            return true()
        if isinstance(key, c.SearchAnd):
            parts = [self.sql(k) for k in key.keys]
            if any(p is None for p in parts):
                return None
            return and_(true(), *parts)
        if isinstance(key, c.SearchOr):
            left, right = self.sql(key.left), self.sql(key.right)
            if left is None or right is None:
                return None
            return or_(left, right)
        if isinstance(key, c.SearchNot):
            inner = self.sql(key.key)
            return None if inner is None else not_(inner)
        if isinstance(key, c.SearchFlag):
            return self._flag_sql(key)
        if isinstance(key, c.SearchDate):
            if key.field is c.DateField.SENT:
                return None
            start = _day_start(key.date)
            end = start + dt.timedelta(days=1)
            if key.relation is c.DateRelation.BEFORE:
                return Message.internal_date < start
            if key.relation is c.DateRelation.ON:
                return and_(Message.internal_date >= start, Message.internal_date < end)
            return Message.internal_date >= start
        if isinstance(key, c.SearchSize):
            if key.relation is c.SizeRelation.LARGER:
                return Message.size > key.size
            return Message.size < key.size
        if isinstance(key, c.SearchModSeq):
            return Message.modseq >= key.modseq
        if isinstance(key, c.SearchSequenceSet):
            ranges = self._uid_ranges(key)
            if ranges is None:
                return None
            if not ranges:
                return false()
            return or_(*[Message.uid.between(lo, hi) for lo, hi in ranges])
        return None

    def _flag_sql(self, key: c.SearchFlag):
        name = key.flag
        if name.lower() == "\\recent":
            # mailstack keeps no \Recent state: no message is recent.
            return false() if key.present else true()
        mask, keywords = split_flags([name])
        if mask:
            test = Message.flags.op("&")(mask) != 0
        elif keywords:
            # Keywords are stored space-separated; compare case-insensitively on word bounds.
            word = keywords[0].lower()
            padded = " " + word + " "
            test = (" " + func.lower(Message.keywords) + " ").contains(padded, autoescape=True)
        else:
            test = false()
        return test if key.present else not_(test)

    def _matching_uids(self, key: c.SearchSequenceSet) -> list[int]:
        """Return the view's UIDs that a sequence or UID set names, ascending.

        A message sequence number above the message count raises BAD, as for
        every other command; against an empty mailbox nothing matches.
        """
        cached = self._set_cache.get(id(key))
        if cached is not None:
            return cached
        uids = self.view.uids
        if not uids:
            found: list[int] = []
        elif key.uid:
            found = key.sequence_set.resolve_uids(uids)
        else:
            found = [uids[number - 1] for number in key.sequence_set.resolve(len(uids))]
        self._set_cache[id(key)] = found
        return found

    def _uid_ranges(self, key: c.SearchSequenceSet) -> list[tuple[int, int]] | None:
        """Return UID ranges for a sequence or UID set, or None when there are too many for SQL."""
        ranges = uid_ranges(self._matching_uids(key))
        return ranges if len(ranges) <= MAX_SQL_RANGES else None

    # Python ---------------------------------------------------------------------

    def test(self, key: c.SearchKey) -> Callable[[Candidate], bool]:
        """Return a predicate that evaluates ``key`` on one candidate."""
        if isinstance(key, c.SearchAll):
            return lambda m: True
        if isinstance(key, c.SearchAnd):
            tests = [self.test(k) for k in key.keys]
            return lambda m: all(t(m) for t in tests)
        if isinstance(key, c.SearchOr):
            left, right = self.test(key.left), self.test(key.right)
            return lambda m: left(m) or right(m)
        if isinstance(key, c.SearchNot):
            inner = self.test(key.key)
            return lambda m: not inner(m)
        if isinstance(key, c.SearchFlag):
            return self._flag_test(key)
        if isinstance(key, c.SearchDate):
            return self._date_test(key)
        if isinstance(key, c.SearchSize):
            size = key.size
            if key.relation is c.SizeRelation.LARGER:
                return lambda m: m.size > size
            return lambda m: m.size < size
        if isinstance(key, c.SearchModSeq):
            modseq = key.modseq
            return lambda m: m.modseq >= modseq
        if isinstance(key, c.SearchSequenceSet):
            members = set(self._matching_uids(key))
            return lambda m: m.uid in members
        if isinstance(key, c.SearchHeader):
            return self._header_test(key)
        if isinstance(key, c.SearchText):
            needle = key.value
            include_headers = key.include_headers
            return lambda m: mime.text_contains(m.tree, needle, include_headers)
        raise TypeError(f"unknown search key {key!r}")

    def _flag_test(self, key: c.SearchFlag) -> Callable[[Candidate], bool]:
        present = key.present
        if key.flag.lower() == "\\recent":
            return lambda m: not present
        mask, keywords = split_flags([key.flag])
        if mask:
            return lambda m: bool(m.flags & mask) == present
        if keywords:
            word = keywords[0].lower()
            return lambda m: any(k.lower() == word for k in m.keywords) == present
        return lambda m: not present

    def _date_test(self, key: c.SearchDate) -> Callable[[Candidate], bool]:
        day = key.date
        relation = key.relation

        def compare(value: dt.date | None) -> bool:
            if value is None:
                return False
            if relation is c.DateRelation.BEFORE:
                return value < day
            if relation is c.DateRelation.ON:
                return value == day
            return value >= day

        if key.field is c.DateField.SENT:
            return lambda m: compare(mime.sent_date(m.tree))
        return lambda m: compare(m.internal_date.astimezone(dt.timezone.utc).date())

    def _header_test(self, key: c.SearchHeader) -> Callable[[Candidate], bool]:
        name = key.name
        needle = key.value
        return lambda m: mime.header_contains(m.tree, name, needle)


def split_and(key: c.SearchKey) -> list[c.SearchKey]:
    if isinstance(key, c.SearchAnd):
        found: list[c.SearchKey] = []
        for child in key.keys:
            found.extend(split_and(child))
        return found
    return [key]


async def search(store, view: MailboxView, key: c.SearchKey) -> list[int]:
    """Return the UIDs of the view's messages that match ``key``, ascending."""
    compiler = SearchCompiler(view)
    sql_parts = []
    python_parts = []
    for part in split_and(key):
        clause = compiler.sql(part)
        if clause is None:
            python_parts.append(part)
        else:
            sql_parts.append(clause)
    if not view.uids:
        return []

    # Restrict to the messages announced to the session, so unannounced new mail is not returned.
    known = and_(Message.mailbox_id == view.mailbox_id, Message.uid <= view.uids[-1])
    where = and_(known, *sql_parts)
    if not python_parts:
        # A bare connection, because an ORM session would add work and nothing else here.
        async with store.engine.connect() as connection, connection.begin():
            found = list(await connection.scalars(select(Message.uid).where(where).order_by(Message.uid)))
        states = view.states
        return [uid for uid in found if uid in states]

    content = any(needs_content(part) for part in python_parts)
    tests = [compiler.test(part) for part in python_parts]
    query = (
        select(Message.uid, Message.modseq, Message.flags, Message.keywords, Message.internal_date, Message.size)
        .where(where)
        .order_by(Message.uid)
    )
    async with store.read() as session:
        rows = (await session.execute(query)).all()
    candidates = []
    for uid, modseq, flags, keywords, internal_date, size in rows:
        sequence_number = view.sequence_of(uid)
        if sequence_number is None:
            continue
        candidates.append(
            Candidate(uid, sequence_number, modseq, flags, tuple(keywords.split()), internal_date, size)
        )

    matched: list[int] = []
    # Content is read in batches of at most CONTENT_BATCH messages and about
    # CONTENT_BATCH_BYTES, so a TEXT search over a large mailbox keeps one batch in memory at a time.
    for chunk in _batches(candidates, CONTENT_BATCH if content else len(candidates) or 1):
        if content:
            await _load_content(store, view.mailbox_id, chunk)
        for candidate in chunk:
            if all(test(candidate) for test in tests):
                matched.append(candidate.uid)
            candidate.release()
    return matched


def _batches(candidates: list[Candidate], count: int) -> list[list[Candidate]]:
    batches: list[list[Candidate]] = []
    total = 0
    for candidate in candidates:
        if not batches or len(batches[-1]) >= count or total + candidate.size > CONTENT_BATCH_BYTES:
            batches.append([])
            total = 0
        batches[-1].append(candidate)
        total += candidate.size
    return batches


async def _load_content(store, mailbox_id: int, chunk: list[Candidate]) -> None:
    by_uid = {candidate.uid: candidate for candidate in chunk}
    async with store.read() as session:
        rows = await session.execute(
            select(Message.uid, MessageContent.data)
            .join(MessageContent, MessageContent.sha256 == Message.content_sha256)
            .where(Message.mailbox_id == mailbox_id, Message.uid.in_(list(by_uid)))
        )
        for uid, data in rows:
            by_uid[uid].data = data


__all__ = ["MAX_SEARCH_KEYS", "Candidate", "SearchCompiler", "count_keys", "search"]
