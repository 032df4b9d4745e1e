"""Build the demo world in its data folder, start it, and wait until every server responds.

The steps are those an operator would take by hand, through the same commands:
write each configuration, issue certificates from one CA, register both domains
with ``mailstack bluebook add``, create the accounts with ``mailstack user add``,
then run ``mailstack bluebook serve`` and one ``mailstack serve`` per domain.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import logging
import os
import secrets
import shutil
import ssl
import string
import time
from pathlib import Path
from typing import Any

import dns.exception

from mailstack import tls
from mailstack.demo import probe
from mailstack.demo.plan import TSIG_KEY_NAME, MailServerPlan, World
from mailstack.demo.processes import Child, ChildFailed, Supervisor, mailstack_command

log = logging.getLogger(__name__)

# Present in every folder the demo made, so that --fresh never deletes anything else.
MARKER_FILE = ".mailstack-demo"
# Letters and digits only: a password that starts with "-" reads as an option to
# swaks and other command-line clients. 16 of 62 symbols give about 95 bits.
PASSWORD_ALPHABET = string.ascii_letters + string.digits
PASSWORD_LENGTH = 16
TSIG_SECRET_BYTES = 32


class WorldError(Exception):
    """The demo world could not be set up or started; the message gives the reason."""


# The data folder -------------------------------------------------------------------


def prepare_data_dir(world: World, fresh: bool) -> int:
    """Create and lock the data folder; with ``fresh``, empty a previous demo's folder first.

    Return the descriptor that holds the lock: the folder stays locked against a
    second demo until it is closed, at the latest when this process exits.
    """
    data_dir = world.data_dir
    if data_dir.exists() and not data_dir.is_dir():
        raise WorldError(f"{data_dir} exists and is not a folder")
    marker = data_dir / MARKER_FILE
    if data_dir.exists() and not marker.exists() and any(data_dir.iterdir()):
        raise WorldError(
            f"{data_dir} is not empty and was not made by `mailstack demo` (no {MARKER_FILE} file); "
            "choose another --data folder"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)

    descriptor = os.open(marker, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise WorldError(f"another `mailstack demo` is using {data_dir}; stop it first, or choose another --data folder") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, b"This folder holds the data of `mailstack demo`.\n")
    # A world.json left by a demo that was killed describes servers that are gone.
    world.world_file.unlink(missing_ok=True)

    if fresh:
        # The marker stays: deleting it would release the lock to a second demo.
        for entry in data_dir.iterdir():
            if entry.name == MARKER_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        log.info("removed the previous demo data in %s", data_dir)
    return descriptor


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def generate_password() -> str:
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


def load_secrets(world: World) -> dict[str, Any]:
    """Return the saved passwords and TSIG secret, generating whatever is missing."""
    saved: dict[str, Any] = {}
    if world.passwords_file.exists():
        try:
            saved = json.loads(world.passwords_file.read_text())
        except (OSError, ValueError) as exc:
            raise WorldError(f"{world.passwords_file}: cannot read the saved passwords: {exc}") from None
    passwords = dict(saved.get("accounts", {}))
    for server in world.servers:
        for account in server.accounts:
            passwords.setdefault(account, generate_password())
    tsig = saved.get("tsig") or {
        "name": TSIG_KEY_NAME,
        "algorithm": "hmac-sha256",
        "secret": base64.b64encode(secrets.token_bytes(TSIG_SECRET_BYTES)).decode(),
    }
    document = {"accounts": passwords, "tsig": tsig}
    _write_private(world.passwords_file, json.dumps(document, indent=2) + "\n")
    return document


def issue_certificates(world: World) -> None:
    """Create the demo CA once and issue each mail server's certificate from it.

    Each server's ``data/tls/ca.pem`` and ``ca.key`` are links to the shared CA, so
    :func:`mailstack.tls.ensure_server_certificate` issues from that one CA.
    """
    tls.ensure_ca(world.tls_dir)
    for server in world.servers:
        tls_dir = world.server_tls_dir(server)
        tls_dir.mkdir(parents=True, exist_ok=True)
        for name in ("ca.pem", "ca.key"):
            link = tls_dir / name
            target = Path(os.path.relpath(world.tls_dir / name, tls_dir))
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to(target)
        tls.ensure_server_certificate(tls_dir.parent, server.hostname, (server.address,))


def render_bluebook_config(world: World, tsig: dict[str, str]) -> str:
    return "\n".join(
        [
            "# Written by `mailstack demo` at every start; edits are overwritten.",
            "[server]",
            f"listen = [{json.dumps(world.bluebook.address)}]",
            f"port = {world.bluebook.port}",
            'data_dir = "data"',
            f"shutdown_timeout = {world.shutdown_timeout}",
            "",
            "[keys]",
            f"tsig = [{json.dumps(tsig['algorithm'] + ':' + tsig['name'] + ':' + tsig['secret'])}]",
            "",
            "[log]",
            f"level = {json.dumps(world.log_level)}",
            "",
        ]
    )


def write_configs(world: World, tsig: dict[str, str]) -> None:
    """Write the Blue Book's and each mail server's configuration (mode 0600: they hold secrets)."""
    _write_private(world.bluebook_config, render_bluebook_config(world, tsig))
    for server in world.servers:
        _write_private(world.server_config(server), world.render_server_config(server))


# Registration through the CLI ------------------------------------------------------


def bluebook_register_command(world: World, server: MailServerPlan, verb: str) -> list[str]:
    """Return the `mailstack bluebook add` (or `update`) command that publishes ``server``'s domain."""
    ports = server.ports
    return mailstack_command(
        "bluebook", verb, server.domain,
        "--mx", server.hostname,
        "--address", server.address,
        "--ns-address", world.bluebook.address,
        "--submission-port", str(ports["submission"]),
        "--submissions-port", str(ports["submissions"]),
        "--imap-port", str(ports["imap"]),
        "--imaps-port", str(ports["imaps"]),
        "--config", str(world.bluebook_config),
    )


