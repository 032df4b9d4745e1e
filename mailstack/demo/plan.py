"""The shape of the demo world: names, addresses, ports and the files in the data folder.

Nothing here starts a process. :func:`choose_port_offset` decides between the
standard ports and the offset ones by trying to bind them, and :class:`World`
renders each server's configuration and the ``world.json`` summary.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("mailstack-demo")
DEFAULT_ADDRESSES = ("127.0.1.53", "127.0.1.10", "127.0.1.20")

# Added to every standard port when the process may not bind ports below 1024,
# so that 25 becomes 10025, 587 becomes 10587 and 53 becomes 10053.
FALLBACK_PORT_OFFSET = 10000

DNS_PORT = 53
# Service name (as in /etc/services) -> standard port of a mail server.
MAIL_PORTS = {"smtp": 25, "submission": 587, "submissions": 465, "imap": 143, "imaps": 993}

TSIG_KEY_NAME = "demo-key"
WORLD_FILE = "world.json"
PASSWORDS_FILE = "passwords.json"


class PlanError(Exception):
    """The world cannot be laid out as requested; the message names the value to change."""


@dataclass(frozen=True)
class MailServerPlan:
    """One mail domain served by one ``mailstack serve`` process."""

    name: str  # short tag in the log stream: "here" or "there"
    domain: str
    address: str
    ports: dict[str, int]
    accounts: tuple[str, ...]

    @property
    def hostname(self) -> str:
        return f"mail.{self.domain}"


@dataclass(frozen=True)
class BlueBookPlan:
    address: str
    port: int


@dataclass(frozen=True)
class World:
    """Everything the demo starts, with the paths of its files under ``data_dir``."""

    data_dir: Path
    port_offset: int
    bluebook: BlueBookPlan
    servers: tuple[MailServerPlan, ...]
    shutdown_timeout: float = 5.0
    log_level: str = "INFO"

    # Paths ------------------------------------------------------------------

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def world_file(self) -> Path:
        return self.data_dir / WORLD_FILE

    @property
    def passwords_file(self) -> Path:
        return self.data_dir / PASSWORDS_FILE

    @property
    def bluebook_dir(self) -> Path:
        return self.data_dir / "bluebook"

    @property
    def bluebook_config(self) -> Path:
        return self.bluebook_dir / "bluebook.toml"

    def server_dir(self, server: MailServerPlan) -> Path:
        return self.data_dir / server.domain

    def server_config(self, server: MailServerPlan) -> Path:
        return self.server_dir(server) / "mailstack.toml"

    def server_tls_dir(self, server: MailServerPlan) -> Path:
        return self.server_dir(server) / "data" / "tls"

    def server(self, domain: str) -> MailServerPlan:
        for server in self.servers:
            if server.domain == domain:
                return server
        raise KeyError(domain)

    # Configuration files ----------------------------------------------------

    def render_server_config(self, server: MailServerPlan) -> str:
        """Return the TOML configuration of ``server``; relative paths are from its folder."""
        return "\n".join(
            [
                "# Written by `mailstack demo` at every start; edits are overwritten.",
                "[server]",
                f"name = {_toml(server.domain)}",
                f"hostname = {_toml(server.hostname)}",
                f"domains = [{_toml(server.domain)}]",
                f"listen = [{_toml(server.address)}]",
                'data_dir = "data"',
                f"shutdown_timeout = {self.shutdown_timeout}",
                "",
                "[tls]",
                'cert_file = "data/tls/server.pem"',
                'key_file = "data/tls/server.key"',
                "",
                "[submission]",
                f"port = {server.ports['submission']}",
                f"tls_port = {server.ports['submissions']}",
                "",
                "[imap]",
                f"port = {server.ports['imap']}",
                f"tls_port = {server.ports['imaps']}",
                "",
                "[transfer]",
                f"port = {server.ports['smtp']}",
                f"peer_port = {server.ports['smtp']}",
                f"nameservers = [{_toml(self.bluebook.address)}]",
                f"dns_port = {self.bluebook.port}",
                "dns_timeout = 2.0",
                # Every demo server's certificate comes from the demo CA, so
                # relays between them can check the peer's name and chain.
                'tls_policy = "verify"',
                'tls_ca_file = "../tls/ca.pem"',
                "connect_timeout = 5.0",
                "command_timeout = 30.0",
                "retry_initial = 5.0",
                "retry_max = 60.0",
                "max_queue_lifetime = 3600.0",
                "scan_interval = 1.0",
                "lease_time = 60.0",
                "",
                "[log]",
                f"level = {_toml(self.log_level)}",
                "",
            ]
        )

    # world.json -------------------------------------------------------------

    def describe(self, passwords: dict[str, str], tsig: dict[str, str] | None, pids: dict[str, int]) -> dict[str, Any]:
        """Return the ``world.json`` document: where everything is and how to log in."""
        return {
            "data_dir": str(self.data_dir),
            "ca_file": str(self.ca_file),
            "port_offset": self.port_offset,
            "demo_pid": os.getpid(),
            "bluebook": {
                "address": self.bluebook.address,
                "port": self.bluebook.port,
                "config": str(self.bluebook_config),
                "tsig": tsig,
                "zones": [server.domain for server in self.servers],
                "pid": pids.get("bluebook"),
            },
            "servers": {
                server.domain: {
                    "domain": server.domain,
                    "hostname": server.hostname,
                    "address": server.address,
                    "ports": dict(server.ports),
                    "config": str(self.server_config(server)),
                    "accounts": [
                        {"address": account, "password": passwords[account]} for account in server.accounts
                    ],
                    "pid": pids.get(server.domain),
                }
                for server in self.servers
            },
        }


def _toml(value: str) -> str:
    # JSON string escaping is valid for TOML basic strings.
    return json.dumps(value)


def parse_addresses(text: str) -> tuple[str, str, str]:
    """Parse ``BLUEBOOK,HERE,THERE``: three distinct loopback IPv4 addresses."""
    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(parts) != 3:
        raise PlanError(f"--addresses needs three comma-separated addresses (Blue Book, here.test, there.test), got {text!r}")
    for part in parts:
        try:
            address = ipaddress.ip_address(part)
        except ValueError:
            raise PlanError(f"--addresses: {part!r} is not an IP address") from None
        if address.version != 4 or not address.is_loopback:
            raise PlanError(f"--addresses: {part} is not a loopback IPv4 address (127.0.0.0/8); the demo binds loopback only")
    if len(set(parts)) != 3:
        raise PlanError(f"--addresses: the three addresses must differ, got {text!r}")
    return parts  # type: ignore[return-value]


def plan_world(
    data_dir: Path,
    addresses: tuple[str, str, str],
    port_offset: int,
    *,
    log_level: str = "INFO",
) -> World:
    """Lay out the Blue Book and the two mail servers with every port shifted by ``port_offset``."""
    bluebook_address, here_address, there_address = addresses
    ports = {service: port + port_offset for service, port in MAIL_PORTS.items()}
    return World(
        data_dir=data_dir.resolve(),
        port_offset=port_offset,
        bluebook=BlueBookPlan(bluebook_address, DNS_PORT + port_offset),
        servers=(
            MailServerPlan("here", "here.test", here_address, dict(ports), ("alice@here.test",)),
            MailServerPlan("there", "there.test", there_address, dict(ports), ("bob@there.test",)),
        ),
        log_level=log_level,
    )


def listeners(world: World) -> list[tuple[str, int, int]]:
    """Return every (address, port, socket type) the world binds."""
    found = [
        (world.bluebook.address, world.bluebook.port, socket.SOCK_DGRAM),
        (world.bluebook.address, world.bluebook.port, socket.SOCK_STREAM),
    ]
    for server in world.servers:
        found += [(server.address, port, socket.SOCK_STREAM) for port in server.ports.values()]
    return found


def _try_bind(address: str, port: int, kind: int) -> OSError | None:
    with socket.socket(socket.AF_INET, kind) as probe:
        if kind == socket.SOCK_STREAM:
            # Same option as the servers use, so a port in TIME_WAIT counts as free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            return exc
    return None


def check_bindable(world: World) -> list[str]:
    """Return one problem per listener of ``world`` that cannot be bound now; empty when all can."""
    problems = []
    for address, port, kind in listeners(world):
        error = _try_bind(address, port, kind)
        if error is None:
            continue
        protocol = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
        if error.errno == errno.EADDRINUSE:
            reason = "already in use (is another demo running? stop it, or choose other --addresses)"
        elif error.errno == errno.EACCES:
            reason = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        elif error.errno == errno.EADDRNOTAVAIL:
            reason = "address not available on this machine (some systems only route 127.0.0.1)"
        else:
            reason = error.strerror or str(error)
        problems.append(f"{address}:{port}/{protocol}: {reason}")
    return problems


def standard_ports_allowed(address: str) -> bool:
    """Return whether this process may bind a port below 1024 on ``address``."""
    for port in (DNS_PORT, 25):
        error = _try_bind(address, port, socket.SOCK_STREAM)
        if error is not None and error.errno == errno.EACCES:
            return False
    return True


def choose_port_offset(requested: int | None, address: str) -> int:
    """Return ``requested``, else 0 when standard ports may be bound, else the fallback offset."""
    if requested is not None:
        return requested
    return 0 if standard_ports_allowed(address) else FALLBACK_PORT_OFFSET
