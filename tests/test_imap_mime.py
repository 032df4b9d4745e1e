"""ENVELOPE, BODYSTRUCTURE, body sections and SEARCH helpers over raw messages."""

from __future__ import annotations

import datetime
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.imap import mime
from mailstack.imap.commands import Section, SectionSpecifier

# --- a small independent reader of IMAP values, to check the grammar ------------------------


class Atom(str):
    pass


def read_value(data: bytes) -> object:
    """Parse one IMAP value: lists, NIL, numbers, quoted strings, literals, atoms."""
    value, pos = _read(data, 0)
    assert pos == len(data), "trailing data at %d: %r" % (pos, data[pos : pos + 20])
    return value


def _read(data: bytes, pos: int) -> tuple[object, int]:
    char = data[pos : pos + 1]
    if char == b"(":
        items: list[object] = []
        pos += 1
        while data[pos : pos + 1] != b")":
            if items and data[pos : pos + 1] == b" ":
                pos += 1
            item, pos = _read(data, pos)
            items.append(item)
        return items, pos + 1
    if char == b'"':
        out = bytearray()
        pos += 1
        while data[pos : pos + 1] != b'"':
            if data[pos : pos + 1] == b"\\":
                pos += 1
                assert data[pos : pos + 1] in (b'"', b"\\")
            assert data[pos] not in (0x0D, 0x0A, 0x00)
            assert data[pos] < 0x80
            out.append(data[pos])
            pos += 1
        return bytes(out), pos + 1
    if char == b"{":
        match = re.compile(rb"\{(\d+)\}\r\n").match(data, pos)
        assert match is not None
        size = int(match.group(1))
        return data[match.end() : match.end() + size], match.end() + size
    match = re.compile(rb"[^ ()\"{\r\n]+").match(data, pos)
    assert match is not None, "no value at %d: %r" % (pos, data[pos : pos + 20])
    token = match.group()
    if token == b"NIL":
        return None, match.end()
    if token.isdigit():
        return int(token), match.end()
    return Atom(token.decode()), match.end()


def is_nstring(value: object) -> bool:
    return value is None or isinstance(value, bytes)


def check_params(value: object) -> None:
    assert value is None or (isinstance(value, list) and value and len(value) % 2 == 0)
    if value is not None:
        assert all(isinstance(item, bytes) for item in value)


def check_envelope(value: object) -> None:
    assert isinstance(value, list) and len(value) == 10
    assert is_nstring(value[0])
    assert is_nstring(value[1])
    for addresses in value[2:8]:
        assert addresses is None or (isinstance(addresses, list) and addresses)
        for address in addresses or []:
            assert isinstance(address, list) and len(address) == 4
            assert all(is_nstring(item) for item in address)
    assert is_nstring(value[8])
    assert is_nstring(value[9])


def check_body(value: object, extensible: bool) -> int:
    """Check BODY/BODYSTRUCTURE grammar (RFC 3501 section 9); return the nesting depth."""
    assert isinstance(value, list) and value
    if isinstance(value[0], list):
        count = 0
        while isinstance(value[count], list):
            count += 1
        children = value[:count]
        depth = max(check_body(child, extensible) for child in children)
        rest = value[count:]
        assert isinstance(rest[0], bytes), "multipart subtype must be a string"
        if extensible:
            assert len(rest) == 5
            check_params(rest[1])
            check_disposition(rest[2])
            check_language(rest[3])
            assert is_nstring(rest[4])
        else:
            assert len(rest) == 1
        return depth + 1
    assert isinstance(value[0], bytes) and isinstance(value[1], bytes)
    check_params(value[2])
    assert is_nstring(value[3])
    assert is_nstring(value[4])
    assert isinstance(value[5], bytes)
    assert isinstance(value[6], int)
    index = 7
    depth = 0
    kind = (value[0].upper(), value[1].upper())
    if kind == (b"MESSAGE", b"RFC822"):
        check_envelope(value[7])
        depth = check_body(value[8], extensible)
        assert isinstance(value[9], int)
        index = 10
    elif kind[0] == b"TEXT":
        assert isinstance(value[7], int)
        index = 8
    rest = value[index:]
    if extensible:
        assert len(rest) == 4, rest
        assert is_nstring(rest[0])
        check_disposition(rest[1])
        check_language(rest[2])
        assert is_nstring(rest[3])
    else:
        assert rest == []
    return depth + 1


