"""IMAP sequence sets (RFC 3501 section 9, ``sequence-set``).

A :class:`SequenceSet` is parsed from text such as ``1:5,7,10:*`` and keeps
its ranges as given, with ``None`` for ``*``. It is resolved later, against
the session's view of the mailbox:

- :meth:`SequenceSet.resolve` for message sequence numbers: ``*`` is the
  message count, a reversed range ``5:2`` means ``2:5``, and any number above
  the count, or any set against an empty mailbox, raises
  :class:`SequenceOutOfRange` (a BAD reply, as RFC 3501 section 9 requires).
- :meth:`SequenceSet.resolve_uids` for UIDs: ``*`` is the highest UID in
  use, and numbers that match no message are silently skipped, so
  ``UID FETCH 500:*`` on a mailbox whose highest UID is 300 returns UID 300.

Both return sorted numbers without duplicates.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from mailstack.imap.response import BadCommand

__all__ = ["InvalidSequenceSet", "SequenceOutOfRange", "SequenceSet", "MAX_NUMBER"]

#: Largest value of ``nz-number`` (a 32-bit unsigned integer, RFC 3501).
MAX_NUMBER = 4294967295


class InvalidSequenceSet(BadCommand):
    """The text is not a sequence set."""


class SequenceOutOfRange(BadCommand):
    """A message sequence number is above the number of messages."""


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """Ranges of numbers; each is ``(first, last)`` with ``None`` for ``*``.

    A single number ``n`` is stored as ``(n, n)``; first may be greater than last.
    """

    ranges: tuple[tuple[int | None, int | None], ...]

    @classmethod
    def parse(cls, text: str | bytes) -> SequenceSet:
        """Parse a sequence set, raising :class:`InvalidSequenceSet` on bad syntax."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        if not text:
            raise InvalidSequenceSet("empty sequence set")
        ranges = []
        for item in text.split(","):
            first, colon, last = item.partition(":")
            start = _parse_number(first, text)
            end = _parse_number(last, text) if colon else start
            ranges.append((start, end))
        return cls(tuple(ranges))

    @classmethod
    def of(cls, numbers: Sequence[int]) -> SequenceSet:
        """Build a compact set from numbers, e.g. ``[1, 2, 3, 7]`` -> ``1:3,7``."""
        ranges: list[tuple[int | None, int | None]] = []
        for number in sorted(set(numbers)):
            if ranges and ranges[-1][1] == number - 1:
                ranges[-1] = (ranges[-1][0], number)
            else:
                ranges.append((number, number))
        if not ranges:
            raise ValueError("a sequence set needs at least one number")
        return cls(tuple(ranges))

    def __str__(self) -> str:
        parts = []
        for first, last in self.ranges:
            first_text = "*" if first is None else str(first)
            if first == last:
                parts.append(first_text)
            else:
                parts.append(first_text + ":" + ("*" if last is None else str(last)))
        return ",".join(parts)

    def _bounds(self, star: int) -> Iterator[tuple[int, int]]:
        for first, last in self.ranges:
            low = star if first is None else first
            high = star if last is None else last
            if low > high:
                low, high = high, low
            yield low, high

    def _merged(self, star: int) -> list[tuple[int, int]]:
        # Overlapping and adjacent ranges are merged first, so that a set such
        # as "1:*,1:*,..." costs no more than "1:*" however often it repeats.
        merged: list[tuple[int, int]] = []
        for low, high in sorted(self._bounds(star)):
            if merged and low <= merged[-1][1] + 1:
                if high > merged[-1][1]:
                    merged[-1] = (merged[-1][0], high)
            else:
                merged.append((low, high))
        return merged

    def resolve(self, count: int) -> list[int]:
        """Return the message sequence numbers of the set, for a mailbox of ``count`` messages.

        Raises :class:`SequenceOutOfRange` when a number exceeds ``count``,
        including every set against an empty mailbox.
        """
        if count <= 0:
            raise SequenceOutOfRange("no messages in the mailbox, so no sequence number is valid")
        merged = self._merged(count)
        if merged[-1][1] > count:
            raise SequenceOutOfRange(
                "invalid message sequence number %d: the mailbox has %d messages" % (merged[-1][1], count)
            )
        numbers: list[int] = []
        for low, high in merged:
            numbers.extend(range(low, high + 1))
        return numbers

    def resolve_uids(self, uids: Sequence[int]) -> list[int]:
        """Return the UIDs from ``uids`` (sorted ascending) that the set contains.

        ``*`` stands for the highest UID in ``uids``. An empty mailbox gives [].
        """
        return [uids[index] for index in self.uid_positions(uids)]

    def uid_positions(self, uids: Sequence[int]) -> list[int]:
        """Like :meth:`resolve_uids`, but return 0-based positions in ``uids``.

        Position ``i`` is the message with sequence number ``i + 1``.
        """
        if not uids:
            return []
        positions: list[int] = []
        for low, high in self._merged(uids[-1]):
            positions.extend(range(bisect.bisect_left(uids, low), bisect.bisect_right(uids, high)))
        return positions

    def contains(self, number: int, star: int) -> bool:
        """Tell whether ``number`` is in the set when ``*`` is ``star``."""
        return any(low <= number <= high for low, high in self._bounds(star))


def _parse_number(text: str, whole: str) -> int | None:
    if text == "*":
        return None
    # str.isdigit accepts non-ASCII digits, so check the characters explicitly.
    if not text or len(text) > 10 or text.strip("0123456789"):
        raise InvalidSequenceSet("invalid sequence set %r" % whole[:64])
    number = int(text)
    if number == 0 or number > MAX_NUMBER:
        raise InvalidSequenceSet("invalid number %s in sequence set: must be 1 to %d" % (text, MAX_NUMBER))
    return number
