"""Small parts of the IMAP server on their own: login throttle, mailbox view, LIST patterns, SASL PLAIN."""

from __future__ import annotations

import itertools
import re

import pytest

from mailstack.imap import response as r
from mailstack.imap.session import mailbox_pattern, parse_plain, uid_set_text
from mailstack.imap.throttle import LoginThrottle
from mailstack.imap.view import MailboxView, encoded_flags, split_flags
from mailstack.store.messages import MailboxChanges, MessageState
from mailstack.store.models import Flag


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_locks_and_expires():
    clock = FakeClock()
    throttle = LoginThrottle(limit=3, window=60, delay=1.0, clock=clock)
    delays = [throttle.record_failure("192.0.2.1", "bob@here.test") for _ in range(3)]
    assert delays == [1.0, 2.0, 4.0]
    assert throttle.is_locked("192.0.2.1")
    assert throttle.is_locked("198.51.100.7", "BOB@here.test")
    assert not throttle.is_locked("198.51.100.7", "carol@here.test")
    clock.now += 61
    assert not throttle.is_locked("192.0.2.1", "bob@here.test")


def test_throttle_delay_capped_at_eight_times():
    throttle = LoginThrottle(limit=100, window=60, delay=0.5, clock=FakeClock())
    delays = [throttle.record_failure("192.0.2.1") for _ in range(6)]
    assert delays[-1] == 4.0


def test_throttle_success_clears_account_only():
    throttle = LoginThrottle(limit=2, window=60, delay=0, clock=FakeClock())
    throttle.record_failure("192.0.2.1", "bob@here.test")
    throttle.record_failure("192.0.2.1", "bob@here.test")
    throttle.record_success("192.0.2.1", "bob@here.test")
    assert not throttle.is_locked("198.51.100.7", "bob@here.test")
    assert throttle.is_locked("192.0.2.1")


def state(uid: int, modseq: int = 1, flags: int = 0, keywords: tuple[str, ...] = ()) -> MessageState:
    return MessageState(uid, modseq, flags, keywords)


def make_view(uids: list[int]) -> MailboxView:
    return MailboxView(1, "INBOX", 7, max(uids, default=0) + 1, 10, [state(u) for u in uids], read_only=False)


def test_view_holds_expunge_until_allowed():
    view = make_view([1, 2, 3, 4])
    held = view.apply(MailboxChanges(11, 5, [], [2]), allow_expunge=False)
    assert held.expunged == []
    assert view.exists == 4
    assert not view.live(2)
    released = view.apply(MailboxChanges(11, 5, [], []), allow_expunge=True)
    assert released.expunged == [2]
    assert view.uids == [1, 3, 4]


def test_view_expunge_numbers_valid_when_sent():
    view = make_view([1, 2, 3, 4, 5])
    update = view.apply(MailboxChanges(11, 6, [], [2, 4]), allow_expunge=True)
    # Highest first: removing 4 does not move 2.
    assert update.expunged == [4, 2]
    assert view.uids == [1, 3, 5]


def test_view_new_messages_and_flag_changes():
    view = make_view([1, 2])
    changes = MailboxChanges(
        12,
        5,
        [state(2, 12, int(Flag.SEEN)), state(3, 11), state(4, 12, keywords=("$Work",))],
        [1],
    )
    update = view.apply(changes, allow_expunge=True)
    assert update.expunged == [1]
    assert update.exists == 3
    assert update.fetches == [(1, state(2, 12, int(Flag.SEEN)))]
    assert update.new_keywords
    assert view.sequence_of(4) == 3
    assert view.modseq == 12


def test_view_ignores_repeated_and_own_changes():
    view = make_view([1, 2])
    view.record_own_changes([state(1, 11, int(Flag.FLAGGED))])
    update = view.apply(MailboxChanges(11, 3, [state(1, 11, int(Flag.FLAGGED))], []), allow_expunge=True)
    assert not update


def test_split_flags_drops_recent():
    assert split_flags(["\\Seen", "\\RECENT", "$Junk", "\\Deleted"]) == (int(Flag.SEEN | Flag.DELETED), ["$Junk"])


def test_encoded_flags_order():
    assert encoded_flags(int(Flag.SEEN | Flag.ANSWERED), ("$Work",)) == b"FLAGS (\\Seen \\Answered $Work)"


