"""IMAP value encoding, error replies, sequence sets and modified UTF-7."""

from __future__ import annotations

import datetime
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.imap import response as r
from mailstack.imap import utf7
from mailstack.imap.commands import FetchAttribute, FetchItem, Section, SectionSpecifier
from mailstack.imap.parser import parse_command
from mailstack.imap.sequence import InvalidSequenceSet, SequenceOutOfRange, SequenceSet

# --- values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        ("hello", b'"hello"'),
        ('say "hi"', b'"say \\"hi\\""'),
        ("back\\slash", b'"back\\\\slash"'),
        ("", b'""'),
        ("line\r\nbreak", b"{11}\r\nline\r\nbreak"),
        ("caf\u00e9", b"{5}\r\ncaf\xc3\xa9"),
        (b"nul\x00", b"{4}\r\nnul\x00"),
    ],
)
def test_string_picks_quoted_or_literal(value: str | bytes, expected: bytes) -> None:
    assert r.string(value) == expected


def test_long_string_is_literal() -> None:
    assert r.string("x" * 2000).startswith(b"{2000}\r\n")


def test_quoted_rejects_what_needs_literal() -> None:
    with pytest.raises(ValueError):
        r.quoted("a\nb")


@pytest.mark.parametrize(
    "value,expected",
    [("INBOX", b"INBOX"), ("a]b", b"a]b"), ("two words", b'"two words"'), ("", b'""'), ("nil", b'"nil"'), ("50%", b'"50%"')],
)
def test_astring(value: str, expected: bytes) -> None:
    assert r.astring(value) == expected


def test_atom_validation() -> None:
    assert r.atom("FLAGS") == b"FLAGS"
    for bad in ("", "a b", "a(", "x]"):
        with pytest.raises(ValueError):
            r.atom(bad)


def test_nstring_and_numbers() -> None:
    assert r.nstring(None) == b"NIL"
    assert r.nstring("x") == b'"x"'
    assert r.number(4294967295) == b"4294967295"


def test_flag_list() -> None:
    assert r.flag_list([]) == b"()"
    assert r.flag_list(["\\Seen", "$Label1"]) == b"(\\Seen $Label1)"
    assert r.flag_list(["\\*"]) == b"(\\*)"
    for bad in ("two words", "\\", "a)b"):
        with pytest.raises(ValueError):
            r.flag_list([bad])


def test_mailbox_names_are_modified_utf7() -> None:
    assert r.mailbox("INBOX") == b"INBOX"
    assert r.mailbox("Entw\u00fcrfe") == b"Entw&APw-rfe"
    assert r.mailbox("Tom & Jerry") == b'"Tom &- Jerry"'
    assert r.mailbox("") == b'""'


def test_date_time() -> None:
    zone = datetime.timezone(datetime.timedelta(hours=-5, minutes=-30))
    assert r.date_time(datetime.datetime(2024, 3, 7, 8, 9, 10, tzinfo=zone)) == b'"07-Mar-2024 08:09:10 -0530"'
    assert r.date_time(datetime.datetime(2024, 12, 25, 23, 0, 0)) == b'"25-Dec-2024 23:00:00 +0000"'


def test_date_time_round_trips_through_append() -> None:
    value = datetime.datetime(2023, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=9)))
    command = parse_command(b"a APPEND INBOX " + r.date_time(value) + b" {1}\r\nx")
    assert command.internal_date == value


def test_encode_nested() -> None:
    value = [None, 5, "text", b"raw", r.Atom(b"\\Seen"), ("x", [None])]
    assert r.encode(value) == b'(NIL 5 "text" "raw" \\Seen ("x" (NIL)))'
    with pytest.raises(TypeError):
        r.encode(True)
    with pytest.raises(TypeError):
        r.encode(1.5)


# --- responses --------------------------------------------------------------------------


def test_status_lines() -> None:
    assert r.tagged("a1", b"OK", "SELECT completed", b"READ-WRITE") == b"a1 OK [READ-WRITE] SELECT completed\r\n"
    assert r.untagged(b"3 EXISTS") == b"* 3 EXISTS\r\n"
    assert r.untagged_status(b"OK", "ready", b"UIDVALIDITY 7") == b"* OK [UIDVALIDITY 7] ready\r\n"
    assert r.continuation() == b"+ \r\n"
    assert r.continuation("idling") == b"+ idling\r\n"