async def register(world: World, supervisor: Supervisor, passwords: dict[str, str]) -> None:
    """Publish both domains in the Blue Book and create or update the accounts."""
    jobs = [_register_domains(world, supervisor)]
    jobs += [_ensure_accounts(world, supervisor, server, passwords) for server in world.servers]
    await _gather_all(jobs)


async def _gather_all(jobs: list[Any]) -> None:
    """Run ``jobs`` together and let each finish, so no failure goes unreported; then raise the first."""
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _register_domains(world: World, supervisor: Supervisor) -> None:
    if not (world.bluebook_dir / "data" / "bluebook.db").exists():
        # The first command creates the database schema, so the adds run one after the other.
        for server in world.servers:
            await supervisor.run(f"bluebook add {server.domain}", bluebook_register_command(world, server, "add"))
        return

    async def update_or_add(server: MailServerPlan) -> None:
        # A zone from an earlier run is updated, so changed addresses or ports take effect.
        try:
            await supervisor.run(f"bluebook update {server.domain}", bluebook_register_command(world, server, "update"))
        except ChildFailed as failure:
            log.info("cannot update zone %s, adding it instead: %s", server.domain, failure)
            await supervisor.run(f"bluebook add {server.domain}", bluebook_register_command(world, server, "add"))

    await _gather_all([update_or_add(server) for server in world.servers])


async def _ensure_accounts(world: World, supervisor: Supervisor, server: MailServerPlan, passwords: dict[str, str]) -> None:
    config = str(world.server_config(server))
    store_exists = (world.server_dir(server) / "data" / "mailstack.db").exists()
    for account in server.accounts:
        password = passwords[account] + "\n"
        if store_exists:
            # An existing account gets the saved password again, so world.json is always right.
            try:
                await supervisor.run(
                    f"user passwd {account}",
                    mailstack_command("user", "passwd", account, "--password-stdin", "--config", config),
                    input_text=password,
                )
                continue
            except ChildFailed as failure:
                log.info("cannot set the password of %s, creating the account instead: %s", account, failure)
        await supervisor.run(
            f"user add {account}",
            mailstack_command("user", "add", account, "--password-stdin", "--config", config),
            input_text=password,
        )

    # RFC 5321 requires a postmaster mailbox in every domain: the first account gets it.
    postmaster = f"postmaster@{server.domain}"
    try:
        await supervisor.run(
            f"user alias {postmaster}",
            mailstack_command("user", "alias", postmaster, server.accounts[0], "--config", config),
        )
    except ChildFailed as failure:
        # On a later run the alias is already there, which is what we want.
        log.info("postmaster alias of %s not added: %s", server.domain, failure)


