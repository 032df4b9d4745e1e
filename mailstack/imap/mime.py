"""MIME structure of stored messages for FETCH and SEARCH, computed from the raw bytes.

The message is stored exactly as received, so everything here must cope with
whatever arrived: bare LF line ends, missing boundaries, a Content-Type
without a subtype, 8-bit header text, parts nested thousands deep. The
rules are:

- :func:`parse` never raises on message content (the fuzz target in
  ``tests/fuzz_imap_parser.py`` and the hypothesis tests check this). A header line without a
  colon is kept in the raw header but ignored as a field; an invalid
  Content-Type counts as ``text/plain; charset=us-ascii`` (RFC 2045 section
  5.2); a multipart body without any delimiter line becomes one part holding
  the whole body, so BODYSTRUCTURE always has the one body part that its
  grammar requires.
- Nesting of multiparts and message/rfc822 parts stops at ``max_depth``:
  below it a part is a leaf whatever its Content-Type says, and at most
  ``max_parts`` parts are split out of one message.
- Part numbers follow RFC 3501 section 6.4.5: the parts of a multipart are
  numbered from 1; a non-multipart message has the single part 1 (its body);
  the parts of an encapsulated message/rfc822 are addressed through the
  part that holds it (``2.1``), and ``2.HEADER``/``2.TEXT`` address its
  header and body, while ``2.MIME`` is the part's own MIME header.

Public functions: :func:`parse` (a :class:`MimePart` tree),
:func:`envelope`, :func:`body_structure` (BODYSTRUCTURE, or BODY with
``extensible=False``), :func:`body_section` (``BODY[section]``, None when the
section does not exist), :func:`fetch_section` (the same from raw bytes, with
a fast path for sections that need no MIME parsing), :func:`partial`,
:func:`section_value` (NIL or a literal), :func:`split_header`; and for SEARCH :func:`decode_header`,
:func:`header_values`, :func:`header_contains`, :func:`text_contains` and
:func:`sent_date`.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.errors
import email.header
import email.utils
import quopri
import re
from collections.abc import Iterator

from mailstack.imap.commands import Section, SectionSpecifier
from mailstack.imap.response import NIL, literal, nstring, string

__all__ = [
    "MimePart",
    "body_section",
    "body_structure",
    "decode_header",
    "envelope",
    "fetch_section",
    "header_contains",
    "header_values",
    "parse",
    "partial",
    "sent_date",
    "split_header",
    "text_contains",
    "MAX_DEPTH",
    "MAX_PARTS",
]

#: Deepest nesting of multipart and message/rfc822 parts that is parsed.
MAX_DEPTH = 32
#: Most parts split out of one message; further delimiters are left in the last part's body.
MAX_PARTS = 5000

_HEADER_END = re.compile(rb"\r?\n\r?\n")


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """Split a message into its header (with the blank line that ends it) and its body.

    A message without a blank line is all header. A message that starts with a
    blank line has that line as its header.
    """
    if data.startswith(b"\r\n"):
        return data[:2], data[2:]
    if data.startswith(b"\n"):
        return data[:1], data[1:]
    match = _HEADER_END.search(data)
    if match is None:
        return data, b""
    return data[: match.end()], data[match.end() :]


# A field starts a line with its name and a colon; the lines after it that
# start with a space or tab continue it. Lines of any other form are ignored.
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)(?:\n|\Z)", re.MULTILINE)
_FOLD = re.compile(rb"\r?\n(?=[ \t])")


def _header_fields(header: bytes) -> list[tuple[str, bytes, bytes]]:
    """Return ``(NAME, raw lines, unfolded value)`` for each field, in order."""
    fields: list[tuple[str, bytes, bytes]] = []
    for match in _FIELD.finditer(header):
        value = match.group(2)
        if b"\n" in value:
            value = _FOLD.sub(b"", value)
        fields.append((match.group(1).decode("ascii").upper(), match.group(), value.strip(b" \t\r\n")))
    return fields


# --- Content-Type and other structured fields ---------------------------------------

_TOKEN = re.compile(rb'[^\x00-\x20()<>@,;:\\"/\[\]?=\x7f]+')
_PARAMETER_VALUE = re.compile(rb'[^;\s"]+')
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


def _starts_with_field(part: bytes) -> bool:
    return part[:1] in (b"\r", b"\n") or _FIELD_NAME.match(part) is not None


def _skip_cfws(value: bytes, pos: int) -> int:
    length = len(value)
    while pos < length:
        char = value[pos]
        if char in b" \t\r\n":
            pos += 1
        elif char == 0x28:  # a comment, possibly nested
            depth = 0
            while pos < length:
                char = value[pos]
                if char == 0x5C:
                    pos += 2
                    continue
                if char == 0x28:
                    depth += 1
                elif char == 0x29:
                    depth -= 1
                    if depth == 0:
                        pos += 1
                        break
                pos += 1
        else:
            break
    return pos


def _read_quoted(value: bytes, pos: int) -> tuple[bytes, int]:
    out = bytearray()
    pos += 1
    length = len(value)
    while pos < length:
        char = value[pos]
        if char == 0x22:
            return bytes(out), pos + 1
        if char == 0x5C and pos + 1 < length:
            pos += 1
            char = value[pos]
        out.append(char)
        pos += 1
    return bytes(out), pos


def _parse_parameters(value: bytes, pos: int) -> list[tuple[bytes, bytes]]:
    """Parse ``; name=value`` pairs, skipping any that are malformed."""
    params: list[tuple[bytes, bytes]] = []
    length = len(value)
    while pos < length:
        pos = _skip_cfws(value, pos)
        if pos >= length:
            break
        if value[pos] != 0x3B:
            # Junk between parameters: skip to the next semicolon.
            next_semicolon = value.find(b";", pos)
            if next_semicolon < 0:
                break
            pos = next_semicolon
        pos = _skip_cfws(value, pos + 1)
        match = _TOKEN.match(value, pos)
        if match is None:
            continue
        name = match.group()
        pos = _skip_cfws(value, match.end())
        if pos >= length or value[pos] != 0x3D:
            continue
        pos = _skip_cfws(value, pos + 1)
        if pos < length and value[pos] == 0x22:
            param_value, pos = _read_quoted(value, pos)
        else:
            match = _PARAMETER_VALUE.match(value, pos)
            if match is None:
                continue
            param_value = match.group()
            pos = match.end()
        if len(params) < 64:
            params.append((name, param_value))
    return params


def _parse_content_type(value: bytes | None, default: tuple[bytes, bytes]) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    if value is None:
        if default == (b"text", b"plain"):
            return b"text", b"plain", [(b"charset", b"us-ascii")]
        return default[0], default[1], []
    pos = _skip_cfws(value, 0)
    major = _TOKEN.match(value, pos)
    if major is None:
        return b"text", b"plain", [(b"charset", b"us-ascii")]
    pos = _skip_cfws(value, major.end())
    if pos >= len(value) or value[pos] != 0x2F:
        return b"text", b"plain", [(b"charset", b"us-ascii")]
    pos = _skip_cfws(value, pos + 1)
    minor = _TOKEN.match(value, pos)
    if minor is None:
        return b"text", b"plain", [(b"charset", b"us-ascii")]
    return major.group(), minor.group(), _parse_parameters(value, minor.end())


def _parse_disposition(value: bytes | None) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    if value is None:
        return None
    pos = _skip_cfws(value, 0)
    match = _TOKEN.match(value, pos)
    if match is None:
        return None
    return match.group(), _parse_parameters(value, match.end())


# --- the part tree -------------------------------------------------------------------------


class MimePart:
    """One node of a message's MIME tree.

    ``header`` and ``body`` are slices of the stored bytes. ``children`` contains
    the parts of a multipart, ``message`` the parsed encapsulated message of a
    message/rfc822 part (both empty for a leaf).
    """

    __slots__ = ("header", "body", "fields", "_first_values", "maintype", "subtype", "params", "children", "message")

    def __init__(self, header: bytes, body: bytes, default_type: tuple[bytes, bytes], depth: int, budget: list[int]) -> None:
        self.header = header
        self.body = body
        self.fields = _header_fields(header)
        self._first_values: dict[str, bytes] = {}
        for field_name, _, value in self.fields:
            self._first_values.setdefault(field_name, value)
        maintype, subtype, params = _parse_content_type(self.field(b"CONTENT-TYPE"), default_type)
        self.maintype = maintype
        self.subtype = subtype
        self.params = params
        self.children: list[MimePart] = []
        self.message: MimePart | None = None
        lower_type = maintype.lower()
        if depth >= MAX_DEPTH:
            if lower_type == b"multipart" or lower_type == b"message":
                # Too deep to parse: describe it as opaque data, because a
                # "multipart" or "message/rfc822" leaf is not valid in BODYSTRUCTURE.
                self.maintype, self.subtype, self.params = b"application", b"octet-stream", []
            return
        if lower_type == b"multipart":
            self._split_multipart(depth, budget)
        elif lower_type == b"message" and subtype.lower() == b"rfc822":
            # Only message/rfc822 is parsed: RFC 3501's BODYSTRUCTURE grammar
            # has the envelope form for it alone, so message/global stays a leaf.
            budget[0] -= 1
            if budget[0] <= 0:
                self.maintype, self.subtype, self.params = b"application", b"octet-stream", []
            else:
                part_header, part_body = split_header(body)
                self.message = MimePart(part_header, part_body, (b"text", b"plain"), depth + 1, budget)

    def field(self, name: bytes) -> bytes | None:
        """Return the unfolded value of the first field called ``name`` (upper case), or None."""
        return self._first_values.get(name.decode("ascii"))

    def param(self, name: bytes) -> bytes | None:
        """Return a Content-Type parameter by case-insensitive name."""
        wanted = name.lower()
        for key, value in self.params:
            if key.lower() == wanted:
                return value
        return None

    @property
    def is_multipart(self) -> bool:
        return bool(self.children)

    def _split_multipart(self, depth: int, budget: list[int]) -> None:
        boundary = self.param(b"boundary")
        default = (b"message", b"rfc822") if self.subtype.lower() == b"digest" else (b"text", b"plain")
        bodies = _split_body(self.body, boundary, budget) if boundary else []
        if not bodies:
            # No delimiter: keep the whole body as a single part so that the
            # structure stays valid and no byte of the message is hidden.
            bodies = [self.body]
        for part in bodies:
            if _starts_with_field(part):
                part_header, part_body = split_header(part)
            else:
                # No header field and no blank line: the part is all body.
                part_header, part_body = b"", part
            self.children.append(MimePart(part_header, part_body, default, depth + 1, budget))

    def walk(self) -> Iterator[MimePart]:
        """Yield this part and every part below it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()
        if self.message is not None:
            yield from self.message.walk()