def test_status_text_cannot_break_framing() -> None:
    line = r.tagged("a", b"NO", "bad\r\n* 1 EXISTS\x00 caf\u00e9")
    assert line.count(b"\r\n") == 1
    assert line.endswith(b"\r\n")
    assert b"\x00" not in line
    assert line == b"a NO bad  * 1 EXISTS  caf?\r\n"


def test_fetch_response() -> None:
    items = [b"UID 7", b"FLAGS " + r.flag_list(["\\Seen"])]
    assert r.fetch_response(3, items) == b"* 3 FETCH (UID 7 FLAGS (\\Seen))\r\n"


def test_fetch_flags_10000_is_fast() -> None:
    # Encoding the FETCH FLAGS reply for 10,000 messages must stay in tens of
    # milliseconds; this bound is loose (10x) so that slow CI machines pass.
    flags = [("\\Seen",), ("\\Seen", "\\Flagged"), (), ("$Label1",)]
    start = time.perf_counter()
    data = b"".join(
        r.fetch_response(number, (b"UID %d" % number, b"FLAGS " + r.flag_list(flags[number % 4])))
        for number in range(1, 10001)
    )
    elapsed = time.perf_counter() - start
    assert data.count(b"\r\n") == 10000
    assert elapsed < 0.5


def test_response_names_of_fetch_attributes() -> None:
    assert FetchAttribute(FetchItem.RFC822_SIZE).response_name == b"RFC822.SIZE"
    peek = FetchAttribute(FetchItem.BODY, Section((1, 2), SectionSpecifier.HEADER_FIELDS, ("FROM", "TO")), True, (0, 100))
    assert peek.response_name == b"BODY[1.2.HEADER.FIELDS (FROM TO)]<0>"
    assert not peek.sets_seen
    assert FetchAttribute(FetchItem.BODY, Section()).sets_seen
    assert FetchAttribute(FetchItem.BODY, Section()).response_name == b"BODY[]"
    assert FetchAttribute(FetchItem.RFC822).sets_seen
    assert FetchAttribute(FetchItem.RFC822_TEXT).sets_seen
    assert not FetchAttribute(FetchItem.RFC822_HEADER).sets_seen
    assert not FetchAttribute(FetchItem.BODY).sets_seen
    assert FetchAttribute(FetchItem.BODY, Section((3,), SectionSpecifier.MIME)).response_name == b"BODY[3.MIME]"
    odd = FetchAttribute(FetchItem.BODY, Section((), SectionSpecifier.HEADER_FIELDS, ("X(A)", 'B"C', "D")))
    assert odd.response_name == b'BODY[HEADER.FIELDS ("X(A)" "B\\"C" D)]'
    assert parse_command(b"t FETCH 1 " + odd.response_name).attributes == (odd,)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error,expected",
    [
        (r.Nonexistent("no such mailbox"), b"t NO [NONEXISTENT] no such mailbox\r\n"),
        (r.AlreadyExists("mailbox exists"), b"t NO [ALREADYEXISTS] mailbox exists\r\n"),
        (r.Cannot("cannot append to Outbox"), b"t NO [CANNOT] cannot append to Outbox\r\n"),
        (r.TryCreate("no such mailbox"), b"t NO [TRYCREATE] no such mailbox\r\n"),
        (r.AuthenticationFailed("invalid credentials"), b"t NO [AUTHENTICATIONFAILED] invalid credentials\r\n"),
        (r.TooBig("message too large"), b"t NO [TOOBIG] message too large\r\n"),
        (r.PrivacyRequired("use TLS"), b"t NO [PRIVACYREQUIRED] use TLS\r\n"),
        (r.ReadOnly("mailbox is read-only"), b"t NO [READ-ONLY] mailbox is read-only\r\n"),
        (r.ExpungeIssued("some messages were expunged"), b"t NO [EXPUNGEISSUED] some messages were expunged\r\n"),
        (r.Limit("too many"), b"t NO [LIMIT] too many\r\n"),
        (r.Expired("password expired"), b"t NO [EXPIRED] password expired\r\n"),
        (r.HasChildren("has children"), b"t NO [HASCHILDREN] has children\r\n"),
        (r.InUse("busy"), b"t NO [INUSE] busy\r\n"),
        (r.NoPerm("denied"), b"t NO [NOPERM] denied\r\n"),
        (r.Corruption("damaged"), b"t NO [CORRUPTION] damaged\r\n"),
        (r.ContactAdmin("ask"), b"t NO [CONTACTADMIN] ask\r\n"),
        (r.AuthorizationFailed("no"), b"t NO [AUTHORIZATIONFAILED] no\r\n"),
        (r.OverQuota("quota"), b"t NO [OVERQUOTA] quota\r\n"),
        (r.Unavailable("try later"), b"t NO [UNAVAILABLE] try later\r\n"),
        (r.ServerBug("4f2a"), b"t NO [SERVERBUG] internal server error, id 4f2a\r\n"),
        (r.BadCharset("unsupported"), b"t NO [BADCHARSET (UTF-8 US-ASCII)] unsupported\r\n"),
        (r.BadCommand("syntax error"), b"t BAD syntax error\r\n"),
        (r.ClientBug("no such message"), b"t BAD [CLIENTBUG] no such message\r\n"),
        (r.CommandFailed("failed", code=b"NOPERM"), b"t NO [NOPERM] failed\r\n"),
    ],
)
def test_error_rendering(error: r.ImapError, expected: bytes) -> None:
    assert error.render("t") == expected


