"""SMTP replies as values: a basic code, an enhanced status code (RFC 3463) and text.

Handlers raise :class:`SMTPError` carrying a :class:`Reply` to answer a
command, or return a Reply; the session renders it at one place. Replies that aiosmtpd writes itself carry no enhanced code, so
:func:`add_enhanced_code` supplies one from :data:`DEFAULT_ENHANCED` before
any line goes out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The enhanced code given to a reply that was written without one, by basic code.
# RFC 3463 class and subject: 5.5.x protocol errors, 5.7.x security, 4.3.x system.
DEFAULT_ENHANCED: dict[int, str] = {
    211: "2.0.0",
    214: "2.0.0",
    220: "2.0.0",
    221: "2.0.0",
    235: "2.7.0",
    250: "2.0.0",
    251: "2.1.5",
    252: "2.0.0",
    421: "4.3.0",
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    455: "4.5.4",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    534: "5.7.9",
    535: "5.7.8",
    538: "5.7.11",
    550: "5.0.0",
    551: "5.1.6",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.0.0",
    555: "5.5.4",
}

# Intermediate replies (AUTH challenges, the DATA go-ahead) carry no enhanced code:
# RFC 2034 section 3 applies it to final replies only.
_INTERMEDIATE = (334, 354)

_REPLY_LINE = re.compile(r"^([2-5][0-9][0-9])([ -])(.*)$", re.DOTALL)
_ENHANCED = re.compile(r"^[245]\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply. ``close`` makes the session close the connection after sending it."""

    code: int
    enhanced: str
    text: str
    close: bool = False

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"invalid SMTP reply code {self.code}")
        if self.enhanced:
            if not _ENHANCED.match(self.enhanced) or self.enhanced[0] != str(self.code)[0]:
                raise ValueError(f"enhanced code {self.enhanced!r} does not match reply code {self.code}")
        if "\r" in self.text or "\n" in self.text:
            raise ValueError("reply text must be one line")

    def __str__(self) -> str:
        return self.render()

    def replace_text(self, text: str) -> Reply:
        """Return this reply with other text, for example with a queue id in it."""
        return Reply(self.code, self.enhanced, text, self.close)

    @property
    def is_success(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    def render(self) -> str:
        """Return the reply line without CRLF."""
        if self.enhanced:
            return f"{self.code} {self.enhanced} {self.text}"
        return f"{self.code} {self.text}"


class SMTPError(Exception):
    """Raised by a handler hook to answer the current command with ``reply``."""

    def __init__(self, reply: Reply, reason: str = "") -> None:
        super().__init__(reason or reply.render())
        self.reply = reply
        # For the log only, never sent to the peer.
        self.reason = reason


def add_enhanced_code(line: str) -> str:
    """Return ``line`` with an enhanced status code after the basic code, unless it has one.

    Lines that are not replies, intermediate replies and codes without a
    default are returned unchanged.
    """
    match = _REPLY_LINE.match(line)
    if match is None:
        return line
    code = int(match.group(1))
    if code in _INTERMEDIATE:
        return line
    text = match.group(3)
    if _ENHANCED.match(text):
        return line
    enhanced = DEFAULT_ENHANCED.get(code)
    if enhanced is None:
        return line
    return f"{match.group(1)}{match.group(2)}{enhanced} {text}" if text else f"{match.group(1)}{match.group(2)}{enhanced}"


def printable(line: str) -> str:
    """Return ``line`` with every character outside printable US-ASCII replaced by "?".

    RFC 5321 section 4.2 allows only printable US-ASCII in reply text, and
    replies echo client input (an unknown command, a VRFY argument, the EHLO
    name), so a CR or LF in that input could otherwise end a reply line early.
    """
    return "".join(char if " " <= char <= "~" else "?" for char in line)


# Replies both listeners send, named by situation.
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
BAD_SEQUENCE_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
BAD_SEQUENCE_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
BAD_SEQUENCE_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
BAD_SEQUENCE_NEED_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
BAD_ADDRESS_SYNTAX = Reply(501, "5.1.3", "Bad address syntax")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long: more than 998 octets before CRLF")
BARE_LF_IN_COMMAND = Reply(500, "5.5.2", "Syntax error: bare LF in command line, lines must end with CRLF")
BARE_NEWLINE = Reply(550, "5.6.0", "Bare CR or LF in message data: lines must end with CRLF")
PARAMETER_UNKNOWN = Reply(555, "5.5.4", "MAIL FROM or RCPT TO parameter not recognized")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded", close=True)
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down", close=True)
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later", close=True)
TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0", "Too many connections from your address, try again later", close=True)


def internal_error(reference: str) -> Reply:
    """Return the reply for an unexpected failure: the peer gets only the log reference."""
    return Reply(451, "4.3.0", f"Internal error, reference {reference}; try again later")
