"""The configuration of one mail server (``mailstack serve --config FILE``).

Every option here has a default that works on one machine. ``docs/configuration.md``
is generated from these declarations by ``mailstack config docs``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mailstack.config import option, port_option

MIB = 1024 * 1024
ROLES = ("submission", "imap", "transfer")


@dataclass(frozen=True)
class ServerSection:
    name: str = option("mail", "Label of this server in logs and process titles.")
    hostname: str = option(
        "localhost",
        "Fully qualified host name used in greetings, Received headers and certificates.",
    )
    domains: tuple[str, ...] = option(
        (),
        "Mail domains served here; they are added to the store at start-up. "
        "Domains added later with `mailstack domain add` are served too.",
    )
    listen: tuple[str, ...] = option(
        ("127.0.0.1",), "IP addresses that every listener of this server binds."
    )
    data_dir: Path = option(
        Path("mailstack-data"),
        "Folder for the SQLite database, the local CA and other state; created when missing.",
    )
    roles: tuple[str, ...] = option(
        ROLES, "Services that `mailstack serve` starts when --role is not given."
    )
    shutdown_timeout: float = option(
        10.0,
        "Time that in-flight sessions and transactions get to finish at shutdown.",
        unit="seconds",
        minimum=0,
    )

    def __post_init__(self) -> None:
        for role in self.roles:
            if role not in ROLES:
                raise ValueError(f"roles: unknown role {role!r}; known roles: {', '.join(ROLES)}")
        for domain in self.domains:
            if not domain or domain != domain.strip().lower().rstrip("."):
                raise ValueError(f"domains: {domain!r} must be a lower-case name without a trailing dot")


@dataclass(frozen=True)
class StoreSection:
    url: str = option(
        "",
        "SQLAlchemy database URL. Empty means `sqlite+aiosqlite:///<data_dir>/mailstack.db`; "
        "`postgresql+asyncpg://...` needs the `postgres` extra.",
        secret=True,
    )
    busy_timeout: float = option(
        30.0,
        "How long a SQLite writer waits for another process's lock before failing.",
        unit="seconds",
        minimum=0,
    )
    pool_size: int = option(10, "Connections kept open to PostgreSQL.", minimum=1)
    auto_upgrade: bool = option(
        True, "Apply pending schema migrations when `serve` starts."
    )


@dataclass(frozen=True)
class TLSSection:
    cert_file: Path = option(
        Path(""),
        "PEM certificate chain for every TLS listener. Empty: a certificate issued by the "
        "local CA in `<data_dir>/tls/` is used.",
        must_exist=True,
    )
    key_file: Path = option(
        Path(""), "PEM private key matching cert_file.", must_exist=True, secret=False
    )

    def __post_init__(self) -> None:
        if bool(str(self.cert_file) not in ("", ".")) != bool(str(self.key_file) not in ("", ".")):
            raise ValueError("cert_file and key_file must be set together")


@dataclass(frozen=True)
class SubmissionSection:
    port: int = port_option(587, "Submission port with STARTTLS (RFC 6409).")
    tls_port: int = port_option(465, "Submission port with implicit TLS (RFC 8314).")
    max_message_size: int = option(
        25 * MIB, "Largest message accepted, advertised with SIZE.", unit="bytes", minimum=1024
    )
    max_recipients: int = option(100, "Recipients accepted per message.", minimum=1)
    idle_timeout: float = option(300.0, "Idle time before the server closes a session.", unit="seconds", minimum=1)
    max_connections: int = option(500, "Concurrent sessions in total.", minimum=1)
    max_connections_per_address: int = option(
        50, "Concurrent sessions from one client IP address.", minimum=1
    )
    auth_failure_limit: int = option(
        5,
        "Failed AUTH attempts per client address or account within auth_failure_window "
        "before further attempts get 421 4.7.0.",
        minimum=1,
    )
    auth_failure_window: float = option(
        300.0, "Window in which failed AUTH attempts are counted, and lockout length.", unit="seconds", minimum=1
    )
    auth_failure_delay: float = option(
        1.0, "Delay before each failed AUTH reply, doubled per recent failure up to 8 times this.", unit="seconds", minimum=0
    )
    trusted_networks: tuple[str, ...] = option(
        (),
        "Client networks (CIDR, for example 127.0.0.1/32) that may submit without STARTTLS and AUTH, "
        "like Postfix's mynetworks. MAIL FROM must still be a local account or alias, and the "
        "message is submitted as that account. Empty: every client must authenticate.",
    )

    def __post_init__(self) -> None:
        for network in self.trusted_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"trusted_networks: {network!r} is not an IP network such as 127.0.0.1/32") from None


@dataclass(frozen=True)
class IMAPSection:
    port: int = port_option(143, "IMAP port with STARTTLS.")
    tls_port: int = port_option(993, "IMAP port with implicit TLS.")
    append_limit: int = option(
        25 * MIB, "Largest message APPEND accepts, advertised as APPENDLIMIT.", unit="bytes", minimum=1024
    )
    max_line_length: int = option(
        64 * 1024, "Longest command line, literals excluded.", unit="bytes", minimum=1024
    )
    login_timeout: float = option(60.0, "Autologout time before login.", unit="seconds", minimum=1)
    idle_timeout: float = option(
        1800.0, "Autologout time after login; IDLE is refreshed by the client.", unit="seconds", minimum=60
    )
    max_connections: int = option(500, "Concurrent sessions in total.", minimum=1)
    max_connections_per_address: int = option(50, "Concurrent sessions from one client IP address.", minimum=1)
    max_bad_commands: int = option(20, "Bad commands in one session before BYE.", minimum=1)
    auth_failure_limit: int = option(5, "Failed logins per address or account within auth_failure_window before refusal.", minimum=1)
    auth_failure_window: float = option(300.0, "Window for counting failed logins, and lockout length.", unit="seconds", minimum=1)
    auth_failure_delay: float = option(1.0, "Delay before a failed login reply.", unit="seconds", minimum=0)


@dataclass(frozen=True)
class TransferSection:
    port: int = port_option(25, "Inbound SMTP port for mail to this server's domains.")
    max_message_size: int = option(
        25 * MIB, "Largest inbound message, advertised with SIZE.", unit="bytes", minimum=1024
    )
    max_recipients: int = option(100, "Recipients accepted per inbound message.", minimum=1)
    max_received_headers: int = option(
        50, "Received headers above which a message is rejected as a loop (554 5.4.6).", minimum=1
    )
    idle_timeout: float = option(300.0, "Idle time before an inbound session is closed.", unit="seconds", minimum=1)
    max_connections: int = option(500, "Concurrent inbound sessions.", minimum=1)
    max_connections_per_address: int = option(50, "Concurrent inbound sessions from one IP address.", minimum=1)
    nameservers: tuple[str, ...] = option(
        (),
        "DNS servers for MX lookups (for example the Blue Book's address). "
        "Empty: the system resolver from /etc/resolv.conf.",
    )
    dns_port: int = option(53, "Port of the configured nameservers.", minimum=1, maximum=65535)
    dns_timeout: float = option(5.0, "Time allowed for one DNS lookup.", unit="seconds", minimum=0.1)
    peer_port: int = option(25, "Port of peer MTAs that mail is relayed to.", minimum=1, maximum=65535)
    tls_policy: Literal["none", "opportunistic", "required", "verify"] = option(
        "opportunistic",
        "Outbound STARTTLS: none, opportunistic (when offered, unverified), required "
        "(fail if not offered), verify (required and the certificate checked against tls_ca_file).",
    )
    tls_ca_file: Path = option(
        Path(""), "CA bundle for tls_policy = verify. Empty: the system CA store.", must_exist=True
    )
    connect_timeout: float = option(30.0, "Time allowed to connect to a peer.", unit="seconds", minimum=0.1)
    command_timeout: float = option(300.0, "Time allowed for each SMTP reply from a peer.", unit="seconds", minimum=0.1)
    retry_initial: float = option(300.0, "Delay before the first retry of a deferred delivery.", unit="seconds", minimum=0)
    retry_max: float = option(
        4000.0, "Longest delay between retries; the delay doubles until it reaches this.", unit="seconds", minimum=0
    )
    max_queue_lifetime: float = option(
        5 * 24 * 3600.0, "Age at which a deferred delivery bounces.", unit="seconds", minimum=0
    )
    delay_warning: float = option(
        0.0, "Age at which the sender is told that a delivery is delayed; 0 disables.", unit="seconds", minimum=0
    )
    scan_interval: float = option(5.0, "Interval between queue scans.", unit="seconds", minimum=0.05)
    lease_time: float = option(
        600.0, "How long a claimed delivery stays with one worker before others may retry it.",
        unit="seconds", minimum=1,
    )
    max_outbound_connections: int = option(20, "Concurrent outbound connections in total.", minimum=1)
    max_connections_per_domain: int = option(4, "Concurrent outbound connections per destination domain.", minimum=1)

    def __post_init__(self) -> None:
        for address in self.nameservers:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"nameservers: {address!r} is not an IP address") from None
        if self.retry_max < self.retry_initial:
            raise ValueError(
                f"retry_max ({self.retry_max:g} s) must not be below retry_initial ({self.retry_initial:g} s)"
            )


@dataclass(frozen=True)
class LogSection:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = option("INFO", "Lowest level logged.")
    format: Literal["text", "json"] = option("text", "Log line format.")


@dataclass(frozen=True)
class MailServerConfig:
    server: ServerSection = field(default_factory=ServerSection)
    store: StoreSection = field(default_factory=StoreSection)
    tls: TLSSection = field(default_factory=TLSSection)
    submission: SubmissionSection = field(default_factory=SubmissionSection)
    imap: IMAPSection = field(default_factory=IMAPSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def database_url(self) -> str:
        if self.store.url:
            return self.store.url
        return f"sqlite+aiosqlite:///{self.server.data_dir / 'mailstack.db'}"

    def validate(self) -> None:
        ports = {
            "submission.port": self.submission.port,
            "submission.tls_port": self.submission.tls_port,
            "imap.port": self.imap.port,
            "imap.tls_port": self.imap.tls_port,
            "transfer.port": self.transfer.port,
        }
        seen: dict[int, str] = {}
        for key, number in ports.items():
            if number == 0:
                continue
            if number in seen:
                raise ValueError(f"{key} and {seen[number]} both use port {number}")
            seen[number] = key
