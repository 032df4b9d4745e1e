"""Modified UTF-7 for mailbox names (RFC 3501 section 5.1.3).

Printable US-ASCII other than ``&`` stands for itself, ``&`` is written
``&-``, and every other run of characters is written as ``&``, the UTF-16BE
bytes in base64 with ``,`` in place of ``/`` and without padding, then ``-``.

:func:`decode` is strict: it raises :class:`InvalidModifiedUTF7` (a
ValueError) for 8-bit or control characters, an unterminated shift, base64
that spells a printable ASCII character, non-zero padding bits, an odd
number of bytes or an unpaired surrogate. A strict decoder keeps one name
from having two spellings.
"""

from __future__ import annotations

import base64
import binascii

__all__ = ["InvalidModifiedUTF7", "decode", "encode"]


class InvalidModifiedUTF7(ValueError):
    """The text is not valid modified UTF-7."""


def _is_direct(char: str) -> bool:
    return "\x20" <= char <= "\x7e"


def encode(name: str) -> str:
    """Encode a mailbox name to modified UTF-7."""
    if name.isascii() and "&" not in name and name.isprintable():
        return name
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be", "surrogatepass")
            text = base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",")
            out.append("&" + text + "-")
            pending.clear()

    for char in name:
        if _is_direct(char):
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def decode(text: str | bytes) -> str:
    """Decode modified UTF-7, raising :class:`InvalidModifiedUTF7` when it is not valid."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidModifiedUTF7("mailbox name contains 8-bit characters; use modified UTF-7") from None
    if "&" not in text:
        if not all(_is_direct(char) for char in text):
            raise InvalidModifiedUTF7("mailbox name contains a control character")
        return text
    out: list[str] = []
    index = 0
    length = len(text)
    while index < length:
        char = text[index]
        if char != "&":
            if not _is_direct(char):
                raise InvalidModifiedUTF7("mailbox name contains a control or 8-bit character")
            out.append(char)
            index += 1
            continue
        end = text.find("-", index + 1)
        if end < 0:
            raise InvalidModifiedUTF7("unterminated '&' shift in mailbox name")
        if end == index + 1:
            out.append("&")
        else:
            out.append(_decode_shifted(text[index + 1 : end]))
        index = end + 1
    return "".join(out)


def _decode_shifted(chunk: str) -> str:
    if len(chunk) % 4 == 1 or "/" in chunk or "=" in chunk:
        raise InvalidModifiedUTF7("invalid base64 in mailbox name")
    padded = chunk.replace(",", "/") + "=" * (-len(chunk) % 4)
    try:
        data = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidModifiedUTF7("invalid base64 in mailbox name") from None
    # Re-encoding must give the same text, which rejects non-zero padding bits.
    if base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",") != chunk:
        raise InvalidModifiedUTF7("non-canonical base64 in mailbox name")
    if len(data) % 2:
        raise InvalidModifiedUTF7("odd number of bytes in a UTF-16 run of the mailbox name")
    try:
        decoded = data.decode("utf-16-be")
    except UnicodeDecodeError:
        raise InvalidModifiedUTF7("unpaired UTF-16 surrogate in mailbox name") from None
    if any(_is_direct(char) for char in decoded):
        raise InvalidModifiedUTF7("printable ASCII character encoded in base64 in mailbox name")
    return decoded