def _split_body(body: bytes, boundary: bytes, budget: list[int]) -> list[bytes]:
    delimiter = re.compile(rb"(?:^|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r?\n|$)", re.MULTILINE)
    parts: list[bytes] = []
    start: int | None = None
    # The line break before a delimiter belongs to the delimiter (RFC 2046
    # section 5.1.1), so the pattern consumes it and it is not part of the body.
    for match in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start : match.start()])
            budget[0] -= 1
            if budget[0] <= 0:
                parts[-1] = body[start:]
                return parts
        if match.group(1):
            return parts
        start = match.end()
    if start is not None:
        parts.append(body[start:])
    return parts


def parse(data: bytes) -> MimePart:
    """Parse a stored message into its MIME tree; never raises on message content."""
    header, body = split_header(data)
    return MimePart(header, body, (b"text", b"plain"), 0, [MAX_PARTS])


# --- ENVELOPE ---------------------------------------------------------------------------


def _split_addresses(value: bytes) -> list[tuple[bytes, bool]]:
    """Split an address list at top-level commas and group delimiters.

    Returns ``(text, is_group_delimiter)`` items. A group delimiter is a group
    start (text ends with ':') or a group end (text is ';').
    """
    items: list[tuple[bytes, bool]] = []
    start = 0
    pos = 0
    length = len(value)
    angle = False
    while pos < length:
        char = value[pos]
        if char == 0x22:
            _, pos = _read_quoted(value, pos)
            continue
        if char == 0x28:
            pos = _skip_cfws(value, pos)
            continue
        if char == 0x5B:
            end = value.find(b"]", pos)
            pos = length if end < 0 else end + 1
            continue
        if char == 0x3C:
            angle = True
        elif char == 0x3E:
            angle = False
        elif char == 0x2C and not angle:
            items.append((value[start:pos], False))
            start = pos + 1
        elif char == 0x3A and not angle:
            items.append((value[start : pos + 1], True))
            start = pos + 1
        elif char == 0x3B and not angle:
            items.append((value[start:pos], False))
            items.append((b";", True))
            start = pos + 1
        pos += 1
    items.append((value[start:], False))
    return items


