"""End to end through `mailstack demo`: the world runs as subprocesses and real clients drive it.

One demo world serves the whole module (starting it takes a few seconds). The
clients are smtplib, imaplib, swaks, dig and curl, and the commands the demo
prints are run as printed. The last test stops the world with SIGTERM and checks
that no process is left behind.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import imaplib
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from address_claims import claim_addresses

pytestmark = pytest.mark.slow

# This file's share of the demo tests' loopback range 127.0.8.0/24: the first
# (Blue Book, here.test, there.test) triple that is free, so that a second test
# run on the same machine picks another one.
CANDIDATE_ADDRESSES = [(f"127.0.8.{53 + i}", f"127.0.8.{10 + i}", f"127.0.8.{20 + i}") for i in range(5)]
READY_LINE = "mailstack demo: ready"
START_TIMEOUT = 90.0
MAIL_TIMEOUT = 30.0
SERVICE_MODULES = (
    "mailstack.bluebook.cli",
    "mailstack.submission.service",
    "mailstack.imap.service",
    "mailstack.transfer.service",
)


def missing_services() -> list[str]:
    missing = []
    for name in SERVICE_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


class Demo:
    """A running `mailstack demo` process, its output and its world.json."""

    def __init__(self, data_dir: Path, arguments: list[str]) -> None:
        self.data_dir = data_dir
        self.log_file = data_dir.parent / f"{data_dir.name}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailstack", "demo", "--data", str(data_dir), "--log-file", str(self.log_file), *arguments],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addresses: tuple[str, str, str] = ("", "", "")
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.errors: list[str] = []
        threading.Thread(target=self._read, args=(self.process.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._collect, args=(self.process.stderr, self.errors), daemon=True).start()

    @staticmethod
    def _read(stream: Any, lines: queue.Queue[str | None]) -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    @staticmethod
    def _collect(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def wait_for_line(self, expected: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {expected!r} within {timeout} s\n{self.describe()}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.process.wait(timeout=30)
                raise AssertionError(f"demo exited with {self.process.returncode} before {expected!r}\n{self.describe()}")
            self.output.append(line)
            if line.startswith(expected):
                return

    def describe(self) -> str:
        logs = self.log_file.read_text() if self.log_file.exists() else ""
        return (
            "--- stdout\n" + "\n".join(self.output) + "\n--- stderr\n" + "\n".join(self.errors)
            + "\n--- server logs (last 80 lines)\n" + "\n".join(logs.splitlines()[-80:])
        )

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    missing = missing_services()
    if missing:
        pytest.skip(f"services not on main yet: {', '.join(missing)}")
    data_dir = tmp_path_factory.mktemp("demo") / "world"
    addresses, claim = claim_addresses(CANDIDATE_ADDRESSES, (53, 25))
    running = Demo(data_dir, ["--addresses", ",".join(addresses)])
    running.addresses = addresses
    try:
        running.wait_for_line(READY_LINE, START_TIMEOUT)
        yield running
    finally:
        running.stop()
        os.close(claim)


@pytest.fixture(scope="module")
def world(demo: Demo) -> dict[str, Any]:
    return json.loads((demo.data_dir / "world.json").read_text())


def account(world: dict[str, Any], address: str) -> tuple[dict[str, Any], str]:
    for server in world["servers"].values():
        for entry in server["accounts"]:
            if entry["address"] == address:
                return server, entry["password"]
    raise KeyError(address)


def client_context(world: dict[str, Any]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=world["ca_file"])


def submit(world: dict[str, Any], sender: str, recipient: str, subject: str, **headers: str) -> str:
    """Submit with STARTTLS and AUTH on port 587 of the sender's server; return the Message-ID."""
    server, password = account(world, sender)
    message = email.message.EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Message-ID"] = email.utils.make_msgid(domain=sender.split("@")[1])
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content(f"{subject}\nsent by the demo tests\n")
    with smtplib.SMTP(server["address"], server["ports"]["submission"], timeout=30) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        client.starttls(context=client_context(world))
        client.ehlo("client.test")
        assert "PLAIN" in client.esmtp_features.get("auth", "").upper()
        client.login(sender, password)
        refused = client.send_message(message)
    assert refused == {}
    return message["Message-ID"]


def imap_login(world: dict[str, Any], address: str) -> imaplib.IMAP4_SSL:
    server, password = account(world, address)
    client = imaplib.IMAP4_SSL(server["address"], server["ports"]["imaps"], ssl_context=client_context(world), timeout=30)
    client.login(address, password)
    return client


