"""Fuzz entry for the IMAP parser and the MIME structure code.

The only claim checked: any input is parsed, or raises the protocol's own
error (:class:`~mailstack.imap.response.ImapError`). No other exception
escapes, no loop runs forever, and the parser keeps working after an error.

Run with atheris when it is installed (``pip install atheris``)::

    python tests/fuzz_imap_parser.py -max_total_time=60

Without atheris the same targets run under hypothesis for a bounded number
of examples::

    python tests/fuzz_imap_parser.py

``tests/test_imap_parser.py`` imports :func:`fuzz_parser` and
:func:`fuzz_mime` and runs them under hypothesis as part of the test suite.
"""

from __future__ import annotations

import sys

from mailstack.imap import mime
from mailstack.imap.commands import Command
from mailstack.imap.parser import NEED_DATA, ContinuationLine, LiteralRequest, Parser
from mailstack.imap.response import ImapError

#: Seeds that reach the interesting states: literals, continuations, nesting.
SEEDS = [
    b"a LOGIN {5}\r\nalice {6+}\r\nsecret\r\n",
    b"a APPEND INBOX (\\Seen) \"01-Jan-2024 00:00:00 +0000\" {3+}\r\nabc\r\n",
    b"a UID FETCH 1:* (FLAGS BODY.PEEK[1.HEADER.FIELDS (From)]<0.10>)\r\n",
    b"a SEARCH CHARSET UTF-8 OR (SEEN NOT 1:*) HEADER x {1}\r\ny\r\n",
    b"a AUTHENTICATE PLAIN\r\nAGEAYg==\r\n",
    b"a IDLE\r\nDONE\r\n",
    # Messages, for the MIME target.
    b"From: \"A, B\" <a@b>, g: c@d;\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n"
    b"--x\r\nContent-Type: message/rfc822\r\n\r\nContent-Type: multipart/alternative; boundary=\"y\"\r\n\r\n"
    b"--y\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\naGk=\r\n--y--\r\n"
    b"--x\r\nContent-Disposition: attachment; filename*=utf-8''a%20b\r\nContent-Language: en, de\r\n\r\nz\r\n--x--\r\n",
]


def fuzz_parser(data: bytes, max_literal: int = 64) -> int:
    """Drive a parser with ``data`` cut into chunks; return the number of events.

    The first byte picks the chunk size. A literal request is accepted when
    it is at most ``max_literal`` bytes and rejected otherwise, and after
    AUTHENTICATE or IDLE a continuation line is expected, as a server would.
    """
    if not data:
        return 0
    chunk = data[0] % 17 + 1
    body = data[1:]
    parser = Parser(max_line_length=512, max_nesting=8)
    events = 0
    for start in range(0, len(body), chunk):
        parser.feed(body[start : start + chunk])
        # Each round consumes bytes or returns NEED_DATA, so it ends; the bound
        # turns a parser that stops making progress into a failure.
        for _ in range(10 * len(body) + 10):
            try:
                event = parser.next_event()
            except ImapError as error:
                rendered = error.render()
                assert rendered.endswith(b"\r\n")
                assert rendered.count(b"\r\n") == 1
                continue
            if event is NEED_DATA:
                break
            events += 1
            if isinstance(event, LiteralRequest):
                if event.size <= max_literal:
                    parser.accept_literal()
                else:
                    parser.reject_literal()
            elif isinstance(event, Command):
                if event.NAME in ("AUTHENTICATE", "IDLE"):
                    parser.expect_continuation()
            else:
                assert isinstance(event, ContinuationLine)
        else:
            raise AssertionError("parser made no progress")
    return events


def fuzz_mime(data: bytes) -> None:
    """Compute everything FETCH and SEARCH need from ``data``; nothing may raise."""
    tree = mime.parse(data)
    mime.body_structure(tree)
    mime.body_structure(tree, extensible=False)
    mime.envelope(tree)
    mime.text_contains(tree, "x", include_headers=True)
    mime.header_contains(tree, "SUBJECT", "x")
    mime.sent_date(tree)


def spliced_seeds():  # type: ignore[no-untyped-def]
    """Hypothesis strategy: a seed with a random slice replaced by random bytes."""
    from hypothesis import strategies as st

    @st.composite
    def splice(draw):  # type: ignore[no-untyped-def]
        seed = draw(st.sampled_from(SEEDS))
        start = draw(st.integers(0, len(seed)))
        end = draw(st.integers(start, len(seed)))
        return b"\x03" + seed[:start] + draw(st.binary(max_size=20)) + seed[end:]

    return splice()


def _run_hypothesis() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    inputs = st.one_of(st.binary(max_size=600), spliced_seeds())

    @settings(max_examples=5000, deadline=None)
    @given(inputs)
    def run(data: bytes) -> None:
        fuzz_parser(data)
        fuzz_mime(data)

    run()
    print("fuzz: 5000 hypothesis examples passed")


def main() -> None:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        _run_hypothesis()
        return

    def target(data: bytes) -> None:
        fuzz_parser(data)
        fuzz_mime(data)

    # The modules are imported already, so instrument every loaded function
    # to give the fuzzer coverage feedback.
    atheris.instrument_all()
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
