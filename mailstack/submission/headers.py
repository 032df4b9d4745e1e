"""The trace and missing header fields that the submission server adds in front of a message."""

from __future__ import annotations

import datetime as dt
import email.utils
import random
import re

_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# Characters allowed in the client's HELO name when it is copied into a header.
_SAFE_HELO = re.compile(r"^[A-Za-z0-9.:\[\]_-]{1,255}$")
# Message-IDs must be unique, not secret; see the queue ids in handler.py.
_message_ids = random.Random()


def present_fields(message: bytes) -> set[str]:
    """Return the lower-cased names of the header fields at the start of ``message``.

    The header section ends at the first empty line, or at the first line that
    is neither a field nor a folded continuation.
    """
    names: set[str] = set()
    end = message.find(b"\r\n\r\n")
    header_section = message if end < 0 else message[: end + 2]
    for line in header_section.split(b"\r\n"):
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            continue
        match = _FIELD_NAME.match(line)
        if match is None:
            break
        names.add(match.group(1).decode("ascii").lower())
    return names


def received_field(
    *,
    helo: str,
    client_address: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    tls_version: str | None,
    tls_cipher: str | None,
    recipients: list[str],
    now: dt.datetime,
) -> bytes:
    """Return a Received field (RFC 5321 section 4.4) ending in CRLF.

    ``protocol`` is the RFC 3848 / RFC 6531 "with" keyword, such as ESMTPSA.
    The recipient is named only when there is one, as Postfix does.
    """
    helo_name = helo if _SAFE_HELO.match(helo or "") else "[invalid]"
    lines = [
        f"Received: from {helo_name} ([{client_address}])",
        f"\tby {hostname} (mailstack) with {protocol} id {queue_id}",
    ]
    if tls_version:
        lines.append(f"\t(using {tls_version} with cipher {tls_cipher or 'unknown'})")
    date = email.utils.format_datetime(now)
    if len(recipients) == 1 and recipients[0].isascii():
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def with_protocol_keyword(*, esmtp: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """Return the "with" keyword of RFC 3848 (ESMTPSA and friends) or RFC 6531 (UTF8SMTPSA)."""
    if not esmtp:
        return "SMTP"
    keyword = "UTF8SMTP" if smtputf8 else "ESMTP"
    if tls:
        keyword += "S"
    if authenticated:
        keyword += "A"
    return keyword


def prepend_fields(message: bytes, *, received: bytes, hostname: str, now: dt.datetime) -> bytes:
    """Return ``message`` with Received in front, plus Message-ID and Date when it has none.

    Every byte of ``message`` is kept as it is.
    """
    present = present_fields(message)
    added = [received]
    if "message-id" not in present:
        added.append(f"Message-ID: <{_message_ids.getrandbits(96):024x}@{hostname}>\r\n".encode("ascii"))
    if "date" not in present:
        added.append(f"Date: {email.utils.format_datetime(now)}\r\n".encode("ascii"))
    return b"".join(added) + message