def test_error_tag_sources() -> None:
    error = r.BadCommand("oops", tag="x1")
    assert error.render() == b"x1 BAD oops\r\n"
    assert error.render("y2") == b"y2 BAD oops\r\n"
    assert r.BadCommand("oops").render() == b"* BAD oops\r\n"
    assert r.Bye("autologout", code=b"UNAVAILABLE").render("t") == b"* BYE [UNAVAILABLE] autologout\r\n"


# --- sequence sets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,count,expected",
    [
        ("1", 5, [1]),
        ("1:3", 5, [1, 2, 3]),
        ("3:1", 5, [1, 2, 3]),
        ("*", 5, [5]),
        ("2:*", 5, [2, 3, 4, 5]),
        ("*:4", 5, [4, 5]),
        ("1,3,2:3,5", 5, [1, 2, 3, 5]),
        ("1:*", 1, [1]),
    ],
)
def test_sequence_resolution(text: str, count: int, expected: list[int]) -> None:
    assert SequenceSet.parse(text).resolve(count) == expected


@pytest.mark.parametrize("text,count", [("6", 5), ("1:6", 5), ("4,9", 5), ("1", 0), ("*", 0)])
def test_sequence_above_count_is_bad(text: str, count: int) -> None:
    with pytest.raises(SequenceOutOfRange) as info:
        SequenceSet.parse(text).resolve(count)
    assert info.value.render("t").startswith(b"t BAD ")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1:*", [3, 7, 20]),
        ("*", [20]),
        ("500:*", [20]),
        ("4:10", [7]),
        ("10:4", [7]),
        ("1,2,4:6", []),
        ("3,20", [3, 20]),
        ("8:19,3", [3]),
    ],
)
def test_uid_resolution(text: str, expected: list[int]) -> None:
    uids = [3, 7, 20]
    assert SequenceSet.parse(text).resolve_uids(uids) == expected
    assert [uids[index] for index in SequenceSet.parse(text).uid_positions(uids)] == expected


def test_uid_resolution_empty_mailbox() -> None:
    assert SequenceSet.parse("1:*").resolve_uids([]) == []


@pytest.mark.parametrize("text", ["", "0", "1:0", "a", "1,,2", "1:2:3", "4294967296", "1 ", "-1", "\u0661"])
def test_invalid_sequence_sets(text: str) -> None:
    with pytest.raises(InvalidSequenceSet):
        SequenceSet.parse(text)


