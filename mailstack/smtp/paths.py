"""Parsing of the MAIL FROM and RCPT TO arguments: a path (RFC 5321 section 4.1.2) and parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 5321 section 4.5.3.1: 64 octets of local part, 255 of domain, 256 for a path with its brackets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
# qtextSMTP and quoted-pairSMTP: printable ASCII, with backslash escaping.
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_ADDRESS_LITERAL = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]\Z")
# A-d-l: an obsolete source route such as "@relay1,@relay2:", which is ignored.
_SOURCE_ROUTE = re.compile(r"@[^:,<>]+(?:,@[^:,<>]+)*:")
_PARAMETER = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(?:=[\x21-\x3c\x3e-\x7e]+)?\Z")


class PathError(ValueError):
    """The argument is not a valid path; the message says what is wrong."""


@dataclass(frozen=True)
class Path:
    """A parsed path; ``address`` is empty for the null path ``<>``."""

    address: str
    local_part: str
    domain: str

    @property
    def is_null(self) -> bool:
        return not self.address


NULL_PATH = Path("", "", "")


def _valid_local_part(local: str, utf8: bool) -> bool:
    if not local or len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART:
        return False
    if _DOT_STRING.match(local) or _QUOTED_STRING.match(local):
        return True
    if utf8 and not local.isascii():
        # RFC 6531: UTF-8 characters join atext; keep the dot-string shape.
        ascii_shape = "".join("a" if ord(ch) > 127 else ch for ch in local)
        return bool(_DOT_STRING.match(ascii_shape)) and local.isprintable()
    return False


def _valid_domain(domain: str, utf8: bool) -> bool:
    if not domain or len(domain.encode("utf-8", "surrogateescape")) > MAX_DOMAIN:
        return False
    if domain.startswith("["):
        return bool(_ADDRESS_LITERAL.match(domain))
    if not domain.isascii():
        if not utf8:
            return False
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    return all(_LABEL.match(label) for label in domain.rstrip(".").split("."))


def parse_mailbox(text: str, *, utf8: bool = False) -> Path:
    """Parse ``local-part@domain``; raise PathError when it is not valid."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise PathError("control character in address")
    local, at, domain = text.rpartition("@")
    if not at:
        raise PathError(f"address {text!r} has no domain")
    if not _valid_local_part(local, utf8):
        raise PathError(f"invalid local part in {text!r}")
    if not _valid_domain(domain, utf8):
        raise PathError(f"invalid domain in {text!r}")
    return Path(f"{local}@{domain}", local, domain)


def parse_path_argument(argument: str, keyword: str, *, utf8: bool = True) -> tuple[Path, list[str]]:
    """Split ``FROM:<path> params`` (``keyword`` is "FROM" or "TO") into the path and parameters.

    ``utf8`` allows non-ASCII addresses; the caller still checks that the
    client asked for SMTPUTF8 before using one. The null path is returned as
    NULL_PATH; whether it is allowed is the caller's decision. Raises PathError.
    """
    head, colon, rest = argument.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise PathError(f"expected {keyword}:<address>")
    rest = rest.lstrip(" ")
    if rest.startswith("<"):
        close = rest.find(">")
        if close < 0:
            raise PathError("missing '>' after the address")
        inner, params_text = rest[1:close], rest[close + 1 :]
        if params_text and not params_text.startswith(" "):
            raise PathError("a space must separate the address from its parameters")
        if close + 1 > MAX_PATH:
            raise PathError("path longer than 256 octets")
    else:
        # Tolerated: an address without angle brackets, as many old clients send it.
        inner, _, params_text = rest.partition(" ")
        if not inner:
            raise PathError(f"expected {keyword}:<address>")
    params = params_text.split()
    for param in params:
        if not _PARAMETER.match(param):
            raise PathError(f"invalid parameter {param!r}")
    if inner == "":
        return NULL_PATH, params
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end() :]
    if keyword == "TO" and inner.lower() == "postmaster":
        # RFC 5321 section 4.1.1.3: "Postmaster" without a domain must be accepted.
        return Path("postmaster", "postmaster", ""), params
    return parse_mailbox(inner, utf8=utf8), params


def split_parameters(params: list[str]) -> dict[str, str | None]:
    """Return the parameters as an upper-cased keyword to value mapping; raise PathError on a repeat."""
    result: dict[str, str | None] = {}
    for param in params:
        keyword, equals, value = param.partition("=")
        keyword = keyword.upper()
        if keyword in result:
            raise PathError(f"parameter {keyword} given twice")
        result[keyword] = value if equals else None
    return result