def _strip_comments(value: bytes) -> bytes:
    out = bytearray()
    pos = 0
    length = len(value)
    while pos < length:
        char = value[pos]
        if char == 0x22:
            _, end = _read_quoted(value, pos)
            out += value[pos:end]
            pos = end
        elif char == 0x28:
            pos = _skip_cfws(value, pos)
            out += b" "
        else:
            out.append(char)
            pos += 1
    return bytes(out)


def _remove_unquoted_space(value: bytes) -> bytes:
    out = bytearray()
    pos = 0
    length = len(value)
    while pos < length:
        char = value[pos]
        if char == 0x22:
            _, end = _read_quoted(value, pos)
            out += value[pos:end]
            pos = end
            continue
        if char not in b" \t\r\n":
            out.append(char)
        pos += 1
    return bytes(out)


def _unquote_phrase(phrase: bytes) -> bytes:
    phrase = phrase.strip()
    if len(phrase) >= 2 and phrase[:1] == b'"':
        unquoted, end = _read_quoted(phrase, 0)
        if end == len(phrase):
            return unquoted
    return re.sub(rb"\s+", b" ", phrase)


def _address(text: bytes) -> bytes | None:
    text = text.strip()
    if not text:
        return None
    name: bytes | None = None
    route: bytes | None = None
    open_angle = text.rfind(b"<")
    if open_angle >= 0:
        phrase = _unquote_phrase(_strip_comments(text[:open_angle]))
        name = phrase or None
        close_angle = text.find(b">", open_angle)
        spec = text[open_angle + 1 : close_angle if close_angle >= 0 else len(text)]
        if spec.startswith(b"@") and b":" in spec:
            route, spec = spec.split(b":", 1)
    else:
        spec = text
    spec = _remove_unquoted_space(_strip_comments(spec))
    local, at, domain = spec.rpartition(b"@")
    if not at:
        local, domain = spec, b""
    if not local and not domain and name is None:
        return None
    return b"(" + b" ".join((nstring(name), nstring(route), string(local), string(domain))) + b")"


