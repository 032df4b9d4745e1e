"""The DATA reader and the reply helpers of the shared SMTP base, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstack.smtp import replies
from mailstack.smtp.data import DataReader
from mailstack.smtp.paths import PathError, parse_path_argument, split_parameters
from mailstack.smtp.replies import Reply, add_enhanced_code


def read_all(data: bytes, step: int | None = None, max_size: int = 100_000) -> tuple[DataReader, bytes | None]:
    reader = DataReader(max_size)
    if step is None:
        return reader, reader.feed(data)
    for start in range(0, len(data), step):
        rest = reader.feed(data[start : start + step])
        if rest is not None:
            return reader, rest + data[start + step :]
    return reader, None


CASES = [
    # (wire bytes, expected content, expected error, expected rest)
    (b".\r\n", b"", None, b""),
    (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", None, b"QUIT\r\n"),
    (b"\r\n.\r\n", b"\r\n", None, b""),
    (b"..x\r\n..\r\n.\r\n", b".x\r\n.\r\n", None, b""),
    (b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n", replies.BARE_NEWLINE, b""),
    (b"a\r.\rb\r\n.\r\n", b"a\r.\rb\r\n", replies.BARE_NEWLINE, b""),
    (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", replies.BARE_NEWLINE, b""),
    (b"a\r\n.\rb\r\n.\r\n", b"a\r\n\rb\r\n", replies.BARE_NEWLINE, b""),
    (b"x" * 998 + b"\r\n.\r\n", b"x" * 998 + b"\r\n", None, b""),
    (b"." + b"x" * 998 + b"\r\n.\r\n", b"x" * 998 + b"\r\n", None, b""),
    (b"x" * 999 + b"\r\n.\r\n", b"", replies.LINE_TOO_LONG, b""),
    (b"x" * 5000 + b".\r\nmore\r\n.\r\nNOOP\r\n", b"", replies.LINE_TOO_LONG, b"NOOP\r\n"),
]


@pytest.mark.parametrize("wire, content, error, rest", CASES)
@pytest.mark.parametrize("step", [None, 1, 2, 3, 7])
def test_data_reader_table(wire, content, error, rest, step):
    reader, found_rest = read_all(wire, step)
    assert found_rest == rest
    assert reader.error == error
    if error is None or error == replies.BARE_NEWLINE:
        assert reader.content == content
    else:
        assert reader.content == b""


def test_data_reader_size_limit():
    body = b"y" * 70 + b"\r\n"
    reader, rest = read_all(body * 20 + b".\r\nQUIT\r\n", step=50, max_size=1000)
    assert rest == b"QUIT\r\n"
    assert reader.error == replies.SIZE_EXCEEDED
    assert reader.content == b""


def test_data_reader_no_end_without_crlf_dot_crlf():
    reader = DataReader(1000)
    for chunk in (b"a\n.\n", b"b\r.\r", b"c\r\n.\r", b"x\r\n"):
        assert reader.feed(chunk) is None
    assert reader.feed(b".\r\n") == b""


def test_data_reader_feed_after_end():
    reader = DataReader(1000)
    reader.feed(b".\r\n")
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


def _stuff(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


@given(
    st.lists(st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b), max_size=30),
    st.integers(min_value=1, max_value=40),
)
def test_data_reader_roundtrip(lines, step):
    reader, rest = read_all(_stuff(lines) + b"RSET\r\n", step)
    assert rest == b"RSET\r\n"
    assert reader.error is None
    assert reader.content == b"".join(line + b"\r\n" for line in lines)


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_data_reader_any_bytes(data, step):
    # Parsed or rejected, never an exception; the end is found at most once.
    reader, rest = read_all(data + b"\r\n.\r\n", step)
    assert rest is not None
    assert reader.error in (None, replies.BARE_NEWLINE, replies.LINE_TOO_LONG, replies.SIZE_EXCEEDED)


ENHANCED_TABLE = [
    ("250 OK", "250 2.0.0 OK"),
    ("250 2.1.5 Recipient OK", "250 2.1.5 Recipient OK"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),
    ('500 Error: command "X" not recognized', '500 5.5.2 Error: command "X" not recognized'),
    ("501 Syntax: NOOP", "501 5.5.4 Syntax: NOOP"),
    ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
    ("503 Error: send HELO first", "503 5.5.1 Error: send HELO first"),
    ("530 Must issue a STARTTLS command first", "530 5.7.0 Must issue a STARTTLS command first"),
    ("451 Try later", "451 4.3.0 Try later"),
    ("452 Too many", "452 4.3.1 Too many"),
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
    ("250-SIZE 100", "250-2.0.0 SIZE 100"),
    ("not a reply", "not a reply"),
]


@pytest.mark.parametrize("line, expected", ENHANCED_TABLE)
def test_add_enhanced_code_table(line, expected):
    assert add_enhanced_code(line) == expected


def test_default_enhanced_class_matches_code():
    for code, enhanced in replies.DEFAULT_ENHANCED.items():
        assert enhanced[0] == str(code)[0], code


def test_reply_rejects_mismatched_class():
    with pytest.raises(ValueError):
        Reply(451, "5.3.0", "x")
    with pytest.raises(ValueError):
        Reply(250, "2.0.0", "two\r\nlines")
    assert Reply(250, "2.0.0", "OK").render() == "250 2.0.0 OK"


PATHS = [
    ("FROM:<a@example.test>", "a@example.test", []),
    ("FROM: <a@example.test> SIZE=10 BODY=8BITMIME", "a@example.test", ["SIZE=10", "BODY=8BITMIME"]),
    ("FROM:<>", "", []),
    ("FROM:a@example.test", "a@example.test", []),
    ("FROM:<@relay.test:a@example.test>", "a@example.test", []),
    ('FROM:<"john doe"@example.test>', '"john doe"@example.test', []),
    ("FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]", []),
    ("FROM:<ü@example.test> SMTPUTF8", "ü@example.test", ["SMTPUTF8"]),
]


@pytest.mark.parametrize("argument, address, params", PATHS)
def test_parse_path_valid(argument, address, params):
    path, found = parse_path_argument(argument, "FROM")
    assert path.address == address
    assert found == params


@pytest.mark.parametrize(
    "argument",
    [
        "FROM:<a>",
        "FROM:<a@>",
        "FROM:<@example.test>",
        "FROM:<a@b..c>",
        "FROM:<a b@example.test>",
        "FROM:<a@example.test",
        "FROM:<a@example.test>SIZE=1",
        "FROM:<a@-bad.test>",
        "FROM:<a\x01@example.test>",
        "FROM:<" + "a" * 65 + "@example.test>",
        "TO:<a@example.test>",
    ],
)
def test_parse_path_invalid(argument):
    with pytest.raises(PathError):
        parse_path_argument(argument, "FROM")


def test_parse_postmaster_without_domain():
    path, _ = parse_path_argument("TO:<Postmaster>", "TO")
    assert path.address == "postmaster"


def test_split_parameters_repeat():
    assert split_parameters(["size=1", "SMTPUTF8"]) == {"SIZE": "1", "SMTPUTF8": None}
    with pytest.raises(PathError):
        split_parameters(["SIZE=1", "size=2"])
