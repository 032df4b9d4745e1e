"""The Docker topology run as plain processes on loopback, since no Docker engine is available.

Every service of docker/compose.yml runs with its own command, configuration file
and environment, as a container would. Three things differ. Each named volume is
a temporary folder. Each container address is a loopback address, and the MSA
and MTA of one domain share one, so that they share one certificate as they do
by listening on 0.0.0.0 in Docker. The commands that the image installs are
small shims. Mail goes from alice's MSA through here.test's MTA process, the
Blue Book and there.test's MTA process into bob's INBOX, read from there.test's
MSA process: the MSA and MTA of a domain meet only in the shared store.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import errno
import imaplib
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from address_claims import claim_addresses

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra: pip install -e '.[test]'")

pytestmark = pytest.mark.slow

DOCKER_DIR = Path(__file__).resolve().parent.parent / "docker"


# Container address -> loopback address, filled in when the topology starts.
LOOPBACK: dict[str, str] = {}
# Loopback triples to try, within this project's test range 127.0.8.0/24.
CANDIDATE_ADDRESSES = [tuple(f"127.0.8.{base + i}" for i in range(3)) for base in (90, 93, 96)]
SETUP_SERVICES = ("bluebook-setup", "here-setup", "there-setup")
SERVER_SERVICES = ("bluebook", "here-msa", "here-mta", "there-msa", "there-mta")
TIMEOUT = 60.0


def _standard_ports_bindable() -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.8.99", 25))
        except OSError as exc:
            return exc.errno != errno.EACCES
    return True


def _map_addresses(text: str) -> str:
    for container, loopback in LOOPBACK.items():
        text = text.replace(container, loopback)
    return text


class Topology:
    """The compose services as processes, with volumes in ``root``."""

    def __init__(self, compose: dict, root: Path) -> None:
        self.services = compose["services"]
        self.root = root
        self.bin_dir = root / "bin"
        self.processes: dict[str, subprocess.Popen[str]] = {}
        self._install_shims()

    def _install_shims(self) -> None:
        self.bin_dir.mkdir()
        shims = {
            "mailstack": f'exec "{sys.executable}" -m mailstack "$@"',
            "python": f'exec "{sys.executable}" "$@"',
            "mailstack-setup-account": f'exec sh "{DOCKER_DIR / "setup-account.sh"}" "$@"',
            "mailstack-register-domain": f'exec sh "{DOCKER_DIR / "register-domain.sh"}" "$@"',
        }
        for name, body in shims.items():
            path = self.bin_dir / name
            path.write_text(f"#!/bin/sh\n{body}\n")
            path.chmod(0o755)

    def volume(self, service: str) -> Path | None:
        """Return the temporary folder used in place of the service's /data volume."""
        for volume in self.services[service].get("volumes", []):
            source, target = volume.split(":")[:2]
            if target == "/data":
                folder = self.root / source
                folder.mkdir(exist_ok=True)
                return folder
        return None

    def address(self, service: str) -> str:
        """Return the service's loopback address; a setup service gets that of its volume's server."""
        networks = self.services[service].get("networks")
        if networks:
            return LOOPBACK[networks["mail"]["ipv4_address"]]
        volume = self.volume(service)
        for name in SERVER_SERVICES:
            if self.volume(name) == volume:
                return self.address(name)
        raise AssertionError(f"{service} shares no volume with a server")

    def command(self, service: str) -> list[str]:
        definition = self.services[service]
        entrypoint = definition.get("entrypoint", ["mailstack"])
        command = definition.get("command", [])
        arguments = [*entrypoint, *command]
        arguments = [_map_addresses(a).replace("/etc/mailstack/", f"{DOCKER_DIR / 'config'}/") for a in arguments]
        if arguments[0] == "mailstack":
            arguments = [sys.executable, "-m", "mailstack", *arguments[1:]]
        return arguments

    def environment(self, service: str) -> dict[str, str]:
        definition = self.services[service]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MAILSTACK_")}
        environment["PATH"] = f"{self.bin_dir}{os.pathsep}{environment['PATH']}"
        environment.update({k: _map_addresses(str(v)) for k, v in (definition.get("environment") or {}).items()})
        volume = self.volume(service)
        if volume is not None:
            environment["MAILSTACK_SERVER__DATA_DIR"] = str(volume)
            environment["PASSWORD_DIR"] = str(volume)
        # A container binds 0.0.0.0 inside its own network namespace; here that would
        # be every address of the machine, so each service binds its loopback address.
        # Setup services use the same one, so the certificate they issue stays valid.
        environment["MAILSTACK_SERVER__LISTEN"] = self.address(service)
        if any(a.endswith(("here.toml", "there.toml")) for a in self.command(service)):
            environment["MAILSTACK_TRANSFER__NAMESERVERS"] = LOOPBACK["172.31.53.53"]
        return environment

    def run_setup(self) -> dict[str, str]:
        """Run the setup services together; return the output of each."""
        running = {
            name: subprocess.Popen(
                self.command(name), env=self.environment(name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            for name in SETUP_SERVICES
        }
        outputs = {}
        for name, process in running.items():
            output, _ = process.communicate(timeout=120)
            assert process.returncode == 0, f"{name} failed:\n{output}"
            outputs[name] = output
        return outputs

    def start_servers(self) -> None:
        for name in SERVER_SERVICES:
            log = (self.root / f"{name}.log").open("w")
            self.processes[name] = subprocess.Popen(
                self.command(name), env=self.environment(name), stdout=log, stderr=subprocess.STDOUT,
                text=True, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def wait_healthy(self) -> None:
        """Run each service's healthcheck, as Docker would, until it passes."""
        deadline = time.monotonic() + TIMEOUT
        for name in SERVER_SERVICES:
            # Inside a container 127.0.0.1 reaches the service; here its own address does.
            probe = self.services[name]["environment"]["HEALTHCHECK_PROBE"].replace("127.0.0.1", self.address(name))
            probe = _map_addresses(probe).split()
            while True:
                assert self.processes[name].poll() is None, f"{name} exited:\n{self.log(name)}"
                result = subprocess.run(
                    [sys.executable, "-m", "mailstack.demo.probe", *probe], capture_output=True, text=True, timeout=30
                )
                if result.returncode == 0:
                    break
                assert time.monotonic() < deadline, f"{name} never became healthy: {result.stderr}\n{self.log(name)}"
                time.sleep(0.2)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return "\n".join(path.read_text().splitlines()[-40:]) if path.exists() else ""

    def stop(self) -> dict[str, int | None]:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                codes[name] = process.wait()
        return codes


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory):
    if not _standard_ports_bindable():
        pytest.skip("the compose services use ports below 1024, which this process may not bind")
    (bluebook, here, there), claim = claim_addresses(CANDIDATE_ADDRESSES, (53, 25))
    # The MSA and MTA of a domain share one address; see the module docstring.
    LOOPBACK.update({
        "172.31.53.53": bluebook,
        "172.31.53.10": here,
        "172.31.53.11": here,
        "172.31.53.20": there,
        "172.31.53.21": there,
    })
    compose = yaml.safe_load((DOCKER_DIR / "compose.yml").read_text())
    running = Topology(compose, tmp_path_factory.mktemp("compose"))
    try:
        running.run_setup()
        running.start_servers()
        running.wait_healthy()
        yield running
    finally:
        running.stop()
        os.close(claim)


def _password(topology: Topology, service: str, address: str) -> str:
    return (topology.volume(service) / f"{address}.password").read_text().strip()


def _context(topology: Topology, service: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(topology.volume(service) / "tls" / "ca.pem"))
    # The certificate names mail.<domain> and localhost, not the simulated address.
    context.check_hostname = False
    return context


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (Debian: bind9-dnsutils)")
def test_dig_finds_mta_and_msa(topology: Topology) -> None:
    bluebook = LOOPBACK["172.31.53.53"]
    for question, expected in (
        (["MX", "there.test"], "10 mail.there.test."),
        (["A", "mail.there.test"], LOOPBACK["172.31.53.20"]),
        (["SRV", "_submission._tcp.here.test"], "0 1 587 msa.here.test."),
        (["A", "msa.here.test"], LOOPBACK["172.31.53.11"]),
    ):
        result = subprocess.run(
            ["dig", f"@{bluebook}", *question, "+short", "+norecurse", "+time=2", "+tries=1"],
            capture_output=True, text=True, timeout=30,
        )
        assert result.stdout.split("\n")[0] == expected, (question, result.stdout, result.stderr)


def test_mail_crosses_split_roles(topology: Topology) -> None:
    here_msa = LOOPBACK["172.31.53.11"]
    there_msa = LOOPBACK["172.31.53.21"]
    alice = _password(topology, "here-setup", "alice@here.test")
    bob = _password(topology, "there-setup", "bob@there.test")
    # Generated passwords use letters and digits only, so no client reads one as an option.
    assert alice.isalnum()
    assert len(alice) == 16
    assert bob.isalnum()
    assert len(bob) == 16

    message = email.message.EmailMessage()
    message["From"] = "alice@here.test"
    message["To"] = "bob@there.test"
    message["Subject"] = "Through the containers"
    message["Message-ID"] = email.utils.make_msgid(domain="here.test")
    message.set_content("Hello bob.\n")
    with smtplib.SMTP(here_msa, 587, timeout=30) as client:
        client.starttls(context=_context(topology, "here-msa"))
        client.login("alice@here.test", alice)
        assert client.send_message(message) == {}

    deadline = time.monotonic() + TIMEOUT
    with imaplib.IMAP4_SSL(there_msa, 993, ssl_context=_context(topology, "there-msa"), timeout=30) as imap:
        imap.login("bob@there.test", bob)
        while True:
            imap.select("INBOX", readonly=True)
            status, data = imap.search(None, "HEADER", "Message-ID", message["Message-ID"])
            assert status == "OK"
            if data[0].split():
                break
            assert time.monotonic() < deadline, "the message never reached bob's INBOX\n" + topology.log("here-mta")
            time.sleep(0.2)
        status, parts = imap.fetch(data[0].split()[0].decode(), "(BODY.PEEK[])")
        received = email.message_from_bytes(parts[0][1], policy=email.policy.default)
    assert received["Subject"] == "Through the containers"
    trace = " ".join(received.get_all("Received", []))
    assert "mail.here.test" in trace

    # Only the MTA process relays; it also empties alice's Outbox afterwards.
    with imaplib.IMAP4_SSL(here_msa, 993, ssl_context=_context(topology, "here-msa"), timeout=30) as imap:
        imap.login("alice@here.test", alice)
        while True:
            status, data = imap.select("Outbox", readonly=True)
            assert status == "OK"
            if data[0] == b"0":
                break
            assert time.monotonic() < deadline, "alice's Outbox never emptied"
            time.sleep(0.2)
    assert "queue runner" not in topology.log("here-msa")
    assert "queue runner" in topology.log("here-mta")


def test_services_stop_cleanly(topology: Topology) -> None:
    codes = topology.stop()
    assert codes == {name: 0 for name in SERVER_SERVICES}, {name: topology.log(name) for name in SERVER_SERVICES}


def test_setup_again_changes_nothing(topology: Topology) -> None:
    password = _password(topology, "here-setup", "alice@here.test")
    ca = (topology.volume("here-setup") / "tls" / "ca.pem").read_bytes()
    outputs = topology.run_setup()
    assert "account alice@here.test exists" in outputs["here-setup"]
    assert "account bob@there.test exists" in outputs["there-setup"]
    assert "zone here.test: update done" in outputs["bluebook-setup"]
    assert "zone there.test: update done" in outputs["bluebook-setup"]
    assert _password(topology, "here-setup", "alice@here.test") == password
    assert (topology.volume("here-setup") / "tls" / "ca.pem").read_bytes() == ca
