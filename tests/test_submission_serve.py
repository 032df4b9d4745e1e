"""`mailstack serve --role submission` as an operator runs it, including a SIGKILL right after 250."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

HOST = "127.0.4.20"
PORT = 10587
TLS_PORT = 10465


def mailstack(*args: str, config: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailstack", *args, "--config", str(config)],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "here.toml"
    path.write_text(
        f"""
[server]
hostname = "mail.here.test"
domains = ["here.test"]
listen = ["{HOST}"]
data_dir = "{tmp_path / 'data'}"
roles = ["submission"]
shutdown_timeout = 2.0

[submission]
port = {PORT}
tls_port = {TLS_PORT}
auth_failure_delay = 0.0
"""
    )
    # The CLI adds the domains of [server] domains to the store by itself.
    for address, password in (("alice@here.test", "alice-pw-1"), ("bob@here.test", "bob-pw-1")):
        result = mailstack("user", "add", address, "--password-stdin", config=path, stdin=password + "\n")
        assert result.returncode == 0, result.stderr
    return path


def start_server(config: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "mailstack", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            with socket.create_connection((HOST, TLS_PORT), timeout=0.5):
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("mailstack serve did not listen within 30 s")


def ca_context(config: Path) -> ssl.SSLContext:
    shown = mailstack("tls", "show", "--json", config=config)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    text = json.dumps(data)
    ca_file = next(Path(value) for value in _strings(data) if value.endswith("ca.pem"))
    assert ca_file.exists(), text
    return ssl.create_default_context(cafile=str(ca_file))


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_message_survives_sigkill_after_250(config, tmp_path):
    process = start_server(config)
    try:
        context = ca_context(config)
        with smtplib.SMTP(HOST, PORT, timeout=10) as client:
            client.starttls(context=context)
            client.login("alice@here.test", "alice-pw-1")
            client.mail("alice@here.test")
            client.rcpt("bob@here.test")
            code, reply = client.data(b"Subject: durable\r\n\r\nmust survive\r\n")
            # Kill at once, before QUIT and before any clean shutdown.
            os.kill(process.pid, signal.SIGKILL)
        assert code == 250, reply
    finally:
        process.kill()
        process.wait(10)
    database = tmp_path / "data" / "mailstack.db"
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT c.data FROM messages m JOIN message_contents c ON c.sha256 = m.content_sha256 "
            "JOIN mailboxes b ON b.id = m.mailbox_id JOIN accounts a ON a.id = b.account_id "
            "WHERE a.address = 'bob@here.test' AND b.name = 'INBOX'"
        ).fetchall()
    assert len(rows) == 1
    assert rows[0][0].endswith(b"must survive\r\n")
    assert reply.decode().split()[-1].encode() in rows[0][0]


def test_serve_465_and_sigterm_shutdown(config):
    process = start_server(config)
    try:
        context = ca_context(config)
        with smtplib.SMTP_SSL(HOST, TLS_PORT, context=context, timeout=10) as client:
            client.login("bob@here.test", "bob-pw-1")
            refused = client.sendmail("bob@here.test", ["alice@here.test"], b"Subject: hi\r\n\r\nhello\r\n")
            assert refused == {}
            with pytest.raises(smtplib.SMTPSenderRefused) as error:
                client.sendmail("alice@here.test", ["bob@here.test"], b"Subject: spoof\r\n\r\nx\r\n")
            assert error.value.smtp_code == 553
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "submission stopped" in output
        assert "alice-pw-1" not in output
        assert "bob-pw-1" not in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