def _address_list(value: bytes | None) -> bytes:
    if value is None:
        return NIL
    encoded: list[bytes] = []
    in_group = False
    for text, delimiter in _split_addresses(value):
        if delimiter and text == b";":
            if in_group:
                encoded.append(b"(NIL NIL NIL NIL)")
                in_group = False
            continue
        if delimiter:
            if in_group:
                encoded.append(b"(NIL NIL NIL NIL)")
            group_name = _unquote_phrase(_strip_comments(text[:-1]))
            encoded.append(b"(NIL NIL " + string(group_name) + b" NIL)")
            in_group = True
            continue
        address = _address(text)
        if address is not None:
            encoded.append(address)
    if in_group:
        encoded.append(b"(NIL NIL NIL NIL)")
    if not encoded:
        return NIL
    return b"(" + b"".join(encoded) + b")"


def envelope(part: MimePart) -> bytes:
    """Return the ENVELOPE of a message (RFC 3501 section 7.4.2) as encoded bytes.

    Header values are given raw, unfolded: encoded-words stay for the client
    to decode. Sender and Reply-To default to From when absent.
    """
    from_ = _address_list(part.field(b"FROM"))
    sender = part.field(b"SENDER")
    reply_to = part.field(b"REPLY-TO")
    items = [
        nstring(part.field(b"DATE")),
        nstring(part.field(b"SUBJECT")),
        from_,
        _address_list(sender) if sender is not None else from_,
        _address_list(reply_to) if reply_to is not None else from_,
        _address_list(part.field(b"TO")),
        _address_list(part.field(b"CC")),
        _address_list(part.field(b"BCC")),
        nstring(part.field(b"IN-REPLY-TO")),
        nstring(part.field(b"MESSAGE-ID")),
    ]
    return b"(" + b" ".join(items) + b")"


# --- BODYSTRUCTURE -----------------------------------------------------------------------


def _param_list(params: list[tuple[bytes, bytes]]) -> bytes:
    if not params:
        return NIL
    return b"(" + b" ".join(string(name.upper()) + b" " + string(value) for name, value in params) + b")"


def _disposition(part: MimePart) -> bytes:
    parsed = _parse_disposition(part.field(b"CONTENT-DISPOSITION"))
    if parsed is None:
        return NIL
    kind, params = parsed
    return b"(" + string(kind) + b" " + _param_list(params) + b")"