def test_sequence_set_of_and_contains() -> None:
    assert str(SequenceSet.of([7, 1, 2, 3, 9, 10])) == "1:3,7,9:10"
    assert SequenceSet.parse("2:*").contains(9, star=9)
    assert not SequenceSet.parse("2:4").contains(5, star=9)
    with pytest.raises(ValueError):
        SequenceSet.of([])


def test_large_range_resolution_is_fast() -> None:
    uids = list(range(1, 20001, 2))
    start = time.perf_counter()
    assert len(SequenceSet.parse("1:*").resolve_uids(uids)) == 10000
    assert len(SequenceSet.parse("1:*").resolve(10000)) == 10000
    assert time.perf_counter() - start < 0.2


def test_repeated_ranges_are_cheap() -> None:
    # 16,000 copies of "1:*" fit in one 64 KiB command line.
    sequence_set = SequenceSet.parse(",".join(["1:*"] * 16000))
    start = time.perf_counter()
    assert sequence_set.resolve(10000) == list(range(1, 10001))
    assert len(sequence_set.resolve_uids(list(range(1, 10001)))) == 10000
    assert time.perf_counter() - start < 0.5


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 70),
    ranges=st.lists(st.tuples(st.integers(1, 60), st.one_of(st.none(), st.integers(1, 60))), min_size=1, max_size=5),
)
def test_resolution_matches_brute_force(count: int, ranges: list[tuple[int, int | None]]) -> None:
    sequence_set = SequenceSet(tuple(ranges))
    bounds = [(min(a, count if b is None else b), max(a, count if b is None else b)) for a, b in ranges]
    if max(high for _, high in bounds) > count:
        with pytest.raises(SequenceOutOfRange):
            sequence_set.resolve(count)
        return
    expected = [n for n in range(1, count + 1) if any(low <= n <= high for low, high in bounds)]
    assert sequence_set.resolve(count) == expected


@settings(max_examples=300, deadline=None)
@given(
    ranges=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=1, max_size=5),
    uids=st.lists(st.integers(1, 80), unique=True, max_size=30).map(sorted),
)
def test_uid_resolution_matches_brute_force(ranges: list[tuple[int, int]], uids: list[int]) -> None:
    sequence_set = SequenceSet(tuple(ranges))
    expected = [uid for uid in uids if any(min(a, b) <= uid <= max(a, b) for a, b in ranges)]
    assert sequence_set.resolve_uids(uids) == expected


# --- modified UTF-7 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,encoded",
    [
        ("INBOX", "INBOX"),
        ("&", "&-"),
        ("Tom & Jerry", "Tom &- Jerry"),
        ("Entw\u00fcrfe", "Entw&APw-rfe"),
        ("~peter/mail/\u53f0\u5317/\u65e5\u672c\u8a9e", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("\U0001f600", "&2D3eAA-"),
        ("a\tb", "a&AAk-b"),
    ],
)
def test_utf7_vectors(text: str, encoded: str) -> None:
    assert utf7.encode(text) == encoded
    assert utf7.decode(encoded) == text
    assert utf7.decode(encoded.encode("ascii")) == text


@pytest.mark.parametrize(
    "encoded",
    [
        "&",  # unterminated
        "&Jjo",  # unterminated
        "&AGE-",  # "a" encoded although it stands for itself
        "&APw",  # unterminated
        "&APx-",  # non-zero padding bits
        "&A-",  # one base64 character
        "&AP-",  # odd number of bytes
        "&2D0-",  # unpaired surrogate
        "&AP/-",  # "/" is not modified base64
        "caf\u00e9",  # 8-bit character
        "tab\there",  # control character
    ],
)
def test_utf7_rejects_invalid(encoded: str) -> None:
    with pytest.raises(utf7.InvalidModifiedUTF7):
        utf7.decode(encoded)


def test_utf7_rejects_8bit_bytes() -> None:
    with pytest.raises(ValueError):
        utf7.decode(b"caf\xc3\xa9")


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40))
def test_utf7_round_trip(text: str) -> None:
    encoded = utf7.encode(text)
    assert encoded.isascii()
    assert all(" " <= char <= "~" for char in encoded)
    assert utf7.decode(encoded) == text
