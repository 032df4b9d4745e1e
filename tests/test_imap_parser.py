"""The sans-IO IMAP command parser: golden tables, framing, limits and round trips."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_imap_parser import SEEDS, fuzz_mime, fuzz_parser, spliced_seeds
from mailstack.imap import commands as c
from mailstack.imap.parser import (
    NEED_DATA,
    AuthenticationCancelled,
    ContinuationLine,
    LineTooLong,
    LiteralRequest,
    NestingTooDeep,
    ParseError,
    Parser,
    UnknownCommand,
    decode_sasl_response,
    parse_command,
)
from mailstack.imap.response import BadCharset, ImapError
from mailstack.imap.sequence import SequenceSet

S = SequenceSet.parse
F = c.FetchAttribute
I = c.FetchItem  # noqa: E741

GOLDEN: list[tuple[bytes, c.Command]] = [
    (b"a1 CAPABILITY", c.Capability("a1")),
    (b"a1 capability", c.Capability("a1")),
    (b"A.2 NOOP", c.Noop("A.2")),
    (b"x LOGOUT", c.Logout("x")),
    (b"x STARTTLS", c.StartTLS("x")),
    (b"x CHECK", c.Check("x")),
    (b"x CLOSE", c.Close("x")),
    (b"x UNSELECT", c.Unselect("x")),
    (b"x IDLE", c.Idle("x")),
    (b"x NAMESPACE", c.Namespace("x")),
    (b"t LOGIN alice secret", c.Login("t", "alice", "secret")),
    (b't LOGIN "alice@here.test" "p\\"w\\\\d"', c.Login("t", "alice@here.test", 'p"w\\d')),
    (b"t LOGIN {5}\r\nalice {3+}\r\nx y", c.Login("t", "alice", "x y")),
    # imaplib sends UTF-8 unquoted; atoms are 7-bit in RFC 3501, but this is accepted.
    (b"t LOGIN j\xc3\xb6rg p\xc3\xa4ss", c.Login("t", "j\u00f6rg", "p\u00e4ss")),
    (
        b"t UID SEARCH CHARSET UTF-8 BODY Gr\xc3\xbc\xc3\x9fe",
        c.Search("t", c.SearchText("Gr\u00fc\u00dfe"), charset="UTF-8", uid=True),
    ),
    (b"t AUTHENTICATE PLAIN", c.Authenticate("t", "PLAIN")),
    (b"t AUTHENTICATE plain AGFsaWNlAHNlY3JldA==", c.Authenticate("t", "PLAIN", b"\x00alice\x00secret")),
    (b"t AUTHENTICATE PLAIN =", c.Authenticate("t", "PLAIN", b"")),
    (b"t SELECT INBOX", c.Select("t", "INBOX")),
    (b"t SELECT inbox", c.Select("t", "INBOX")),
    (b'select "InBox"', None),  # no tag: a command name is not a tag followed by a space
    (b"t SELECT Inbox (CONDSTORE)", c.Select("t", "INBOX", condstore=True)),
    (b"t EXAMINE Sent", c.Examine("t", "Sent")),
    (b'tag SELECT "Entw&APw-rfe"', c.Select("tag", "Entw\u00fcrfe")),
    (b"t CREATE Archive/2024", c.Create("t", "Archive/2024")),
    (b"t CREATE Spam (USE (\\Junk))", c.Create("t", "Spam", ("\\Junk",))),
    (b"t DELETE Archive", c.Delete("t", "Archive")),
    (b"t RENAME INBOX Old", c.Rename("t", "INBOX", "Old")),
    (b'r RENAME "a b" "c&-d"', c.Rename("r", "a b", "c&d")),
    (b"t SUBSCRIBE Drafts", c.Subscribe("t", "Drafts")),
    (b"t UNSUBSCRIBE Drafts", c.Unsubscribe("t", "Drafts")),
    (b'l LIST "" *', c.List("l", "", ("*",))),
    (b'l LIST "" %/%', c.List("l", "", ("%/%",))),
    (b"l LIST Archive/ 20%", c.List("l", "Archive/", ("20%",))),
    (
        b'l LIST (SPECIAL-USE) "" "*" RETURN (CHILDREN)',
        c.List("l", "", ("*",), ("SPECIAL-USE",), ("CHILDREN",)),
    ),
    (b'l LIST "" (INBOX Sent)', c.List("l", "", ("INBOX", "Sent"))),
    (b'l LSUB "" *', c.Lsub("l", "", "*")),
    (
        b"s STATUS INBOX (MESSAGES UIDNEXT unseen)",
        c.Status("s", "INBOX", (c.StatusItem.MESSAGES, c.StatusItem.UIDNEXT, c.StatusItem.UNSEEN)),
    ),
    (b"a APPEND INBOX {5}\r\nhello", c.Append("a", "INBOX", b"hello")),
    (b"a APPEND INBOX {5+}\r\nhello", c.Append("a", "INBOX", b"hello")),
    (
        b'a APPEND Drafts (\\Seen \\draft $Label) " 4-Jul-2024 09:05:01 -0130" {3}\r\nx\r\n',
        c.Append(
            "a",
            "Drafts",
            b"x\r\n",
            ("\\Seen", "\\Draft", "$Label"),
            datetime.datetime(2024, 7, 4, 9, 5, 1, tzinfo=datetime.timezone(-datetime.timedelta(hours=1, minutes=30))),
        ),
    ),
    (b"a APPEND INBOX () {0}\r\n", c.Append("a", "INBOX", b"")),
    (b"e EXPUNGE", c.Expunge("e")),
    (b"e UID EXPUNGE 3:5,9", c.Expunge("e", S("3:5,9"))),
    (b"k COPY 1:3 Trash", c.Copy("k", S("1:3"), "Trash")),
    (b"k UID COPY 7 Trash", c.Copy("k", S("7"), "Trash", uid=True)),
    (b"m MOVE 2,4:* Trash", c.Move("m", S("2,4:*"), "Trash")),
    (b"m uid move *:3 Junk", c.Move("m", S("*:3"), "Junk", uid=True)),
    (
        b"s STORE 1:* +FLAGS (\\Seen)",
        c.Store("s", S("1:*"), c.StoreAction.ADD, ("\\Seen",)),
    ),
    (
        b"s STORE 1 -FLAGS.SILENT \\Deleted \\seen",
        c.Store("s", S("1"), c.StoreAction.REMOVE, ("\\Deleted", "\\Seen"), silent=True),
    ),
    (
        b"s UID STORE 5 FLAGS ()",
        c.Store("s", S("5"), c.StoreAction.REPLACE, (), uid=True),
    ),
    (
        b"s STORE 5 (UNCHANGEDSINCE 12) +FLAGS ($Forwarded)",
        c.Store("s", S("5"), c.StoreAction.ADD, ("$Forwarded",), unchanged_since=12),
    ),
    (b"f FETCH 1 FLAGS", c.Fetch("f", S("1"), (F(I.FLAGS),))),
    (
        b"f FETCH 1:* ALL",
        c.Fetch("f", S("1:*"), (F(I.FLAGS), F(I.INTERNALDATE), F(I.RFC822_SIZE), F(I.ENVELOPE))),
    ),
    (b"f FETCH 1 FAST", c.Fetch("f", S("1"), (F(I.FLAGS), F(I.INTERNALDATE), F(I.RFC822_SIZE)))),
    (
        b"f FETCH 1 full",
        c.Fetch("f", S("1"), (F(I.FLAGS), F(I.INTERNALDATE), F(I.RFC822_SIZE), F(I.ENVELOPE), F(I.BODY))),
    ),
    (
        b"f UID FETCH 1:* (FLAGS UID RFC822.SIZE BODYSTRUCTURE)",
        c.Fetch("f", S("1:*"), (F(I.FLAGS), F(I.UID), F(I.RFC822_SIZE), F(I.BODYSTRUCTURE)), uid=True),
    ),
    (b"f FETCH 2 BODY[]", c.Fetch("f", S("2"), (F(I.BODY, c.Section()),))),
    (b"f FETCH 2 BODY.PEEK[]<10.20>", c.Fetch("f", S("2"), (F(I.BODY, c.Section(), True, (10, 20)),))),
    (
        b"f FETCH 2 (BODY.PEEK[HEADER.FIELDS (From Subject)] BODY[1.2.MIME] BODY[3.TEXT])",
        c.Fetch(
            "f",
            S("2"),
            (
                F(I.BODY, c.Section((), c.SectionSpecifier.HEADER_FIELDS, ("FROM", "SUBJECT")), True),
                F(I.BODY, c.Section((1, 2), c.SectionSpecifier.MIME)),
                F(I.BODY, c.Section((3,), c.SectionSpecifier.TEXT)),
            ),
        ),
    ),
    (
        b"f FETCH 2 BODY[HEADER.FIELDS.NOT (Received)]",
        c.Fetch("f", S("2"), (F(I.BODY, c.Section((), c.SectionSpecifier.HEADER_FIELDS_NOT, ("RECEIVED",))),)),
    ),
    (
        b"f FETCH 2 (RFC822 RFC822.HEADER RFC822.TEXT INTERNALDATE ENVELOPE)",
        c.Fetch("f", S("2"), (F(I.RFC822), F(I.RFC822_HEADER), F(I.RFC822_TEXT), F(I.INTERNALDATE), F(I.ENVELOPE))),
    ),
    (
        b"f FETCH 1:* (FLAGS) (CHANGEDSINCE 7)",
        c.Fetch("f", S("1:*"), (F(I.FLAGS),), changed_since=7),
    ),
    (b"q SEARCH ALL", c.Search("q", c.SearchAll())),
    (b"q SEARCH UNSEEN", c.Search("q", c.SearchFlag("\\Seen", False))),
    (
        b"q UID SEARCH CHARSET utf-8 FROM \"b\xc3\xb6b\" UNDELETED",
        c.Search(
            "q",
            c.SearchAnd((c.SearchHeader("FROM", "b\u00f6b"), c.SearchFlag("\\Deleted", False))),
            charset="UTF-8",
            uid=True,
        ),
    ),
    (
        b"q SEARCH OR SEEN (FLAGGED LARGER 100) NOT 2:4",
        c.Search(
            "q",
            c.SearchAnd(
                (
                    c.SearchOr(
                        c.SearchFlag("\\Seen"),
                        c.SearchAnd((c.SearchFlag("\\Flagged"), c.SearchSize(c.SizeRelation.LARGER, 100))),
                    ),
                    c.SearchNot(c.SearchSequenceSet(S("2:4"))),
                )
            ),
        ),
    ),
    (
        b'q SEARCH SINCE 1-Feb-2024 SENTBEFORE "15-mar-2024" ON 02-Jan-2023',
        c.Search(
            "q",
            c.SearchAnd(
                (
                    c.SearchDate(c.DateField.INTERNAL, c.DateRelation.SINCE, datetime.date(2024, 2, 1)),
                    c.SearchDate(c.DateField.SENT, c.DateRelation.BEFORE, datetime.date(2024, 3, 15)),
                    c.SearchDate(c.DateField.INTERNAL, c.DateRelation.ON, datetime.date(2023, 1, 2)),
                )
            ),
        ),
    ),
    (
        b'q SEARCH HEADER X-Spam "" KEYWORD $Junk UNKEYWORD work UID 10:* NEW OLD',
        c.Search(
            "q",
            c.SearchAnd(
                (
                    c.SearchHeader("X-SPAM", ""),
                    c.SearchFlag("$Junk", True),
                    c.SearchFlag("work", False),
                    c.SearchSequenceSet(S("10:*"), uid=True),
                    c.SearchAnd((c.SearchFlag("\\Recent"), c.SearchFlag("\\Seen", False))),
                    c.SearchFlag("\\Recent", False),
                )
            ),
        ),
    ),
    (
        b"q SEARCH BODY {5}\r\nhello TEXT world SMALLER 9 MODSEQ 4",
        c.Search(
            "q",
            c.SearchAnd(
                (
                    c.SearchText("hello"),
                    c.SearchText("world", include_headers=True),
                    c.SearchSize(c.SizeRelation.SMALLER, 9),
                    c.SearchModSeq(4),
                )
            ),
        ),
    ),
    (
        b'i ID ("name" "Thunderbird" "version" NIL)',
        c.Id("i", (("name", "Thunderbird"), ("version", None))),
    ),
    (b"i ID NIL", c.Id("i", None)),
    (b"i ID ()", c.Id("i", ())),
    (b"n ENABLE CONDSTORE utf8=accept", c.Enable("n", ("CONDSTORE", "UTF8=ACCEPT"))),
]


# Lines captured from the way common clients phrase their commands.
CLIENT_LINES = [
    b'1 uid fetch 1:* (FLAGS)',
    b'2 UID fetch 5 (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject Date Message-ID '
    b'Priority X-Priority References Newsgroups In-Reply-To Content-Type Reply-To)])',
    b'3 list (SUBSCRIBED) "" "*" RETURN (SPECIAL-USE)',
    b'4 STATUS "Sent" (UIDNEXT MESSAGES UNSEEN RECENT)',
    b'5 select "INBOX" (CONDSTORE)',
    b'6 ID ("name" "Thunderbird" "version" "115.6.0")',
    b'a0007 FETCH 1:10 (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[HEADER.FIELDS (DATE FROM SENDER SUBJECT '
    b'TO CC MESSAGE-ID REFERENCES CONTENT-TYPE CONTENT-DESCRIPTION IN-REPLY-TO REPLY-TO LINES LIST-POST X-LABEL)])',
    b'a0008 UID STORE 3 +FLAGS.SILENT (\\Deleted)',
    b'a0009 UID EXPUNGE 3',
    b'A10 UID MOVE 4:6 "[Gmail]/Trash"',
    b'A11 UID SEARCH 1:* NOT DELETED',
    b'A12 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)',
    b'A13 LSUB "" "*"',
    b'A14 EXAMINE "Entw&APw-rfe"',
    b'A15 SEARCH CHARSET UTF-8 SUBJECT {6}\r\nGr\xc3\xbc\xc3\x9f',
    b'A16 APPEND "Sent" (\\Seen) {3}\r\nx\r\n',
    b'A17 ENABLE UTF8=ACCEPT',
    b'A18 AUTHENTICATE PLAIN AGFsaWNlQGhlcmUudGVzdABzZWNyZXQ=',
    b'A19 FETCH 1 (BODY.PEEK[1.MIME] BODY.PEEK[1]<0.2048> BODYSTRUCTURE)',
    b'A20 SEARCH OR OR FROM a TO a CC a',
    b'A21 UID SEARCH SINCE 01-Jan-2024 UNSEEN',
    b'A22 CREATE "Archive/2024/Q1"',
]


@pytest.mark.parametrize("line", CLIENT_LINES, ids=lambda line: line.split(b" ")[0].decode())
def test_client_line_parses(line: bytes) -> None:
    parser = Parser()
    parser.feed(line + b"\r\n")
    events = run(parser)
    assert len(events) == 1
    assert isinstance(events[0], c.Command)
    assert events[0].tag == line.split(b" ")[0].decode()


def run(parser: Parser) -> list[object]:
    """Collect events until NEED_DATA, accepting every literal."""
    events: list[object] = []
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            return events
        if isinstance(event, LiteralRequest):
            parser.accept_literal()
            continue
        events.append(event)


@pytest.mark.parametrize("wire,expected", [case for case in GOLDEN if case[1] is not None], ids=lambda v: repr(v)[:40])
def test_golden_command(wire: bytes, expected: c.Command) -> None:
    parser = Parser()
    parser.feed(wire + b"\r\n")
    assert run(parser) == [expected]
    assert parser.buffered == 0


def test_golden_byte_by_byte() -> None:
    stream = b"".join(wire + b"\r\n" for wire, expected in GOLDEN if expected is not None)
    expected = [command for _, command in GOLDEN if command is not None]
    parser = Parser()
    events: list[object] = []
    for index in range(len(stream)):
        parser.feed(stream[index : index + 1])
        events += run(parser)
    assert events == expected


def test_golden_one_stream_with_bare_lf() -> None:
    # Only the line ends change: literal contents keep their CRLFs.
    stream = b"".join(wire.replace(b"}\r\n", b"}\n") + b"\n" for wire, expected in GOLDEN if expected is not None)
    parser = Parser()
    parser.feed(stream)
    assert run(parser) == [command for _, command in GOLDEN if command is not None]


@pytest.mark.parametrize(
    "wire,message",
    [
        (b"t", "space"),
        (b"t ", "keyword"),
        (b"t FROB", "unknown command"),
        (b"t UID NOOP", "not a command"),
        (b"t LOGIN alice", "space"),
        (b"t LOGIN alice secret extra", "unexpected"),
        (b"t SELECT", "space"),
        (b't SELECT "unterminated', "unterminated"),
        (b"t SELECT &Jjo", "mailbox name"),
        (b"t SELECT caf\xc3\xa9", "8-bit"),
        (b"t SELECT INBOX (QRESYNC)", "parameter"),
        (b"t FETCH 0 FLAGS", "must be 1"),
        (b"t FETCH 1: FLAGS", "sequence set"),
        (b"t FETCH 1 FLAGZ", "unknown FETCH item"),
        (b"t FETCH 1 BODY[MIME]", "part number"),
        (b"t FETCH 1 BODY[HEADER.FIELDS]", "space"),
        (b"t FETCH 1 BODY[1.FOO]", "invalid section"),
        (b"t FETCH 1 BODY[]<5.0>", "out of range"),
        (b"t FETCH 1 (FLAGS", "expected ')'"),
        (b"t STORE 1 FLAGS.LOUD (\\Seen)", "FLAGS"),
        (b"t STORE 1 +FLAGS (\\*)", "flag"),
        (b"t SEARCH", "space"),
        (b"t SEARCH FOO", "unknown search key"),
        (b"t SEARCH SINCE 31-Feb-2024", "invalid date"),
        (b"t SEARCH SINCE 1-Foo-2024", "invalid date"),
        (b"t SEARCH CHARSET US-ASCII BODY \"\xc3\xa9\"", "US-ASCII"),
        (b"t SEARCH BODY \"\xff\"", "UTF-8"),
        (b"t SEARCH (SEEN", "expected ')'"),
        (b"t STATUS INBOX ()", "at least one"),
        (b"t STATUS INBOX (BOGUS)", "unknown STATUS item"),
        (b"t APPEND INBOX \"hello\"", "date-time"),
        (b"t APPEND INBOX hello", "literal"),
        (b'a APPEND INBOX "32-Jan-2024 00:00:00 +0000" {1}\r\nx', "invalid date-time"),
        (b"t AUTHENTICATE PLAIN AGFs!", "unexpected"),
        (b"t AUTHENTICATE PLAIN A", "base64"),
        (b"t ENABLE", "at least one"),
        (b"t ID (\"a\")", "space"),
        (b"t LIST \"\" * RETURN", "space"),
        (b"t LIST \"\" * FOO ()", "RETURN"),
        (b"t NOOP now", "unexpected"),
    ],
)
def test_invalid_command_is_tagged_bad(wire: bytes, message: str) -> None:
    parser = Parser()
    parser.feed(wire + b"\r\n")
    with pytest.raises(ParseError) as info:
        run(parser)
    assert info.value.tag == "t" or info.value.tag == "a"
    assert message.lower() in info.value.text.lower()
    assert info.value.render().startswith(info.value.tag.encode() + b" BAD ")
    # The parser has dropped the bad command and reads the next one.
    parser.feed(b"n2 NOOP\r\n")
    assert run(parser) == [c.Noop("n2")]


def test_missing_tag_is_untagged_bad() -> None:
    parser = Parser()
    parser.feed(b"(bad\r\n")
    with pytest.raises(ParseError) as info:
        run(parser)
    assert info.value.tag is None
    assert info.value.render().startswith(b"* BAD ")


def test_unknown_command_class() -> None:
    with pytest.raises(UnknownCommand) as info:
        parse_command(b"z XYZZY")
    assert info.value.render() == b"z BAD unknown command XYZZY\r\n"


def test_bad_charset_is_no_with_code() -> None:
    parser = Parser()
    parser.feed(b"s SEARCH CHARSET KOI8-R TEXT x\r\n")
    with pytest.raises(BadCharset) as info:
        run(parser)
    assert info.value.render() == b"s NO [BADCHARSET (UTF-8 US-ASCII)] unsupported charset KOI8-R\r\n"


def test_empty_lines_are_ignored() -> None:
    parser = Parser()
    parser.feed(b"\r\n\r\na NOOP\r\n")
    assert run(parser) == [c.Noop("a")]


def test_password_not_in_repr() -> None:
    command = parse_command(b"a LOGIN alice hunter2")
    assert "hunter2" not in repr(command)
    auth = parse_command(b"a AUTHENTICATE PLAIN AGFsaWNlAGh1bnRlcjI=")
    assert "hunter2" not in repr(auth)


# --- literals ---------------------------------------------------------------------------


def test_literal_request_before_any_literal_byte() -> None:
    parser = Parser()
    parser.feed(b"a APPEND INBOX {11}\r\n")
    request = parser.next_event()
    assert request == LiteralRequest("a", "APPEND", 11, True)
    # Asking again returns the same request until a decision is made.
    assert parser.next_event() == request
    assert parser.pending_literal == request
    parser.accept_literal()
    assert parser.next_event() is NEED_DATA
    parser.feed(b"hello")
    assert parser.next_event() is NEED_DATA
    parser.feed(b" world\r\n")
    assert parser.next_event() == c.Append("a", "INBOX", b"hello world")


def test_literal_may_contain_crlf_and_braces() -> None:
    parser = Parser()
    parser.feed(b"a APPEND INBOX {15}\r\nline {3}\r\n\r\nend\r\n")
    assert run(parser) == [c.Append("a", "INBOX", b"line {3}\r\n\r\nend")]


def test_uid_command_literal_names_uid() -> None:
    parser = Parser()
    parser.feed(b"a UID SEARCH TEXT {3}\r\n")
    assert parser.next_event() == LiteralRequest("a", "UID", 3, True)


def test_reject_synchronizing_literal_resyncs() -> None:
    parser = Parser()
    parser.feed(b"a APPEND INBOX {99999999}\r\n")
    request = parser.next_event()
    assert isinstance(request, LiteralRequest) and request.synchronizing
    parser.reject_literal()
    # The client got our NO and sends the next command, not the literal.
    parser.feed(b"b NOOP\r\n")
    assert run(parser) == [c.Noop("b")]


def test_reject_non_synchronizing_literal_skips_data() -> None:
    parser = Parser()
    parser.feed(b"a APPEND INBOX {10+}\r\n0123456789")
    request = parser.next_event()
    assert request == LiteralRequest("a", "APPEND", 10, False)
    parser.reject_literal()
    parser.feed(b" more {4+}\r\nab\r\n tail\r\nb NOOP\r\n")
    assert run(parser) == [c.Noop("b")]


def test_reject_non_synchronizing_literal_byte_by_byte() -> None:
    parser = Parser()
    stream = b"a LOGIN {3+}\r\nabc {5+}\r\nx\r\nyz\r\nb NOOP\r\n"
    events: list[object] = []
    for index in range(len(stream)):
        parser.feed(stream[index : index + 1])
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, LiteralRequest):
                parser.reject_literal()
                continue
            events.append(event)
    assert events == [c.Noop("b")]


def test_rejected_command_long_tail_is_dropped_quietly() -> None:
    parser = Parser(max_line_length=100)
    parser.feed(b"a APPEND INBOX {3+}\r\n")
    parser.next_event()
    parser.reject_literal()
    # The literal, then an over-long rest of the rejected command: no second error.
    parser.feed(b"abc" + b"x" * 500)
    assert parser.next_event() is NEED_DATA
    parser.feed(b"y" * 500 + b"\r\nb NOOP\r\n")
    assert run(parser) == [c.Noop("b")]


def test_literal_of_unknown_command_rejected_early() -> None:
    parser = Parser()
    parser.feed(b"a FROB {100000000}\r\nb XYZ {5+}\r\nhello\r\n+ NOOP {3}\r\nc NOOP\r\n")
    with pytest.raises(UnknownCommand) as info:
        parser.next_event()
    assert info.value.render() == b"a BAD unknown command FROB\r\n"
    with pytest.raises(UnknownCommand) as info:
        parser.next_event()
    assert info.value.tag == "b"
    with pytest.raises(ParseError) as error:
        parser.next_event()
    assert error.value.tag is None
    assert run(parser) == [c.Noop("c")]


def test_literal_count_is_bounded() -> None:
    parser = Parser(max_literals=3)
    parser.feed(b"a SEARCH TEXT {1}\r\n")
    assert parser.next_event() == LiteralRequest("a", "SEARCH", 1, True, 0)
    parser.accept_literal()
    parser.feed(b"x TEXT {2}\r\n")
    assert parser.next_event() == LiteralRequest("a", "SEARCH", 2, True, 1)
    parser.accept_literal()
    parser.feed(b"yy TEXT {3}\r\n")
    assert parser.next_event() == LiteralRequest("a", "SEARCH", 3, True, 3)
    parser.accept_literal()
    parser.feed(b"zzz TEXT {4+}\r\nwwww\r\nb NOOP\r\n")
    with pytest.raises(ParseError) as info:
        parser.next_event()
    assert info.value.tag == "a"
    assert "too many literals" in info.value.text
    # The fourth literal was LITERAL+, so its bytes are skipped.
    assert run(parser) == [c.Noop("b")]


def test_append_takes_one_message_literal() -> None:
    parser = Parser()
    parser.feed(b"a APPEND {5}\r\n")
    parser.next_event()
    parser.accept_literal()
    parser.feed(b"INBOX {3}\r\n")
    parser.next_event()
    parser.accept_literal()
    parser.feed(b"abc {3}\r\n")
    with pytest.raises(ParseError) as info:
        parser.next_event()
    assert "MULTIAPPEND" in info.value.text
    parser.feed(b"b APPEND {5}\r\nINBOX {3}\r\nabc\r\n")
    assert run(parser) == [c.Append("b", "INBOX", b"abc")]


def test_decision_without_request_raises() -> None:
    parser = Parser()
    with pytest.raises(RuntimeError):
        parser.accept_literal()
    with pytest.raises(RuntimeError):
        parser.reject_literal()


def test_literal_in_partial_command_then_bad() -> None:
    parser = Parser()
    parser.feed(b"a LOGIN {5}\r\nalice\r\n")
    with pytest.raises(ParseError) as info:
        run(parser)
    assert info.value.tag == "a"


# --- limits -------------------------------------------------------------------------------


def test_line_too_long_without_newline() -> None:
    parser = Parser(max_line_length=1024)
    parser.feed(b"big SEARCH TEXT " + b"x" * 2000)
    with pytest.raises(LineTooLong) as info:
        parser.next_event()
    assert info.value.tag == "big"
    assert info.value.render().startswith(b"big BAD ")
    # The rest of the long line is skipped as it arrives; the next command parses.
    parser.feed(b"y" * 5000)
    assert parser.next_event() is NEED_DATA
    assert parser.buffered == 0
    parser.feed(b"zzz\r\nok NOOP\r\n")
    assert run(parser) == [c.Noop("ok")]


def test_line_too_long_with_newline() -> None:
    parser = Parser(max_line_length=100)
    parser.feed(b"t SEARCH TEXT " + b"x" * 95 + b"\r\nu NOOP\r\n")
    with pytest.raises(LineTooLong):
        parser.next_event()
    assert run(parser) == [c.Noop("u")]


def test_line_too_long_skips_its_non_synchronizing_literal() -> None:
    parser = Parser(max_line_length=100)
    parser.feed(b"t APPEND " + b"x" * 100 + b" {6+}\r\nu NOOP\r\nv NOOP\r\n")
    with pytest.raises(LineTooLong) as info:
        parser.next_event()
    assert info.value.tag == "t"
    # The six literal bytes look like a command but belong to the rejected one.
    assert run(parser) == [c.Noop("v")]


def test_text_across_literals_counts_toward_limit() -> None:
    parser = Parser(max_line_length=64)
    parser.feed(b"t LOGIN {1}\r\n")
    parser.next_event()
    parser.accept_literal()
    parser.feed(b"a " + b"p" * 80 + b"\r\n")
    with pytest.raises(LineTooLong) as info:
        run(parser)
    assert info.value.tag == "t"


def test_nesting_too_deep() -> None:
    parser = Parser(max_nesting=8)
    parser.feed(b"t SEARCH " + b"(" * 9 + b"ALL" + b")" * 9 + b"\r\n")
    with pytest.raises(NestingTooDeep) as info:
        run(parser)
    assert info.value.tag == "t"
    parser.feed(b"t SEARCH " + b"NOT " * 9 + b"ALL\r\n")
    with pytest.raises(NestingTooDeep):
        run(parser)
    parser.feed(b"t SEARCH " + b"(" * 8 + b"ALL" + b")" * 8 + b"\r\n")
    assert run(parser) == [c.Search("t", c.SearchAll())]


def test_nesting_default_survives_huge_input() -> None:
    parser = Parser()
    parser.feed(b"t SEARCH " + b"OR ALL " * 9000 + b"ALL\r\n")
    with pytest.raises(NestingTooDeep):
        run(parser)


def test_too_many_id_pairs() -> None:
    pairs = b" ".join(b'"k%d" "v"' % index for index in range(31))
    with pytest.raises(ParseError):
        parse_command(b"t ID (" + pairs + b")")


# --- continuation lines ---------------------------------------------------------------------


def test_authenticate_continuation() -> None:
    parser = Parser()
    parser.feed(b"a AUTHENTICATE PLAIN\r\n")
    assert run(parser) == [c.Authenticate("a", "PLAIN")]
    parser.expect_continuation()
    parser.feed(b"AGFsaWNlAHNlY3JldA==\r\n")
    line = parser.next_event()
    assert isinstance(line, ContinuationLine)
    assert decode_sasl_response(line) == b"\x00alice\x00secret"
    # After one continuation line the parser reads commands again.
    parser.feed(b"b NOOP\r\n")
    assert run(parser) == [c.Noop("b")]


def test_authenticate_cancel_and_garbage() -> None:
    with pytest.raises(AuthenticationCancelled) as info:
        decode_sasl_response(ContinuationLine(b"*"), tag="a")
    assert info.value.render() == b"a BAD authentication cancelled by the client\r\n"
    with pytest.raises(ParseError):
        decode_sasl_response(b"not base64!", tag="a")
    assert decode_sasl_response(b"") == b""
    assert decode_sasl_response(b"=") == b""


def test_idle_done_line() -> None:
    parser = Parser()
    parser.feed(b"i IDLE\r\n")
    assert run(parser) == [c.Idle("i")]
    parser.expect_continuation()
    assert parser.next_event() is NEED_DATA
    parser.feed(b"done\r\nj NOOP\r\n")
    line = parser.next_event()
    assert isinstance(line, ContinuationLine) and line.is_done
    assert run(parser) == [c.Noop("j")]


def test_continuation_line_with_brace_is_not_literal() -> None:
    parser = Parser()
    parser.expect_continuation()
    parser.feed(b"abc {5}\r\n")
    assert parser.next_event() == ContinuationLine(b"abc {5}")


def test_discard_buffered_after_starttls() -> None:
    parser = Parser()
    parser.feed(b"a STARTTLS\r\nb LOGIN injected command\r\n")
    assert parser.next_event() == c.StartTLS("a")
    assert parser.discard_buffered() == len(b"b LOGIN injected command\r\n")
    assert parser.next_event() is NEED_DATA


# --- properties -------------------------------------------------------------------------------

_astring_text = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FFF, exclude_categories=("Cs",)), max_size=30
)


def _quote(value: str) -> bytes:
    data = value.encode("utf-8")
    if b"\r" in data or b"\n" in data or b"\x00" in data:
        return b"{%d}\r\n" % len(data) + data
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


@settings(max_examples=200, deadline=None)
@given(username=_astring_text, password=_astring_text, split=st.integers(min_value=1, max_value=50))
def test_login_round_trip(username: str, password: str, split: int) -> None:
    wire = b"t1 LOGIN " + _quote(username) + b" " + _quote(password) + b"\r\n"
    parser = Parser()
    events: list[object] = []
    for index in range(0, len(wire), split):
        parser.feed(wire[index : index + split])
        events += run(parser)
    assert events == [c.Login("t1", username, password)]


_numbers = st.integers(min_value=1, max_value=4294967295)
_range_ends = st.one_of(st.none(), _numbers)


@settings(max_examples=200, deadline=None)
@given(ranges=st.lists(st.tuples(_range_ends, _range_ends), min_size=1, max_size=6))
def test_sequence_set_round_trip(ranges: list[tuple[int | None, int | None]]) -> None:
    sequence_set = SequenceSet(tuple(ranges))
    command = parse_command(b"t FETCH " + str(sequence_set).encode() + b" UID")
    assert isinstance(command, c.Fetch)
    assert str(command.sequence_set) == str(sequence_set)
    assert command.sequence_set == SequenceSet.parse(str(sequence_set))


_names = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFFFF, exclude_categories=("Cs",)), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(name=_names)
def test_mailbox_name_round_trip(name: str) -> None:
    from mailstack.imap.response import mailbox

    command = parse_command(b"t SELECT " + mailbox(name))
    expected = "INBOX" if name.upper() == "INBOX" else name
    assert command == c.Select("t", expected)


_flags = st.lists(
    st.one_of(
        st.sampled_from(["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"]),
        st.from_regex(r"\$?[A-Za-z][A-Za-z0-9_.-]{0,10}", fullmatch=True),
    ),
    max_size=5,
)


@settings(max_examples=100, deadline=None)
@given(flags=_flags, silent=st.booleans(), action=st.sampled_from(list(c.StoreAction)))
def test_store_round_trip(flags: list[str], silent: bool, action: c.StoreAction) -> None:
    from mailstack.imap.response import flag_list

    wire = b"t STORE 1:3 %sFLAGS%s %s" % (action.value.encode(), b".SILENT" if silent else b"", flag_list(flags))
    assert parse_command(wire) == c.Store("t", S("1:3"), action, tuple(flags), silent)


def test_every_error_is_imap_error() -> None:
    # ParseError and BadCharset share the base class that the connection catches.
    assert issubclass(ParseError, ImapError)
    assert issubclass(BadCharset, ImapError)


# --- fuzz targets under hypothesis ------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(st.binary(max_size=400), spliced_seeds()))
def test_fuzz_parser_only_raises_protocol_errors(data: bytes) -> None:
    fuzz_parser(data)
    fuzz_mime(data)


def test_fuzz_seeds_produce_events() -> None:
    # Feeding each seed at once must yield its commands, so the fuzz target
    # really reaches literals, continuations and the grammar.
    for seed in SEEDS[:6]:
        assert fuzz_parser(b"\x10" + seed) >= 1


# --- round trips of search programs and FETCH attributes ------------------------------------

_FLAG_WORDS = {
    ("\\Answered", True): "ANSWERED",
    ("\\Deleted", True): "DELETED",
    ("\\Draft", True): "DRAFT",
    ("\\Flagged", True): "FLAGGED",
    ("\\Recent", True): "RECENT",
    ("\\Seen", True): "SEEN",
    ("\\Answered", False): "UNANSWERED",
    ("\\Deleted", False): "UNDELETED",
    ("\\Draft", False): "UNDRAFT",
    ("\\Flagged", False): "UNFLAGGED",
    ("\\Seen", False): "UNSEEN",
    ("\\Recent", False): "OLD",
}
_MONTH_NAMES = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def search_wire(key: c.SearchKey) -> bytes:
    """Write a search key the way a client would (test-side encoder)."""
    if isinstance(key, c.SearchAll):
        return b"ALL"
    if isinstance(key, c.SearchAnd):
        return b"(" + b" ".join(search_wire(inner) for inner in key.keys) + b")"
    if isinstance(key, c.SearchOr):
        return b"OR " + search_wire(key.left) + b" " + search_wire(key.right)
    if isinstance(key, c.SearchNot):
        return b"NOT " + search_wire(key.key)
    if isinstance(key, c.SearchFlag):
        word = _FLAG_WORDS.get((key.flag, key.present))
        if word is not None:
            return word.encode()
        return (b"KEYWORD " if key.present else b"UNKEYWORD ") + key.flag.encode()
    if isinstance(key, c.SearchDate):
        prefix = b"SENT" if key.field is c.DateField.SENT else b""
        date = "%d-%s-%04d" % (key.date.day, _MONTH_NAMES[key.date.month - 1], key.date.year)
        return prefix + key.relation.value.encode() + b" " + date.encode()
    if isinstance(key, c.SearchSize):
        return key.relation.value.encode() + b" %d" % key.size
    if isinstance(key, c.SearchHeader):
        if key.name in ("BCC", "CC", "FROM", "SUBJECT", "TO"):
            return key.name.encode() + b" " + _quote(key.value)
        return b"HEADER " + key.name.encode() + b" " + _quote(key.value)
    if isinstance(key, c.SearchText):
        return (b"TEXT " if key.include_headers else b"BODY ") + _quote(key.value)
    if isinstance(key, c.SearchSequenceSet):
        return (b"UID " if key.uid else b"") + str(key.sequence_set).encode()
    if isinstance(key, c.SearchModSeq):
        return b"MODSEQ %d" % key.modseq
    raise AssertionError(key)


_search_leaves = st.one_of(
    st.just(c.SearchAll()),
    st.sampled_from(sorted(_FLAG_WORDS)).map(lambda pair: c.SearchFlag(*pair)),
    st.builds(c.SearchFlag, st.from_regex(r"\$?[A-Za-z][A-Za-z0-9_-]{0,8}", fullmatch=True), st.booleans()),
    st.builds(c.SearchDate, st.sampled_from(list(c.DateField)), st.sampled_from(list(c.DateRelation)), st.dates()),
    st.builds(c.SearchSize, st.sampled_from(list(c.SizeRelation)), st.integers(0, 4294967295)),
    st.builds(c.SearchHeader, st.sampled_from(["FROM", "TO", "CC", "BCC", "SUBJECT", "X-SPAM", "LIST-ID"]), _astring_text),
    st.builds(c.SearchText, _astring_text, st.booleans()),
    st.builds(c.SearchSequenceSet, st.lists(st.tuples(_range_ends, _range_ends), min_size=1, max_size=3).map(lambda r: SequenceSet(tuple(r))), st.booleans()),
    st.builds(c.SearchModSeq, st.integers(0, 2**63 - 1)),
)
_search_keys = st.recursive(
    _search_leaves,
    lambda children: st.one_of(
        st.lists(children, min_size=2, max_size=3).map(lambda keys: c.SearchAnd(tuple(keys))),
        st.builds(c.SearchOr, children, children),
        st.builds(c.SearchNot, children),
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(key=_search_keys, uid=st.booleans())
def test_search_program_round_trip(key: c.SearchKey, uid: bool) -> None:
    wire = b"t " + (b"UID " if uid else b"") + b"SEARCH CHARSET UTF-8 "
    wire += search_wire(key)[1:-1] if isinstance(key, c.SearchAnd) else search_wire(key)
    parser = Parser(max_nesting=64)
    parser.feed(wire + b"\r\n")
    assert run(parser) == [c.Search("t", key, "UTF-8", uid)]


def fetch_wire(attribute: c.FetchAttribute) -> bytes:
    if attribute.section is None:
        return attribute.item.value.encode()
    name = b"BODY.PEEK[" if attribute.peek else b"BODY["
    wire = name + str(attribute.section).encode() + b"]"
    if attribute.partial is not None:
        wire += b"<%d.%d>" % attribute.partial
    return wire


_field_names = st.lists(st.from_regex(r"[A-Z][A-Z0-9-]{0,10}", fullmatch=True), min_size=1, max_size=3)


@st.composite
def _sections(draw: st.DrawFn) -> c.Section:
    part = tuple(draw(st.lists(st.integers(1, 30), max_size=3)))
    choices = [None, c.SectionSpecifier.HEADER, c.SectionSpecifier.HEADER_FIELDS, c.SectionSpecifier.HEADER_FIELDS_NOT, c.SectionSpecifier.TEXT]
    if part:
        choices.append(c.SectionSpecifier.MIME)
    specifier = draw(st.sampled_from(choices))
    fields: tuple[str, ...] = ()
    if specifier in (c.SectionSpecifier.HEADER_FIELDS, c.SectionSpecifier.HEADER_FIELDS_NOT):
        fields = tuple(draw(_field_names))
    return c.Section(part, specifier, fields)


_fetch_attributes = st.one_of(
    st.sampled_from([item for item in c.FetchItem]).map(c.FetchAttribute),
    st.builds(
        c.FetchAttribute,
        st.just(c.FetchItem.BODY),
        _sections(),
        st.booleans(),
        st.one_of(st.none(), st.tuples(st.integers(0, 4294967295), st.integers(1, 4294967295))),
    ),
)


@settings(max_examples=300, deadline=None)
@given(attributes=st.lists(_fetch_attributes, min_size=1, max_size=5), uid=st.booleans())
def test_fetch_attributes_round_trip(attributes: list[c.FetchAttribute], uid: bool) -> None:
    wire = b"t " + (b"UID " if uid else b"") + b"FETCH 1:* (" + b" ".join(fetch_wire(a) for a in attributes) + b")"
    command = parse_command(wire)
    assert command == c.Fetch("t", S("1:*"), tuple(attributes), uid)