def _language(part: MimePart) -> bytes:
    value = part.field(b"CONTENT-LANGUAGE")
    if value is None:
        return NIL
    tags = [tag for tag in re.split(rb"[\s,]+", _strip_comments(value)) if tag]
    if not tags:
        return NIL
    if len(tags) == 1:
        return string(tags[0])
    return b"(" + b" ".join(string(tag) for tag in tags) + b")"


def _line_count(body: bytes) -> int:
    # A last line without a line break still counts as a line.
    count = body.count(b"\n")
    if body and not body.endswith(b"\n"):
        count += 1
    return count


def body_structure(part: MimePart, extensible: bool = True) -> bytes:
    """Return BODYSTRUCTURE (``extensible``) or BODY of a part, always grammar-valid."""
    if part.children:
        inner = b"".join(body_structure(child, extensible) for child in part.children)
        items = [inner, string(part.subtype)]
        if extensible:
            boundary_params = _param_list(part.params)
            items += [boundary_params, _disposition(part), _language(part), nstring(part.field(b"CONTENT-LOCATION"))]
        return b"(" + b" ".join(items) + b")"

    encoding = part.field(b"CONTENT-TRANSFER-ENCODING")
    encoding_text = string(encoding.strip()) if encoding and encoding.strip() else b'"7BIT"'
    items = [
        string(part.maintype),
        string(part.subtype),
        _param_list(part.params),
        nstring(part.field(b"CONTENT-ID")),
        nstring(part.field(b"CONTENT-DESCRIPTION")),
        encoding_text,
        b"%d" % len(part.body),
    ]
    maintype = part.maintype.lower()
    if part.message is not None:
        items += [envelope(part.message), body_structure(part.message, extensible), b"%d" % _line_count(part.body)]
    elif maintype == b"text":
        items.append(b"%d" % _line_count(part.body))
    if extensible:
        items += [
            nstring(part.field(b"CONTENT-MD5")),
            _disposition(part),
            _language(part),
            nstring(part.field(b"CONTENT-LOCATION")),
        ]
    return b"(" + b" ".join(items) + b")"


# --- BODY[section] --------------------------------------------------------------------------


def _find_part(root: MimePart, numbers: tuple[int, ...]) -> MimePart | None:
    """Follow part numbers from a message; see the module docstring for the rules."""
    node = root
    for index, number in enumerate(numbers):
        container = node
        if index > 0:
            if node.message is not None:
                container = node.message
            elif not node.children:
                return None
        if container.children:
            if number > len(container.children):
                return None
            node = container.children[number - 1]
        elif number == 1 and (index == 0 or node.message is not None):
            node = container
        else:
            return None
    return node


def _select_fields(header: bytes, names: tuple[str, ...], exclude: bool) -> bytes:
    wanted = set(names)
    lines = [raw for name, raw, _ in _header_fields(header) if (name in wanted) != exclude]
    selected = b"".join(line if line.endswith(b"\n") else line + b"\r\n" for line in lines)
    return selected + b"\r\n"


def body_section(root: MimePart, section: Section, whole: bytes | None = None) -> bytes | None:
    """Return the bytes of ``BODY[section]``, or None when the section does not exist.

    ``whole`` is the full message, returned for ``BODY[]`` (the tree keeps
    only the header and body slices).
    """
    specifier = section.specifier
    if section.part:
        node = _find_part(root, section.part)
        if node is None:
            return None
        if specifier is None:
            return node.body
        if specifier is SectionSpecifier.MIME:
            return node.header
        if node.message is None:
            # HEADER and TEXT exist only for a message/rfc822 part.
            return None
        target = node.message
    else:
        if specifier is None:
            return whole if whole is not None else root.header + root.body
        target = root
    if specifier is SectionSpecifier.HEADER:
        return target.header
    if specifier is SectionSpecifier.TEXT:
        return target.body
    if specifier is SectionSpecifier.HEADER_FIELDS:
        return _select_fields(target.header, section.fields, exclude=False)
    if specifier is SectionSpecifier.HEADER_FIELDS_NOT:
        return _select_fields(target.header, section.fields, exclude=True)
    return None


