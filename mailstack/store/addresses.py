"""Parsing and normalising of mailbox addresses as the store keeps them."""

from __future__ import annotations

import re

# RFC 5321 limits: 64 octets of local part, 255 of domain, 254 in a path.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_ADDRESS = 254

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class AddressError(ValueError):
    """An address that is not a plain local-part@domain."""


def normalize_domain(domain: str) -> str:
    """Return ``domain`` lower-cased, after checking it is a valid host name."""
    name = domain.strip().lower()
    if not name or len(name) > MAX_DOMAIN:
        raise AddressError(f"invalid domain {domain!r}")
    try:
        # IDNA: accept U-labels, store A-labels.
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise AddressError(f"invalid domain {domain!r}") from None
    labels = name.split(".")
    if len(labels) < 1 or not all(_LABEL.match(label) for label in labels):
        raise AddressError(f"invalid domain {domain!r}")
    return name


def split_address(address: str) -> tuple[str, str]:
    """Split ``address`` into a lower-cased (local part, domain) pair.

    Only dot-atom local parts are accepted; quoted local parts, source
    routes, bang paths and domain literals raise AddressError.
    """
    if not isinstance(address, str) or len(address) > MAX_ADDRESS or "@" not in address:
        raise AddressError(f"invalid address {address!r}")
    local, _, domain = address.rpartition("@")
    if not local or len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError(f"invalid local part in {address!r}")
    if not _DOT_ATOM.match(local) and not _is_utf8_local(local):
        raise AddressError(f"invalid local part in {address!r}")
    return local.lower(), normalize_domain(domain)


def _is_utf8_local(local: str) -> bool:
    # RFC 6531 local parts: any non-ASCII characters besides the atom characters.
    if local.isascii():
        return False
    return all(ch.isprintable() and ch not in ' "(),:;<>@[\\]' for ch in local) and ".." not in local


def normalize_address(address: str) -> str:
    local, domain = split_address(address)
    return f"{local}@{domain}"