def check_disposition(value: object) -> None:
    assert value is None or (isinstance(value, list) and len(value) == 2 and isinstance(value[0], bytes))
    if value is not None:
        check_params(value[1])


def check_language(value: object) -> None:
    assert is_nstring(value) or (isinstance(value, list) and all(isinstance(item, bytes) for item in value))


def structure(data: bytes, extensible: bool = True) -> list:
    encoded = mime.body_structure(mime.parse(data), extensible)
    value = read_value(encoded)
    check_body(value, extensible)
    return value


# --- sample messages ---------------------------------------------------------------------------

SIMPLE = (
    b"From: Alice Example <alice@here.test>\r\n"
    b"To: bob@there.test\r\n"
    b"Subject: Hello\r\n"
    b"Date: Tue, 2 Jan 2024 10:11:12 +0100\r\n"
    b"Message-ID: <1@here.test>\r\n"
    b"\r\n"
    b"Hi Bob,\r\nsee you.\r\n"
)

NESTED = (
    b"From: a@here.test\r\n"
    b"Subject: nested\r\n"
    b"Content-Type: multipart/mixed; boundary=outer\r\n"
    b"\r\n"
    b"This is the preamble.\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=\"inner\"\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=FC=DFe\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>Gr\xc3\xbc\xc3\x9fe</p>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Description: forwarded\r\n"
    b"\r\n"
    b"From: Carol <carol@there.test>\r\n"
    b"Subject: inner message\r\n"
    b"Content-Type: multipart/mixed; boundary=deep\r\n"
    b"\r\n"
    b"--deep\r\n"
    b"\r\n"
    b"first part has no header\r\n"
    b"--deep\r\n"
    b"Content-Type: application/pdf; name=\"a.pdf\"\r\n"
    b"Content-Disposition: attachment; filename=\"a.pdf\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"JVBERi0xLjQK\r\n"
    b"--deep--\r\n"
    b"--outer\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Language: en, de\r\n"
    b"\r\n"
    b"c2VjcmV0 is not decoded here\r\n"
    b"--outer--\r\n"
    b"epilogue\r\n"
)


def test_simple_bodystructure_golden() -> None:
    encoded = mime.body_structure(mime.parse(SIMPLE))
    assert encoded == b'("text" "plain" ("CHARSET" "us-ascii") NIL NIL "7BIT" 19 2 NIL NIL NIL NIL)'
    assert mime.body_structure(mime.parse(SIMPLE), extensible=False) == (
        b'("text" "plain" ("CHARSET" "us-ascii") NIL NIL "7BIT" 19 2)'
    )


def test_simple_envelope_golden() -> None:
    assert mime.envelope(mime.parse(SIMPLE)) == (
        b'("Tue, 2 Jan 2024 10:11:12 +0100" "Hello" '
        b'(("Alice Example" NIL "alice" "here.test")) '
        b'(("Alice Example" NIL "alice" "here.test")) '
        b'(("Alice Example" NIL "alice" "here.test")) '
        b'((NIL NIL "bob" "there.test")) NIL NIL NIL "<1@here.test>")'
    )


def test_nested_structure() -> None:
    value = structure(NESTED)
    alternative, forwarded, plain = value[0], value[1], value[2]
    assert value[3] == b"mixed"
    assert value[4] == [b"BOUNDARY", b"outer"]
    assert alternative[0][0:3] == [b"text", b"plain", [b"CHARSET", b"iso-8859-1"]]
    assert alternative[0][5] == b"quoted-printable"
    assert alternative[2] == b"alternative"
    assert forwarded[0:2] == [b"message", b"rfc822"]
    assert forwarded[4] == b"forwarded"
    envelope = forwarded[7]
    assert envelope[1] == b"inner message"
    assert envelope[2] == [[b"Carol", None, b"carol", b"there.test"]]
    inner = forwarded[8]
    assert inner[0][0:2] == [b"text", b"plain"]
    assert inner[1][0:3] == [b"application", b"pdf", [b"NAME", b"a.pdf"]]
    assert inner[1][8] == [b"attachment", [b"FILENAME", b"a.pdf"]]
    assert plain[-2] == [b"en", b"de"]
    check_body(read_value(mime.body_structure(mime.parse(NESTED), extensible=False)), False)


