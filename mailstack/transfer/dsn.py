"""Delivery status notifications (RFC 3464) for failed and delayed deliveries.

A notification is a ``multipart/report; report-type=delivery-status`` message
of three parts: a text for people, the ``message/delivery-status`` fields for
programs, and the headers of the original message as ``text/rfc822-headers``.
It travels with the null reverse path, so it carries ``Return-Path: <>`` and
never causes a notification itself.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

CRLF = b"\r\n"
# Original headers beyond this size are cut at a line boundary (RFC 3462 allows
# returning only part of the message).
MAX_RETURNED_HEADERS = 64 * 1024


@dataclass(frozen=True)
class RecipientStatus:
    """The per-recipient fields of one notification."""

    recipient: str
    status: str  # RFC 3463, for example "5.1.1"
    diagnostic: str  # the peer's reply or a local explanation
    remote_mta: str | None = None
    smtp_reply: bool = False  # True when ``diagnostic`` is a reply from ``remote_mta``
    description: str = ""  # the line for people, for example "host said: ... (in reply to RCPT TO)"


def _clean(text: str) -> str:
    """Return ``text`` on one line, printable ASCII only, so it fits a header field."""
    text = " ".join(text.split())
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


def _address_text(address: str) -> str:
    """Return an address type and value for Final-Recipient (RFC 3464; RFC 6533 for UTF-8).

    A non-ASCII address gets the "utf-8" type with each non-ASCII character
    written as ``\\x{HEX}``, so the report stays 7-bit.
    NOTE: which ASCII characters RFC 6533 also requires escaped here was not
    checked; only the backslash and controls are.
    """
    if address.isascii():
        return f"rfc822; {_clean(address)}"
    escaped = "".join(ch if 32 < ord(ch) < 127 and ch != "\\" else f"\\x{{{ord(ch):X}}}" for ch in address)
    return f"utf-8; {escaped}"


def original_headers(data: bytes) -> bytes:
    """Return the header section of a message, up to MAX_RETURNED_HEADERS bytes."""
    end = data.find(b"\r\n\r\n")
    headers = data if end < 0 else data[: end + 2]
    if len(headers) > MAX_RETURNED_HEADERS:
        cut = headers.rfind(b"\r\n", 0, MAX_RETURNED_HEADERS)
        headers = headers[: cut + 2] if cut > 0 else b""
    return headers


def build_dsn(
    *,
    action: Literal["failed", "delayed"],
    reporting_mta: str,
    envelope_sender: str,
    queue_id: str,
    arrival: dt.datetime,
    original: bytes,
    recipients: Sequence[RecipientStatus],
    now: dt.datetime,
    will_retry_until: dt.datetime | None = None,
) -> bytes:
    """Build the bytes of a notification for the sender of a queued message."""
    boundary = f"=_dsn_{secrets.token_hex(12)}"
    failed = action == "failed"
    subject = "Undelivered Mail Returned to Sender" if failed else "Delayed Mail (still being retried)"
    headers = [
        "Return-Path: <>",
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{envelope_sender}>",
        f"Subject: {subject}",
        f"Date: {email.utils.format_datetime(now)}",
        f"Message-ID: <{queue_id}.{secrets.token_hex(6)}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]

    human = _human_text(action, reporting_mta, queue_id, recipients, will_retry_until)

    per_message = [
        f"Reporting-MTA: dns; {reporting_mta}",
        # An extension field (RFC 3464 section 2.4); Original-Envelope-Id is only for an ENVID.
        f"X-Mailstack-Queue-ID: {queue_id}",
        f"Arrival-Date: {email.utils.format_datetime(arrival)}",
    ]
    blocks = ["\r\n".join(per_message)]
    for status in recipients:
        fields = [
            f"Final-Recipient: {_address_text(status.recipient)}",
            f"Action: {action}",
            f"Status: {status.status}",
        ]
        if status.remote_mta:
            fields.append(f"Remote-MTA: dns; {_clean(status.remote_mta)}")
        kind = "smtp" if status.smtp_reply else "x-local"
        fields.append(f"Diagnostic-Code: {kind}; {_clean(status.diagnostic)}")
        fields.append(f"Last-Attempt-Date: {email.utils.format_datetime(now)}")
        if will_retry_until is not None and not failed:
            fields.append(f"Will-Retry-Until: {email.utils.format_datetime(will_retry_until)}")
        blocks.append("\r\n".join(fields))

    returned = original_headers(original)
    parts = [
        "\r\n".join(headers).encode("ascii", "backslashreplace"),
        b"",
        b"This is a MIME-encapsulated message.",
        b"",
        f"--{boundary}".encode(),
        b'Content-Type: text/plain; charset="utf-8"',
        b"Content-Transfer-Encoding: 8bit",
        b"Content-Description: Notification",
        b"",
        human.encode("utf-8"),
        f"--{boundary}".encode(),
        b"Content-Type: message/delivery-status",
        b"Content-Description: Delivery report",
        b"",
        "\r\n\r\n".join(blocks).encode("ascii"),
        b"",
        f"--{boundary}".encode(),
        b"Content-Type: text/rfc822-headers",
        b"Content-Transfer-Encoding: 8bit" if not returned.isascii() else b"Content-Transfer-Encoding: 7bit",
        b"Content-Description: Headers of the undelivered message",
        b"",
        returned.rstrip(b"\r\n"),
        f"--{boundary}--".encode(),
        b"",
    ]
    return CRLF.join(parts)


def _human_text(
    action: str,
    reporting_mta: str,
    queue_id: str,
    recipients: Sequence[RecipientStatus],
    will_retry_until: dt.datetime | None,
) -> str:
    if action == "failed":
        lines = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "Your message could not be delivered to one or more recipients.",
            "It is attached below (headers only). The mail system said:",
        ]
    else:
        lines = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "Your message has not been delivered yet to one or more recipients.",
            "The mail system will keep trying"
            + (f" until {email.utils.format_datetime(will_retry_until)}." if will_retry_until else "."),
            "You do not need to send the message again.",
        ]
    lines.append("")
    for status in recipients:
        lines.append(f"<{status.recipient}>: {' '.join((status.description or status.diagnostic).split())}")
    lines += ["", f"Queue id: {queue_id}", ""]
    return "\r\n".join(lines)