def fetch_section(data: bytes, section: Section, tree: MimePart | None = None) -> bytes | None:
    """Return ``BODY[section]`` of a raw message, parsing MIME only when the section needs it."""
    if not section.part:
        if section.specifier is None:
            return data
        header, body = split_header(data)
        if section.specifier is SectionSpecifier.HEADER:
            return header
        if section.specifier is SectionSpecifier.TEXT:
            return body
        if section.specifier is SectionSpecifier.HEADER_FIELDS:
            return _select_fields(header, section.fields, exclude=False)
        if section.specifier is SectionSpecifier.HEADER_FIELDS_NOT:
            return _select_fields(header, section.fields, exclude=True)
    return body_section(tree if tree is not None else parse(data), section, data)


def partial(data: bytes | None, origin_length: tuple[int, int] | None) -> bytes | None:
    """Apply ``<origin.length>``: an origin past the end gives an empty string."""
    if data is None or origin_length is None:
        return data
    origin, length = origin_length
    return data[origin : origin + length]


def section_value(data: bytes | None) -> bytes:
    """Encode a fetched section: NIL for a missing one, otherwise a literal."""
    return NIL if data is None else literal(data)


# --- SEARCH helpers -----------------------------------------------------------------------------


def _decode_unlabelled(data: bytes) -> str:
    # Text without a usable charset label (no charset, US-ASCII carrying 8-bit
    # bytes, an unknown charset, raw 8-bit headers): UTF-8 when the bytes are
    # valid UTF-8, else Windows-1252, the most common legacy charset in mail.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def decode_header(value: bytes) -> str:
    """Decode a raw header value: RFC 2047 encoded-words, UTF-8 text (RFC 6532) or legacy 8-bit."""
    text = _decode_unlabelled(value)
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (email.errors.HeaderParseError, UnicodeError, LookupError, ValueError):
        return text


def header_values(part: MimePart, name: str) -> list[str]:
    """Return the decoded values of every field called ``name`` (case-insensitive)."""
    wanted = name.upper()
    return [decode_header(value) for field_name, _, value in part.fields if field_name == wanted]


def header_contains(part: MimePart, name: str, needle: str) -> bool:
    """SEARCH HEADER/FROM/TO/...: a case-insensitive substring of a decoded field value.

    An empty ``needle`` matches when the field is present. Both the decoded
    and the raw value are tried, so a search for an address inside an
    encoded display name still matches.
    """
    wanted = name.upper()
    folded = needle.casefold()
    for field_name, _, value in part.fields:
        if field_name != wanted:
            continue
        if not folded:
            return True
        if folded in decode_header(value).casefold() or folded in _decode_unlabelled(value).casefold():
            return True
    return False


def _decoded_body(part: MimePart) -> str:
    encoding = (part.field(b"CONTENT-TRANSFER-ENCODING") or b"").strip().lower()
    data = part.body
    if encoding == b"base64":
        cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
        if len(cleaned) % 4 == 1:
            # A lone last character cannot encode a byte: drop it.
            cleaned = cleaned[:-1]
        try:
            data = base64.b64decode(cleaned + b"=" * (-len(cleaned) % 4))
        except (binascii.Error, ValueError):
            data = part.body
    elif encoding == b"quoted-printable":
        data = quopri.decodestring(data)
    charset = (part.param(b"charset") or b"").decode("ascii", "replace").strip().lower()
    if charset not in ("", "us-ascii", "ascii"):
        try:
            return data.decode(charset, "replace")
        except LookupError:
            pass
    return _decode_unlabelled(data)


def text_contains(root: MimePart, needle: str, include_headers: bool = False) -> bool:
    """SEARCH BODY (or TEXT with ``include_headers``): a case-insensitive substring.

    Text parts are decoded from their transfer encoding and charset (an unknown
    charset falls back to UTF-8 with replacement); other parts are skipped.
    Headers of the message and of encapsulated messages count for TEXT.
    """
    folded = needle.casefold()
    if not folded:
        return True
    for part in root.walk():
        if include_headers and (part is root or part.message is None):
            for _, _, value in part.fields:
                if folded in decode_header(value).casefold():
                    return True
        if part.children or part.message is not None:
            continue
        maintype = part.maintype.lower()
        if maintype == b"text" or (maintype == b"message" and part.subtype.lower() != b"rfc822"):
            if folded in _decoded_body(part).casefold():
                return True
    return False


def sent_date(part: MimePart) -> datetime.date | None:
    """Return the date of the Date: field, in the field's own zone (SENTBEFORE and friends)."""
    value = part.field(b"DATE")
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value.decode("ascii", "replace"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return parsed.date() if parsed is not None else None