@pytest.mark.parametrize(
    "section,expected",
    [
        (Section(), NESTED),
        (Section((1, 1)), b"Gr=FC=DFe"),
        (Section((1, 2)), b"<p>Gr\xc3\xbc\xc3\x9fe</p>"),
        (Section((1, 2), SectionSpecifier.MIME), b"Content-Type: text/html; charset=utf-8\r\n\r\n"),
        (Section((2,), SectionSpecifier.HEADER_FIELDS, ("SUBJECT",)), b"Subject: inner message\r\n\r\n"),
        (Section((2, 1)), b"first part has no header"),
        (Section((2, 2)), b"JVBERi0xLjQK"),
        (
            Section((2, 2), SectionSpecifier.MIME),
            b"Content-Type: application/pdf; name=\"a.pdf\"\r\n"
         b"Content-Disposition: attachment; filename=\"a.pdf\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n",
        ),
        (Section((3,)), b"c2VjcmV0 is not decoded here"),
        (Section((4,)), None),
        (Section((1, 3)), None),
        (Section((3, 1)), None),
        (Section((1,), SectionSpecifier.HEADER), None),
        (Section((), SectionSpecifier.TEXT), NESTED.split(b"\r\n\r\n", 1)[1]),
        (Section((), SectionSpecifier.HEADER_FIELDS_NOT, ("CONTENT-TYPE", "FROM")), b"Subject: nested\r\n\r\n"),
    ],
)
def test_nested_sections(section: Section, expected: bytes | None) -> None:
    assert mime.fetch_section(NESTED, section) == expected


def test_encapsulated_message_sections() -> None:
    tree = mime.parse(NESTED)
    whole = mime.body_section(tree, Section((2,)))
    assert whole is not None and whole.startswith(b"From: Carol")
    header = mime.body_section(tree, Section((2,), SectionSpecifier.HEADER))
    text = mime.body_section(tree, Section((2,), SectionSpecifier.TEXT))
    assert header is not None and text is not None
    assert header + text == whole
    assert header.endswith(b"\r\n\r\n")


def test_single_part_numbering() -> None:
    assert mime.fetch_section(SIMPLE, Section((1,))) == b"Hi Bob,\r\nsee you.\r\n"
    assert mime.fetch_section(SIMPLE, Section((2,))) is None
    assert mime.fetch_section(SIMPLE, Section((1, 1))) is None
    assert mime.fetch_section(SIMPLE, Section((), SectionSpecifier.HEADER)) == SIMPLE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"


def test_header_fields_keep_folding_and_order() -> None:
    message = b"Subject: one\r\n two\r\nX-A: 1\r\nsubject: again\r\n\r\nbody"
    selected = mime.fetch_section(message, Section((), SectionSpecifier.HEADER_FIELDS, ("SUBJECT",)))
    assert selected == b"Subject: one\r\n two\r\nsubject: again\r\n\r\n"
    assert mime.fetch_section(message, Section((), SectionSpecifier.HEADER_FIELDS, ("X-NONE",))) == b"\r\n"


def test_partial() -> None:
    assert mime.partial(b"0123456789", (2, 3)) == b"234"
    assert mime.partial(b"0123456789", (8, 10)) == b"89"
    assert mime.partial(b"0123456789", (20, 5)) == b""
    assert mime.partial(None, (0, 5)) is None
    assert mime.partial(b"abc", None) == b"abc"
    assert mime.section_value(None) == b"NIL"
    assert mime.section_value(b"ab") == b"{2}\r\nab"


# --- broken and hostile MIME -----------------------------------------------------------------------