def fetch_all(client: imaplib.IMAP4_SSL, mailbox: str) -> list[email.message.EmailMessage]:
    status, _ = client.select(mailbox, readonly=True)
    assert status == "OK", mailbox
    status, data = client.uid("SEARCH", "ALL")
    assert status == "OK"
    messages = []
    for uid in data[0].split():
        status, parts = client.uid("FETCH", uid.decode(), "(BODY.PEEK[])")
        assert status == "OK"
        raw = next(part[1] for part in parts if isinstance(part, tuple))
        messages.append(email.message_from_bytes(raw, policy=email.policy.default))
    return messages


def wait_for(
    world: dict[str, Any], address: str, matches: Callable[[email.message.EmailMessage], bool], mailbox: str = "INBOX"
) -> email.message.EmailMessage:
    """Return the first message in the mailbox that ``matches``, looking again until MAIL_TIMEOUT."""
    deadline = time.monotonic() + MAIL_TIMEOUT
    with imap_login(world, address) as client:
        while True:
            for message in fetch_all(client, mailbox):
                if matches(message):
                    return message
            assert time.monotonic() < deadline, f"no matching message in {address}'s {mailbox}"
            time.sleep(0.2)


def wait_until_empty(world: dict[str, Any], address: str, mailbox: str) -> None:
    deadline = time.monotonic() + MAIL_TIMEOUT
    with imap_login(world, address) as client:
        while fetch_all(client, mailbox):
            assert time.monotonic() < deadline, f"{address}'s {mailbox} is still not empty"
            time.sleep(0.2)


def with_message_id(message_id: str) -> Callable[[email.message.EmailMessage], bool]:
    return lambda message: message["Message-ID"] == message_id


def printed_command(demo: Demo, program: str) -> str:
    """Return the first command line the demo printed that starts with ``program``."""
    for line in demo.output:
        if line.strip().startswith(program + " "):
            return line.strip()
    raise AssertionError(f"the demo printed no {program} command\n" + "\n".join(demo.output))


# The world as described ---------------------------------------------------------------


def test_world_file_lists_servers(demo: Demo, world: dict[str, Any]) -> None:
    assert world["bluebook"]["address"] == demo.addresses[0]
    assert world["servers"]["here.test"]["address"] == demo.addresses[1]
    assert world["servers"]["there.test"]["address"] == demo.addresses[2]
    assert Path(world["ca_file"]).is_file()
    assert world["bluebook"]["tsig"]["secret"]
    for server in world["servers"].values():
        assert server["accounts"][0]["password"]
        os.kill(server["pid"], 0)  # raises ProcessLookupError if the server is gone
    os.kill(world["bluebook"]["pid"], 0)
    assert (demo.data_dir / "world.json").stat().st_mode & 0o077 == 0


def test_output_names_passwords_and_ca(demo: Demo, world: dict[str, Any]) -> None:
    text = "\n".join(demo.output)
    assert world["ca_file"] in text
    for address in ("alice@here.test", "bob@there.test"):
        _, password = account(world, address)
        assert re.search(rf"{re.escape(address)}\s+password {re.escape(password)}", text)
    assert "Thunderbird" in text
    assert "mutt" in text


def test_logs_tagged_per_server(demo: Demo) -> None:
    tags = {line.split("|", 1)[0].strip() for line in demo.log_file.read_text().splitlines() if "|" in line}
    assert {"demo", "bluebook", "here.test", "there.test"} <= tags