# Start and readiness -----------------------------------------------------------------


async def start_servers(world: World, supervisor: Supervisor) -> dict[str, Child]:
    """Start the Blue Book and one `mailstack serve` process per domain."""
    children = {
        "bluebook": await supervisor.start(
            "bluebook", mailstack_command("bluebook", "serve", "--config", str(world.bluebook_config))
        )
    }
    for server in world.servers:
        children[server.domain] = await supervisor.start(
            server.domain, mailstack_command("serve", "--config", str(world.server_config(server)))
        )
    return children


def readiness_probes(world: World, context: ssl.SSLContext) -> dict[str, Any]:
    """Return one probe coroutine factory per listener, named like ``here.test submission 587``."""
    probes: dict[str, Any] = {}
    bluebook = world.bluebook
    for server in world.servers:
        probes[f"bluebook udp {bluebook.port} ({server.domain})"] = (
            lambda zone=server.domain: probe.probe_dns(bluebook.address, bluebook.port, zone)
        )
    probes[f"bluebook tcp {bluebook.port}"] = lambda: probe.probe_dns(
        bluebook.address, bluebook.port, world.servers[0].domain, tcp=True
    )
    for server in world.servers:
        address, ports, name = server.address, server.ports, server.hostname
        probes[f"{server.domain} smtp {ports['smtp']}"] = lambda a=address, p=ports["smtp"]: probe.probe_smtp(a, p)
        probes[f"{server.domain} submission {ports['submission']}"] = (
            lambda a=address, p=ports["submission"]: probe.probe_smtp(a, p)
        )
        probes[f"{server.domain} submissions {ports['submissions']}"] = (
            lambda a=address, p=ports["submissions"], n=name: probe.probe_smtp(a, p, tls=context, server_hostname=n)
        )
        probes[f"{server.domain} imap {ports['imap']}"] = lambda a=address, p=ports["imap"]: probe.probe_imap(a, p)
        probes[f"{server.domain} imaps {ports['imaps']}"] = (
            lambda a=address, p=ports["imaps"], n=name: probe.probe_imap(a, p, tls=context, server_hostname=n)
        )
    return probes


async def _until_answers(name: str, factory: Any, deadline: float) -> None:
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(factory(), 2.0)
            log.debug("%s responded", name)
            return
        except (OSError, probe.ProbeError, asyncio.TimeoutError, dns.exception.DNSException) as exc:
            last_error = exc
        # A refused connection returns at once; pause so the retries do not spin.
        await asyncio.sleep(0.1)
    raise WorldError(f"{name}: no valid response in time: {type(last_error).__name__}: {last_error}")


async def wait_until_ready(world: World, supervisor: Supervisor, timeout: float) -> None:
    """Return once every listener responds in its protocol; raise WorldError on timeout or a child's exit."""
    context = ssl.create_default_context(cafile=str(world.ca_file))
    deadline = time.monotonic() + timeout
    probes = readiness_probes(world, context)
    ready = asyncio.gather(*(_until_answers(name, factory, deadline) for name, factory in probes.items()))
    failure = asyncio.create_task(supervisor.wait_for_failure())
    try:
        done, _ = await asyncio.wait({ready, failure}, return_when=asyncio.FIRST_COMPLETED)
        if failure in done:
            raise ChildFailed(failure.result())
        ready.result()
    finally:
        failure.cancel()
        ready.cancel()
        await asyncio.gather(ready, failure, return_exceptions=True)


def write_world_file(world: World, secrets_document: dict[str, Any], children: dict[str, Child]) -> dict[str, Any]:
    """Write ``world.json`` (mode 0600, because it contains the passwords) and return its content."""
    description = world.describe(
        secrets_document["accounts"], secrets_document["tsig"], {name: child.pid for name, child in children.items()}
    )
    _write_private(world.world_file, json.dumps(description, indent=2) + "\n")
    return description
