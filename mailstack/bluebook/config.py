"""The Blue Book's configuration (``mailstack bluebook ... --config FILE``).

Every option has a default that works on one machine; ``mailstack config docs``
renders these declarations into ``docs/configuration.md``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mailstack.config import option, port_option

TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")


@dataclass(frozen=True)
class ServerSection:
    listen: tuple[str, ...] = option(("127.0.0.1",), "IP addresses that the UDP and TCP listeners bind.")
    port: int = port_option(53, "DNS port for UDP and TCP.")
    data_dir: Path = option(
        Path("bluebook-data"),
        "Folder of the Blue Book's own SQLite database (`bluebook.db`); created when missing.",
    )
    database_url: str = option(
        "",
        "SQLAlchemy database URL. Empty means `sqlite+aiosqlite:///<data_dir>/bluebook.db`.",
    )
    max_udp_payload: int = option(
        4096,
        "Largest UDP answer sent to an EDNS client and the payload size advertised in OPT; "
        "a client's smaller size is honoured, and clients without EDNS get 512 bytes. "
        "1232 avoids IP fragmentation on the internet.",
        unit="bytes",
        minimum=512,
        maximum=65535,
    )
    tcp_idle_timeout: float = option(
        10.0, "A TCP connection with no complete query for this long is closed.", unit="seconds", minimum=0.1
    )
    tcp_max_connections: int = option(
        256, "Open TCP connections accepted at once; more are closed at once.", minimum=1
    )
    reload_interval: float = option(
        0.25,
        "How often the server checks the database for changes made by the CLI.",
        unit="seconds",
        minimum=0.01,
        maximum=1.0,
    )
    answer_cache_size: int = option(
        100_000,
        "Prebuilt wire answers kept; the cache is emptied when full and on every change.",
        minimum=0,
    )
    shutdown_timeout: float = option(
        5.0, "Time that open TCP connections and zone transfers get to finish at shutdown.", unit="seconds", minimum=0
    )
    axfr_allow: tuple[str, ...] = option(
        (),
        "Client networks (for example `127.0.0.1/32`) allowed to transfer zones without TSIG. "
        "A TSIG-signed transfer with a known key is always allowed.",
    )
    notify: tuple[str, ...] = option(
        (),
        "Secondary servers sent a DNS NOTIFY (RFC 1996) when a zone's serial changes, each "
        "`IP` (port 53), `IP:PORT` or `[IPv6]:PORT`.",
    )
    notify_attempts: int = option(
        3, "NOTIFY messages sent to one secondary for one change before giving up.", minimum=1, maximum=10
    )
    notify_timeout: float = option(
        2.0, "Time to wait for a secondary's reply to one NOTIFY.", unit="seconds", minimum=0.05
    )

    def __post_init__(self) -> None:
        for address in self.listen:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"listen: {address!r} is not an IP address") from None
        for network in self.axfr_allow:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"axfr_allow: {network!r} is not an IP network") from None
        for target in self.notify:
            parse_endpoint(target)


@dataclass(frozen=True)
class ZoneSection:
    ttl: int = option(300, "TTL of the records that `bluebook add` creates.", unit="seconds", minimum=0, maximum=2**31 - 1)
    nameserver: str = option(
        "ns",
        "Name server host of new zones: a label inside the zone (given its address records from "
        "[server] listen) or a fully qualified name ending in a dot.",
    )
    hostmaster: str = option(
        "hostmaster",
        "Mailbox of the zone's administrator in the SOA, as a label inside the zone or a fully "
        "qualified name ending in a dot.",
    )
    refresh: int = option(3600, "SOA refresh interval for secondaries.", unit="seconds", minimum=0)
    retry: int = option(600, "SOA retry interval for secondaries.", unit="seconds", minimum=0)
    expire: int = option(604800, "SOA expire time for secondaries.", unit="seconds", minimum=0)
    negative_ttl: int = option(
        60, "SOA minimum field: how long resolvers cache NXDOMAIN and NODATA answers.", unit="seconds", minimum=0
    )


@dataclass(frozen=True)
class KeysSection:
    tsig: tuple[str, ...] = option(
        (),
        "TSIG keys accepted for DNS UPDATE and AXFR, each `NAME:BASE64SECRET` (hmac-sha256) or "
        "`ALGORITHM:NAME:BASE64SECRET`. Keys made by `bluebook key add` are accepted as well.",
        secret=True,
    )

    def __post_init__(self) -> None:
        for entry in self.tsig:
            parse_key_entry(entry)


@dataclass(frozen=True)
class LogSection:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = option("INFO", "Lowest level logged.")
    format: Literal["text", "json"] = option("text", "Log line format.")


@dataclass(frozen=True)
class BlueBookConfig:
    server: ServerSection = field(default_factory=ServerSection)
    zone: ZoneSection = field(default_factory=ZoneSection)
    keys: KeysSection = field(default_factory=KeysSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def database_url(self) -> str:
        if self.server.database_url:
            return self.server.database_url
        return f"sqlite+aiosqlite:///{self.server.data_dir / 'bluebook.db'}"


def parse_endpoint(text: str, default_port: int = 53) -> tuple[str, int]:
    """Split ``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` into (address, port) or raise ValueError."""
    value = text.strip()
    port = default_port
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"notify: {text!r} must be IP, IP:PORT or [IPv6]:PORT")
            port_text = rest[1:]
        else:
            port_text = ""
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host, port_text = value, ""
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"notify: {text!r} has an invalid port")
        port = int(port_text)
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"notify: {host!r} in {text!r} is not an IP address") from None
    return address, port


def parse_key_entry(entry: str) -> tuple[str, str, str]:
    """Split a configured TSIG key into (name, algorithm, base64 secret) or raise ValueError.

    The secret is never part of the error message.
    """
    parts = entry.split(":")
    if len(parts) == 2:
        name, secret = parts
        algorithm = "hmac-sha256"
    elif len(parts) == 3:
        algorithm, name, secret = parts
    else:
        raise ValueError("tsig: each key must be NAME:SECRET or ALGORITHM:NAME:SECRET")
    algorithm = algorithm.strip().lower()
    name = name.strip().lower().rstrip(".")
    if algorithm not in TSIG_ALGORITHMS:
        raise ValueError(f"tsig: key {name!r}: unknown algorithm {algorithm!r}; known: {', '.join(TSIG_ALGORITHMS)}")
    if not name:
        raise ValueError("tsig: a key has an empty name")
    try:
        decoded = base64.b64decode(secret.strip(), validate=True)
    except binascii.Error:
        raise ValueError(f"tsig: key {name!r}: the secret is not valid base64") from None
    if not decoded:
        raise ValueError(f"tsig: key {name!r}: the secret is empty")
    return name, algorithm, secret.strip()