@pytest.mark.parametrize(
    ("reference", "pattern", "name", "matches"),
    [
        ("", "*", "Projects/2026", True),
        ("", "%", "Projects/2026", False),
        ("", "%", "Projects", True),
        ("", "Projects/%", "Projects/2026", True),
        ("Projects/", "%", "Projects/2026", True),
        ("Projects/", "/%", "Projects/2026", True),
        ("", "inbox", "INBOX", True),
        ("", "Inbox/*", "INBOX/Sub", True),
        ("", "sent", "Sent", False),
        ("", "a.b", "axb", False),
        ("", "", "", True),
        ("", "", "a", False),
        ("", "*", "", True),
        ("", "%", "", True),
        ("", "Projects", "Projects/2026", False),
        ("", "Projects*", "Projects/2026/Q1", True),
        ("", "Projects%", "Projects/2026", False),
        ("", "Projects/%/Q1", "Projects/2026/Q1", True),
        ("", "Projects/%/Q1", "Projects/2026/x/Q1", False),
        ("", "Projects/*/Q1", "Projects/2026/x/Q1", True),
        ("", "%/%", "a/b", True),
        ("", "%/%", "a/b/c", False),
        ("", "%%%", "a/b", False),
        ("", "%*%", "a/b", True),
        ("", "*%*%", "a/b/c", True),
        ("", "%a%", "bab", True),
        ("", "%a%", "b/ab", False),
        ("", "*a", "bab", False),
        ("", "*b", "bab", True),
        ("", "INBOX*", "INBOX", True),
        ("", "inBoX/%", "INBOX/Sub", True),
        ("", "INBOX", "Inbox", True),
        ("", "inbox/sub", "INBOX/Sub", False),
        ("", "%nbox", "INBOX", False),
        ("IN", "BOX", "inbox", True),
        ("", "Projects/", "Projects", False),
        ("", "x" * 1001, "x" * 1000, False),
    ],
)
def test_mailbox_pattern(reference, pattern, name, matches):
    assert mailbox_pattern(reference, pattern).match(name) is matches


def backtracking_pattern(reference: str, pattern: str) -> re.Pattern[str]:
    """The regular-expression form of a LIST pattern, a reference for short inputs only."""
    if reference.endswith("/") and pattern.startswith("/"):
        pattern = pattern[1:]
    full = reference + pattern
    parts = []
    for char in full:
        if char == "*":
            parts.append(".*")
        elif char == "%":
            parts.append("[^/]*")
        else:
            parts.append(re.escape(char))
    if full[:5].upper() == "INBOX":
        parts[:5] = ["(?i:INBOX)"]
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


def test_mailbox_pattern_agrees_with_regex():
    """Every pattern up to 4 characters over {a, /, *, %} against every name up to 4 over {a, b, /}."""
    patterns = ["".join(p) for size in range(5) for p in itertools.product("a/*%", repeat=size)]
    names = ["".join(n) for size in range(5) for n in itertools.product("ab/", repeat=size)]
    for pattern in patterns:
        compiled = mailbox_pattern("", pattern)
        expected = backtracking_pattern("", pattern)
        for name in names:
            assert compiled.match(name) is bool(expected.match(name)), (pattern, name)


def test_mailbox_pattern_long_name_with_many_wildcards():
    name = "x" * 1000
    assert mailbox_pattern("", "%*" * 500 + "!").match(name) is False
    assert mailbox_pattern("", "%*" * 500 + "x").match(name) is True
    assert mailbox_pattern("", "*x" * 1000).match(name) is True
    assert mailbox_pattern("", "*x" * 1001).match(name) is False


def test_uid_set_text_keeps_order():
    assert uid_set_text([1, 2, 3, 7, 9, 10]) == "1:3,7,9:10"
    assert uid_set_text([]) == ""


def test_parse_plain():
    assert parse_plain(b"\0bob@here.test\0secret") == ("bob@here.test", "secret")
    assert parse_plain(b"bob@here.test\0bob@here.test\0secret") == ("bob@here.test", "secret")
    with pytest.raises(r.AuthorizationFailed):
        parse_plain(b"carol@here.test\0bob@here.test\0secret")
    with pytest.raises(r.BadCommand):
        parse_plain(b"no separators")
    with pytest.raises(r.BadCommand):
        parse_plain(b"\0\xff\0secret")


def test_view_sequences_of_skips_unknown():
    view = make_view([3, 5, 8, 13])
    assert view.sequences_of([3, 4, 8, 13, 20]) == [1, 3, 4]
    assert view.sequences_of([]) == []