# DNS --------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (Debian: bind9-dnsutils)")
def test_dig_mx_there(world: dict[str, Any]) -> None:
    bluebook = world["bluebook"]
    result = subprocess.run(
        ["dig", f"@{bluebook['address']}", "-p", str(bluebook["port"]), "MX", "there.test", "+norecurse", "+time=2", "+tries=1"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status: NOERROR" in result.stdout
    assert re.search(r"flags:[^;]*\baa\b", result.stdout)
    assert re.search(r"^there\.test\.\s+\d+\s+IN\s+MX\s+\d+\s+mail\.there\.test\.$", result.stdout, re.MULTILINE)
    address = subprocess.run(
        ["dig", f"@{bluebook['address']}", "-p", str(bluebook["port"]), "A", "mail.there.test", "+short", "+time=2", "+tries=1"],
        capture_output=True, text=True, timeout=30,
    )
    assert address.stdout.split() == [world["servers"]["there.test"]["address"]]


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (Debian: bind9-dnsutils)")
def test_printed_dig_runs(demo: Demo) -> None:
    result = subprocess.run(printed_command(demo, "dig"), shell=True, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "mail.there.test." in result.stdout


# Mail between the domains ----------------------------------------------------------------


def test_alice_to_bob_relayed(world: dict[str, Any]) -> None:
    message_id = submit(world, "alice@here.test", "bob@there.test", "Hello bob")
    received = wait_for(world, "bob@there.test", with_message_id(message_id))
    assert received["Subject"] == "Hello bob"
    assert received["From"] == "alice@here.test"
    assert received["Return-Path"] == "<alice@here.test>"
    trace = " ".join(received.get_all("Received", []))
    assert "mail.there.test" in trace
    assert "mail.here.test" in trace
    # The Outbox copy goes once every delivery of the message is final.
    wait_until_empty(world, "alice@here.test", "Outbox")


def test_bob_reply_reaches_alice(world: dict[str, Any]) -> None:
    original = submit(world, "alice@here.test", "bob@there.test", "Question")
    wait_for(world, "bob@there.test", with_message_id(original))
    reply = submit(world, "bob@there.test", "alice@here.test", "Re: Question", In_Reply_To=original)
    received = wait_for(world, "alice@here.test", with_message_id(reply))
    assert received["In-Reply-To"] == original
    assert received["From"] == "bob@there.test"
    wait_until_empty(world, "bob@there.test", "Outbox")


def test_unknown_user_bounces(world: dict[str, Any]) -> None:
    message_id = submit(world, "alice@here.test", "nobody@there.test", "To nobody")

    def is_report(message: email.message.EmailMessage) -> bool:
        return message.get_content_type() == "multipart/report" and message_id.encode() in message.as_bytes()

    report = wait_for(world, "alice@here.test", is_report)
    assert report.get_param("report-type") == "delivery-status"
    status = next(part for part in report.walk() if part.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert re.search(r"Final-Recipient:\s*rfc822;\s*nobody@there\.test", text, re.IGNORECASE)
    assert re.search(r"Action:\s*failed", text, re.IGNORECASE)
    assert re.search(r"Status:\s*5\.1\.1", text)
    assert report["To"] == "alice@here.test" or "alice@here.test" in str(report["To"])
    wait_until_empty(world, "alice@here.test", "Outbox")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_submits_with_auth(world: dict[str, Any]) -> None:
    here, password = account(world, "alice@here.test")
    subject = f"swaks {uuid.uuid4()}"
    result = subprocess.run(
        [
            "swaks", "--server", f"{here['address']}:{here['ports']['submission']}",
            "--tls", "--tls-verify", "--tls-ca-path", world["ca_file"],
            "--auth", "PLAIN", "--auth-user", "alice@here.test", "--auth-password", password,
            "--from", "alice@here.test", "--to", "bob@there.test",
            "--header", f"Subject: {subject}", "--timeout", "30",
        ],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^<~  250 ", result.stdout, re.MULTILINE)
    received = wait_for(world, "bob@there.test", lambda message: message["Subject"] == subject)
    assert "swaks" in (received["X-Mailer"] or "")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_printed_swaks_runs(demo: Demo, world: dict[str, Any]) -> None:
    result = subprocess.run(printed_command(demo, "swaks"), shell=True, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    queued = re.findall(r"^<~  250 .*", result.stdout, re.MULTILINE)
    assert queued, result.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_printed_curl_lists_inbox(demo: Demo, world: dict[str, Any]) -> None:
    message_id = submit(world, "alice@here.test", "bob@there.test", "For curl")
    wait_for(world, "bob@there.test", with_message_id(message_id))
    result = subprocess.run(printed_command(demo, "curl"), shell=True, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert re.match(r"^\* SEARCH( \d+)+\s*$", result.stdout), result.stdout


def test_printed_python_reads_inbox(demo: Demo, world: dict[str, Any]) -> None:
    message_id = submit(world, "alice@here.test", "bob@there.test", "For python")
    wait_for(world, "bob@there.test", with_message_id(message_id))
    command = printed_command(demo, "python3").replace("python3", sys.executable, 1)
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Subject: For python" in result.stdout


@pytest.mark.skipif(shutil.which("mutt") is None, reason="mutt is not installed")
def test_printed_mutt_settings_send(demo: Demo, world: dict[str, Any], tmp_path: Path) -> None:
    start = next(i for i, line in enumerate(demo.output) if line.startswith("mutt (as alice"))
    settings = []
    for line in demo.output[start + 1:]:
        if not line.strip():
            break
        settings.append(line.strip())
    muttrc = tmp_path / "muttrc"
    muttrc.write_text("\n".join(settings) + "\n")
    subject = f"mutt {uuid.uuid4()}"
    # Batch mode sends through smtp_url and fails instead of prompting if the CA is not trusted.
    result = subprocess.run(
        ["mutt", "-n", "-F", str(muttrc), "-s", subject, "bob@there.test"],
        input="sent by mutt\n", capture_output=True, text=True, timeout=60,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    received = wait_for(world, "bob@there.test", lambda message: message["Subject"] == subject)
    assert received["From"].addresses[0].addr_spec == "alice@here.test"


def test_healthcheck_probes_world(world: dict[str, Any]) -> None:
    here = world["servers"]["here.test"]
    bluebook = world["bluebook"]
    probes = [
        ["smtp", here["address"], str(here["ports"]["smtp"])],
        ["smtp", here["address"], str(here["ports"]["submission"])],
        ["smtps", here["address"], str(here["ports"]["submissions"])],
        ["imap", here["address"], str(here["ports"]["imap"])],
        ["imaps", here["address"], str(here["ports"]["imaps"])],
        ["dns", bluebook["address"], str(bluebook["port"]), "here.test"],
    ]
    for arguments in probes:
        result = subprocess.run(
            [sys.executable, "-m", "mailstack.demo.probe", *arguments], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, f"{arguments}: {result.stderr}"
        assert result.stdout.strip(), arguments
    refused = subprocess.run(
        [sys.executable, "-m", "mailstack.demo.probe", "dns", bluebook["address"], str(bluebook["port"]), "example.com"],
        capture_output=True, text=True, timeout=30,
    )
    assert refused.returncode == 1
    assert "REFUSED" in refused.stderr


# Guards a user runs into -------------------------------------------------------------------


def test_second_demo_same_folder_rejected(demo: Demo) -> None:
    """A second demo on a folder in use stops at once and leaves the first one's world.json."""
    before = (demo.data_dir / "world.json").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "mailstack", "demo", "--data", str(demo.data_dir), "--addresses", "127.0.8.99,127.0.8.98,127.0.8.97"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "another `mailstack demo` is using" in result.stderr
    assert "nothing was started" in result.stderr
    assert (demo.data_dir / "world.json").read_text() == before


def test_wrong_password_rejected(world: dict[str, Any]) -> None:
    here, _ = account(world, "alice@here.test")
    with smtplib.SMTP(here["address"], here["ports"]["submission"], timeout=30) as client:
        client.starttls(context=client_context(world))
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            client.login("alice@here.test", "not the password")
    assert caught.value.smtp_code == 535


def test_submission_needs_auth(world: dict[str, Any]) -> None:
    here, _ = account(world, "alice@here.test")
    with smtplib.SMTP(here["address"], here["ports"]["submission"], timeout=30) as client:
        client.starttls(context=client_context(world))
        client.ehlo("client.test")
        code, _ = client.mail("alice@here.test")
    assert code == 530


def test_port_25_rejects_relay(world: dict[str, Any]) -> None:
    here, _ = account(world, "alice@here.test")
    with smtplib.SMTP(here["address"], here["ports"]["smtp"], timeout=30) as client:
        client.ehlo("peer.test")
        code, _ = client.mail("someone@example.org")
        assert code == 250
        code, _ = client.rcpt("bob@there.test")
    assert 550 <= code <= 554


def test_postmaster_reaches_first_account(world: dict[str, Any]) -> None:
    there, _ = account(world, "bob@there.test")
    with smtplib.SMTP(there["address"], there["ports"]["smtp"], timeout=30) as client:
        client.ehlo("peer.test")
        code, _ = client.mail("someone@example.org")
        assert code == 250
        code, reply = client.rcpt("Postmaster@there.test")
    assert code == 250, reply


def test_imap_login_wrong_password(world: dict[str, Any]) -> None:
    there, _ = account(world, "bob@there.test")
    with imaplib.IMAP4_SSL(there["address"], there["ports"]["imaps"], ssl_context=client_context(world), timeout=30) as client:
        with pytest.raises(imaplib.IMAP4.error):
            client.login("bob@there.test", "not the password")


# Stop --------------------------------------------------------------------------------------


def test_sigterm_stops_everything(demo: Demo, world: dict[str, Any]) -> None:
    pids = [world["bluebook"]["pid"]] + [server["pid"] for server in world["servers"].values()]
    assert demo.stop() == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (demo.data_dir / "world.json").exists()
    errors = "\n".join(demo.errors)
    assert "mailstack demo: stopped" in errors
    logs = demo.log_file.read_text()
    for tag in ("bluebook", "here.test", "there.test"):
        assert re.search(rf"^{re.escape(tag)}\s*\|.*stopped", logs, re.MULTILINE), f"{tag} logged no stop"