BROKEN = [
    b"",
    b"\r\n",
    b"no header at all, just text",
    b"Subject: header only",
    b"Subject: bare lf\n\nbody\n",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter\r\n",
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\nboundary never appears\r\n",
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nno close\r\n",
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x--\r\n",
    b"Content-Type: multipart/mixed; boundary=\"\"\r\n\r\n--\r\n",
    b"Content-Type: text\r\n\r\nno subtype\r\n",
    b"Content-Type: ;;;\r\n\r\n",
    b"Content-Type: text/plain; charset=\"unterminated\r\n\r\nx",
    b"Content-Type: text/plain; =novalue; charset; a=b=c; (comment) x=\"y\\\"z\"\r\n\r\nx",
    b"Content-Type: message/rfc822\r\n\r\n",
    b"Content-Type: message/rfc822\r\n\r\nnot a message",
    b"Content-Type: MULTIPART/Mixed; BOUNDARY=b\r\n\r\n--b\r\n\r\n--b\r\n\r\n--b--",
    b"From: \"unterminated <a@b>\r\nTo: ,,,;;;:::<<<>>>@@@\r\nCc: (comment only)\r\nBcc: group:;\r\n\r\n",
    b"Subject: caf\xc3\xa9 \xff\xfe\r\nFrom: J\xc3\xb6rg <j@x>\r\n\r\n",
    b"Content-Disposition: ;\r\nContent-Language: \r\nContent-Transfer-Encoding:\r\n\r\nx",
    b"\x00\x01\x02: binary\r\n\r\n\x00",
    b" leading continuation\r\nSubject: x\r\n\r\n",
    b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: digest entry\r\n\r\nbody\r\n--d--",
]


@pytest.mark.parametrize("message", BROKEN, ids=range(len(BROKEN)))
def test_broken_mime_stays_grammar_valid(message: bytes) -> None:
    tree = mime.parse(message)
    check_body(read_value(mime.body_structure(tree)), True)
    check_body(read_value(mime.body_structure(tree, extensible=False)), False)
    check_envelope(read_value(mime.envelope(tree)))
    # BODY[] is always the stored message, whatever its structure.
    assert mime.fetch_section(message, Section()) == message


def test_multipart_without_delimiter_keeps_body() -> None:
    message = BROKEN[6]
    assert mime.fetch_section(message, Section((1,))) == b"boundary never appears\r\n"


def test_part_without_close_delimiter() -> None:
    value = structure(BROKEN[7])
    assert value[0][0:2] == [b"text", b"plain"]
    assert mime.fetch_section(BROKEN[7], Section((1,))) == b"no close\r\n"


def test_digest_defaults_to_message() -> None:
    value = structure(BROKEN[-1])
    assert value[0][0:2] == [b"message", b"rfc822"]
    assert value[0][7][1] == b"digest entry"


def test_message_global_is_a_leaf() -> None:
    # RFC 3501's grammar gives the envelope form to message/rfc822 only.
    value = structure(b"Content-Type: message/global\r\n\r\nSubject: x\r\n\r\nbody\r\n")
    assert value[0:2] == [b"message", b"global"]
    assert len(value) == 11


def test_deep_multipart_nesting_is_capped() -> None:
    depth = 2000
    message = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for level in range(1, depth):
        message += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (level - 1, level)
    message += b"--b%d\r\n\r\nleaf\r\n" % (depth - 1)
    value = structure(message)
    nesting = check_body(value, True)
    assert nesting <= mime.MAX_DEPTH + 1


def test_deep_message_nesting_is_capped() -> None:
    message = b"Subject: leaf\r\n\r\nleaf\r\n"
    for _ in range(1000):
        message = b"Content-Type: message/rfc822\r\n\r\n" + message
    nesting = check_body(read_value(mime.body_structure(mime.parse(message))), True)
    assert nesting <= mime.MAX_DEPTH + 1
    envelope = mime.envelope(mime.parse(message))
    check_envelope(read_value(envelope))


def test_many_parts_are_capped() -> None:
    count = mime.MAX_PARTS + 500
    body = b"".join(b"--p\r\n\r\n%d\r\n" % index for index in range(count)) + b"--p--\r\n"
    message = b"Content-Type: multipart/mixed; boundary=p\r\n\r\n" + body
    tree = mime.parse(message)
    assert len(tree.children) <= mime.MAX_PARTS
    check_body(read_value(mime.body_structure(tree)), True)


_boundaries = st.from_regex(r"[A-Za-z0-9'()+_,-./:=?]{1,20}", fullmatch=True)


