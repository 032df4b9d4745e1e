"""One session's view of its selected mailbox: the sequence-number map and pending changes.

Every session keeps its own map from message sequence numbers to UIDs. Changes
made elsewhere (another session, delivery, another process) reach the view by
``sync``, which reads everything after the MODSEQ the view last saw and returns
the untagged responses that bring the client up to date. While expunges may
not be announced (during FETCH, STORE and SEARCH), they wait in the view and
the expunged messages keep their sequence numbers.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mailstack.imap import response
from mailstack.store.messages import MailboxChanges, MessageState
from mailstack.store.models import SYSTEM_FLAG_NAMES, Flag

SYSTEM_FLAGS_BY_NAME = {name.lower(): int(flag) for flag, name in SYSTEM_FLAG_NAMES.items()}
FLAG_ORDER = [(int(flag), name) for flag, name in SYSTEM_FLAG_NAMES.items()]


def flag_names(flags: int, keywords: Iterable[str] = ()) -> list[str]:
    """Return the IMAP flag list of a message: system flags first, then keywords."""
    names = [name for bit, name in FLAG_ORDER if flags & bit]
    names.extend(keywords)
    return names


@functools.lru_cache(maxsize=4096)
def encoded_flags(flags: int, keywords: tuple[str, ...] = ()) -> bytes:
    """Return ``FLAGS (...)`` for a FETCH response; cached, since most messages share a few flag sets."""
    return b"FLAGS " + response.flag_list(flag_names(flags, keywords))


def split_flags(names: Iterable[str]) -> tuple[int, list[str]]:
    """Split IMAP flag names into a system flag mask and keywords; \\Recent is dropped."""
    mask = 0
    keywords: list[str] = []
    for name in names:
        bit = SYSTEM_FLAGS_BY_NAME.get(name.lower())
        if bit is not None:
            mask |= bit
        elif name.startswith("\\"):
            # \Recent and unknown system flags cannot be stored; RFC 3501 section 2.3.2.
            continue
        else:
            keywords.append(name)
    return mask, keywords


@dataclass
class Update:
    """Untagged responses produced by a sync, in the order they must be sent."""

    expunged: list[int] = field(default_factory=list)  # sequence numbers, each valid when sent
    exists: int | None = None
    fetches: list[tuple[int, MessageState]] = field(default_factory=list)  # (sequence number, state)
    new_keywords: bool = False

    def __bool__(self) -> bool:
        return bool(self.expunged or self.exists is not None or self.fetches or self.new_keywords)


class MailboxView:
    """The selected mailbox as one session has seen it so far."""

    def __init__(
        self,
        mailbox_id: int,
        name: str,
        uidvalidity: int,
        uidnext: int,
        modseq: int,
        states: Sequence[MessageState],
        *,
        read_only: bool,
    ) -> None:
        self.mailbox_id = mailbox_id
        self.name = name
        self.uidvalidity = uidvalidity
        self.uidnext = uidnext
        self.modseq = modseq
        self.read_only = read_only
        self.uids: list[int] = [state.uid for state in states]
        self.states: dict[int, MessageState] = {state.uid: state for state in states}
        self.keywords: set[str] = set()
        self._keywords_lower: set[str] = set()
        for state in states:
            self._learn_keywords(state.keywords)
        # UIDs expunged in the store that this session has not announced yet.
        self.pending_expunges: set[int] = set()

    def _learn_keywords(self, keywords: Iterable[str]) -> bool:
        learned = False
        for keyword in keywords:
            if keyword.lower() not in self._keywords_lower:
                self._keywords_lower.add(keyword.lower())
                self.keywords.add(keyword)
                learned = True
        return learned

    # Lookups ------------------------------------------------------------------

    @property
    def exists(self) -> int:
        return len(self.uids)

    def uid_of(self, sequence_number: int) -> int:
        return self.uids[sequence_number - 1]

    def sequence_of(self, uid: int) -> int | None:
        index = bisect.bisect_left(self.uids, uid)
        if index < len(self.uids) and self.uids[index] == uid:
            return index + 1
        return None

    def sequences_of(self, uids: list[int]) -> list[int]:
        """Return the sequence numbers of sorted UIDs, skipping UIDs not in the view.

        One merge walk over both sorted lists, instead of a binary search per UID.
        """
        found: list[int] = []
        known = self.uids
        position = 0
        count = len(known)
        for uid in uids:
            while position < count and known[position] < uid:
                position += 1
            if position == count:
                break
            if known[position] == uid:
                found.append(position + 1)
        return found

    def uids_in_range(self, first: int, last: int) -> list[int]:
        """Return the known UIDs from ``first`` to ``last`` inclusive."""
        low = bisect.bisect_left(self.uids, first)
        high = bisect.bisect_right(self.uids, last)
        return self.uids[low:high]

    def unseen_first(self) -> int | None:
        """Return the sequence number of the first message without \\Seen."""
        for index, uid in enumerate(self.uids):
            if not self.states[uid].flags & Flag.SEEN:
                return index + 1
        return None

    def live(self, uid: int) -> bool:
        return uid in self.states and uid not in self.pending_expunges

    # Changes ------------------------------------------------------------------

    def record_own_changes(self, states: Iterable[MessageState]) -> bool:
        """Take in flag changes this session made itself; return True if a keyword is new."""
        learned = False
        for state in states:
            if state.uid in self.states:
                self.states[state.uid] = state
            learned |= self._learn_keywords(state.keywords)
        return learned

    def remove_own_expunges(self, uids: Iterable[int]) -> list[int]:
        """Drop UIDs this session expunged; return the sequence numbers to announce, in order."""
        return self._remove(sorted(set(uids)))

    def _remove(self, uids: list[int]) -> list[int]:
        sequence_numbers = []
        # Highest first, so each sequence number is still valid when its EXPUNGE is sent
        # and the numbers of messages before it do not move.
        for uid in reversed(uids):
            sequence_number = self.sequence_of(uid)
            if sequence_number is None:
                continue
            del self.uids[sequence_number - 1]
            self.states.pop(uid, None)
            self.pending_expunges.discard(uid)
            sequence_numbers.append(sequence_number)
        return sequence_numbers

    def apply(self, changes: MailboxChanges, *, allow_expunge: bool) -> Update:
        """Merge store changes into the view and return the responses that announce them."""
        update = Update()
        for uid in changes.expunged:
            if uid in self.states:
                self.pending_expunges.add(uid)
        if allow_expunge and self.pending_expunges:
            update.expunged = self._remove(sorted(self.pending_expunges))

        before = len(self.uids)
        highest_known = self.uids[-1] if self.uids else 0
        expunged = set(changes.expunged)
        for state in changes.changed:
            if state.uid in expunged:
                continue
            known = self.states.get(state.uid)
            if known is None:
                if state.uid <= highest_known:
                    # Expunged and announced already, then reported again: skip it.
                    continue
                self.uids.append(state.uid)
                highest_known = state.uid
                self.states[state.uid] = state
                update.new_keywords |= self._learn_keywords(state.keywords)
                continue
            if state.uid in self.pending_expunges:
                continue
            if known.flags != state.flags or known.keywords != state.keywords:
                update.fetches.append((0, state))
            self.states[state.uid] = state
            update.new_keywords |= self._learn_keywords(state.keywords)
        if len(self.uids) != before:
            update.exists = len(self.uids)
        # Sequence numbers of flag changes are taken after expunges and new messages.
        update.fetches = [(self.sequence_of(state.uid) or 0, state) for _zero, state in update.fetches]
        self.modseq = max(self.modseq, changes.highestmodseq)
        self.uidnext = max(self.uidnext, changes.uidnext)
        return update
