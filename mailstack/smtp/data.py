"""Reading the DATA section of an SMTP transaction, free of I/O.

Feed the bytes that follow the 354 reply to :class:`DataReader` as they arrive.
``feed`` returns None while the end of data is not seen yet, and the bytes after
it (pipelined commands) once it is. The end of data is only CRLF "." CRLF; a
bare LF or a bare CR never ends the data, so the classic smuggling sequences
(``\\n.\\r\\n``, ``\\r.\\r``, ``\\n.\\n``, ``\\r\\n.\\r``) stay inside the message, and
the message is then rejected as a whole because it holds a bare CR or LF.

Each limit is checked as the data streams by, and an oversized message is not
kept in memory; the caller reads to the final dot and sends exactly one reply,
taken from :attr:`DataReader.error`.
"""

from __future__ import annotations

from mailstack.smtp import replies
from mailstack.smtp.replies import Reply

END = b"\r\n.\r\n"
CRLF = b"\r\n"

# RFC 5321 section 4.5.3.1.6: a text line has at most 998 octets before CRLF.
MAX_LINE_OCTETS = 998


class DataReader:
    """Collects one message: removes dot-stuffing and checks size, line length and line ends."""

    def __init__(self, max_size: int, max_line: int = MAX_LINE_OCTETS) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0
        self.too_big = False
        self.line_too_long = False
        self.bare_newline = False
        self.done = False
        self._parts: list[bytes] = []
        # The unfinished last line, and whether it starts at the start of a line
        # (it does not after an overlong line was cut short).
        self._pending = b""
        self._at_line_start = True

    @property
    def error(self) -> Reply | None:
        """The one reply for a message that broke a rule, or None when it is acceptable."""
        if self.too_big:
            return replies.SIZE_EXCEEDED
        if self.line_too_long:
            return replies.LINE_TOO_LONG
        if self.bare_newline:
            return replies.BARE_NEWLINE
        return None

    @property
    def content(self) -> bytes:
        """The message after dot-stuffing was removed; empty when a limit was exceeded."""
        if self.too_big or self.line_too_long:
            return b""
        return b"".join(self._parts)

    def feed(self, chunk: bytes) -> bytes | None:
        """Take the next bytes; return the bytes after the end of data once it is found."""
        if self.done:
            raise RuntimeError("DataReader.feed() after the end of data")
        buffer = self._pending + chunk if self._pending else chunk
        # When the buffer starts at the start of a line, a virtual CRLF before it
        # lets one search find a "." line there as well.
        prefix = CRLF if self._at_line_start else b"\0\0"
        found = (prefix + buffer).find(END)
        if found >= 0:
            # found is where the "." line starts in buffer.
            self._pending = b""
            self._take_lines(buffer[:found])
            self.done = True
            return buffer[found + 3 :]
        last_line_end = buffer.rfind(CRLF)
        if last_line_end >= 0:
            self._take_lines(buffer[: last_line_end + 2])
            self._pending = buffer[last_line_end + 2 :]
            self._at_line_start = True
        else:
            self._pending = buffer
        if len(self._pending) > self.max_line + 2:
            # A line longer than the limit even before its CRLF arrived: remember
            # that, and keep only its last two octets, which are all that can
            # matter for finding the CRLF that ends it.
            self.line_too_long = True
            self._parts.clear()
            self._pending = self._pending[-2:]
            self._at_line_start = False
        return None

    def _take_lines(self, lines: bytes) -> None:
        # lines is whole lines, each ending with CRLF, starting at a line start.
        if not lines:
            return
        line_ends = lines.count(CRLF)
        if lines.count(b"\r") != line_ends or lines.count(b"\n") != line_ends:
            self.bare_newline = True
        if lines[:1] == b".":
            lines = lines[1:]
        lines = lines.replace(b"\r\n.", CRLF)
        self.size += len(lines)
        if self.size > self.max_size:
            self.too_big = True
        if not self.line_too_long and len(lines) > self.max_line + 2:
            if max(map(len, lines.split(CRLF))) > self.max_line:
                self.line_too_long = True
        if self.too_big or self.line_too_long:
            self._parts.clear()
            return
        self._parts.append(lines)