@st.composite
def mime_trees(draw: st.DrawFn, depth: int = 0) -> bytes:
    kind = draw(st.sampled_from(["text", "multipart", "message", "binary"] if depth < 4 else ["text", "binary"]))
    if kind == "multipart":
        boundary = draw(_boundaries)
        children = draw(st.lists(mime_trees(depth + 1), min_size=0, max_size=3))
        body = b"".join(b"--" + boundary.encode() + b"\r\n" + child + b"\r\n" for child in children)
        if draw(st.booleans()):
            body += b"--" + boundary.encode() + b"--\r\n"
        return b'Content-Type: multipart/mixed; boundary="' + boundary.encode() + b'"\r\n\r\n' + body
    if kind == "message":
        return b"Content-Type: message/rfc822\r\n\r\n" + draw(mime_trees(depth + 1))
    if kind == "binary":
        return b"Content-Type: application/octet-stream\r\n\r\n" + draw(st.binary(max_size=40))
    text = draw(st.text(max_size=40)).encode("utf-8")
    return b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text


@settings(max_examples=200, deadline=None)
@given(message=mime_trees())
def test_generated_mime_trees_are_grammar_valid(message: bytes) -> None:
    tree = mime.parse(message)
    check_body(read_value(mime.body_structure(tree)), True)
    check_body(read_value(mime.body_structure(tree, extensible=False)), False)
    for part in tree.walk():
        assert part.header + part.body in message or part.body in message


@settings(max_examples=300, deadline=None)
@given(message=st.binary(max_size=400))
def test_random_bytes_are_grammar_valid(message: bytes) -> None:
    tree = mime.parse(message)
    check_body(read_value(mime.body_structure(tree)), True)
    check_envelope(read_value(mime.envelope(tree)))


@settings(max_examples=200, deadline=None)
@given(
    message=mime_trees(),
    part=st.lists(st.integers(min_value=1, max_value=4), max_size=4),
    specifier=st.sampled_from([None, *SectionSpecifier]),
)
def test_any_section_is_bytes_or_none(message: bytes, part: list[int], specifier: SectionSpecifier | None) -> None:
    if specifier is SectionSpecifier.MIME and not part:
        specifier = None
    fields = ("SUBJECT",) if specifier in (SectionSpecifier.HEADER_FIELDS, SectionSpecifier.HEADER_FIELDS_NOT) else ()
    result = mime.fetch_section(message, Section(tuple(part), specifier, fields))
    assert result is None or isinstance(result, bytes)


# --- ENVELOPE addresses -------------------------------------------------------------------------------


def addresses(value: bytes) -> object:
    envelope = read_value(mime.envelope(mime.parse(b"To: " + value + b"\r\n\r\n")))
    return envelope[5]


@pytest.mark.parametrize(
    "header,expected",
    [
        (b"a@b.test", [[None, None, b"a", b"b.test"]]),
        (b"<a@b.test>", [[None, None, b"a", b"b.test"]]),
        (b'"Doe, John" <john@x.test>', [[b"Doe, John", None, b"john", b"x.test"]]),
        (b"John  Q.   Public <jqp@x.test>", [[b"John Q. Public", None, b"jqp", b"x.test"]]),
        (b"=?utf-8?q?J=C3=B6rg?= <j@x.test>", [[b"=?utf-8?q?J=C3=B6rg?=", None, b"j", b"x.test"]]),
        (b"a@b.test (Comment Name)", [[None, None, b"a", b"b.test"]]),
        (b"<@relay.test:a@b.test>", [[None, b"@relay.test", b"a", b"b.test"]]),
        (b"a@b.test, c@d.test", [[None, None, b"a", b"b.test"], [None, None, b"c", b"d.test"]]),
        (b"localonly", [[None, None, b"localonly", b""]]),
        (
            b"Friends: x@y.test, \"Z, Q\" <z@y.test>;, last@y.test",
            [
                [None, None, b"Friends", None],
                [None, None, b"x", b"y.test"],
                [b"Z, Q", None, b"z", b"y.test"],
                [None, None, None, None],
                [None, None, b"last", b"y.test"],
            ],
        ),
        (b"undisclosed-recipients:;", [[None, None, b"undisclosed-recipients", None], [None, None, None, None]]),
        (b"\"quoted local\"@x.test", [[None, None, b'"quoted local"', b"x.test"]]),
        (b", ,", None),
    ],
)
def test_envelope_addresses(header: bytes, expected: object) -> None:
    assert addresses(header) == expected


def test_envelope_sender_and_reply_to() -> None:
    message = b"From: a@x.test\r\nSender: s@x.test\r\nReply-To: r@x.test\r\nIn-Reply-To: <p@x>\r\n\r\n"
    envelope = read_value(mime.envelope(mime.parse(message)))
    assert envelope[2] == [[None, None, b"a", b"x.test"]]
    assert envelope[3] == [[None, None, b"s", b"x.test"]]
    assert envelope[4] == [[None, None, b"r", b"x.test"]]
    assert envelope[8] == b"<p@x>"


def test_envelope_folded_and_8bit_subject() -> None:
    message = b"Subject: first\r\n  second\r\nFrom: x@y\r\n\r\n"
    assert read_value(mime.envelope(mime.parse(message)))[1] == b"first  second"
    message = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\n"
    encoded = mime.envelope(mime.parse(message))
    assert b"{7}\r\nGr\xc3\xbc\xc3\x9fe" in encoded


# --- SEARCH helpers -----------------------------------------------------------------------------------


def test_decode_header() -> None:
    assert mime.decode_header(b"=?utf-8?q?caf=C3=A9?= au lait") == "caf\u00e9 au lait"
    assert mime.decode_header(b"=?iso-8859-1?b?R3L832U=?=") == "Gr\u00fc\u00dfe"
    assert mime.decode_header(b"plain \xc3\xa9") == "plain \u00e9"
    assert mime.decode_header(b"latin \xe9") == "latin \u00e9"
    assert mime.decode_header(b"=?bogus-charset?q?x?=") == "=?bogus-charset?q?x?="


def test_header_contains() -> None:
    tree = mime.parse(b"Subject: =?utf-8?q?Caf=C3=A9?=\r\nFrom: Bob <bob@x.test>\r\nX-Empty:\r\n\r\n")
    assert mime.header_contains(tree, "SUBJECT", "caf\u00e9")
    assert mime.header_contains(tree, "subject", "CAF\u00c9")
    assert mime.header_contains(tree, "FROM", "BOB@X")
    assert not mime.header_contains(tree, "FROM", "alice")
    assert mime.header_contains(tree, "X-EMPTY", "")
    assert not mime.header_contains(tree, "X-MISSING", "")
    assert mime.header_values(tree, "subject") == ["Caf\u00e9"]


def test_text_contains_decodes_parts() -> None:
    tree = mime.parse(NESTED)
    assert mime.text_contains(tree, "GR\u00dc\u00dfE")  # quoted-printable, ISO-8859-1
    assert mime.text_contains(tree, "<p>gr\u00fc")  # 8-bit UTF-8 html
    assert mime.text_contains(tree, "first part has no header")
    assert not mime.text_contains(tree, "JVBERi")  # application/pdf is not text
    assert not mime.text_contains(tree, "inner message")  # a header: BODY does not see it
    assert mime.text_contains(tree, "inner message", include_headers=True)
    assert mime.text_contains(tree, "")


def test_text_contains_base64_and_unknown_charset() -> None:
    message = (
        b"Content-Type: text/plain; charset=x-unknown\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"aGVsbG8gd\r\n29ybGQ\r\n"
    )
    assert mime.text_contains(mime.parse(message), "HELLO WORLD")
    broken = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64 at all"
    mime.text_contains(mime.parse(broken), "x")


def test_text_contains_unlabelled_8bit() -> None:
    latin = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\nCaf\xe9 cr\xe8me\r\n"
    assert mime.text_contains(mime.parse(latin), "caf\u00e9 CR\u00c8ME")
    utf8 = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nCaf\xc3\xa9\r\n"
    assert mime.text_contains(mime.parse(utf8), "caf\u00e9")


def test_sent_date() -> None:
    assert mime.sent_date(mime.parse(SIMPLE)) == datetime.date(2024, 1, 2)
    late = b"Date: Tue, 2 Jan 2024 23:30:00 -0800\r\n\r\n"
    assert mime.sent_date(mime.parse(late)) == datetime.date(2024, 1, 2)
    assert mime.sent_date(mime.parse(b"Date: yesterday\r\n\r\n")) is None
    assert mime.sent_date(mime.parse(b"Subject: x\r\n\r\n")) is None
