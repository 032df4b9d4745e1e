"""`mailstack serve --role imap` as an operator runs it: accounts made with the CLI, real clients, SIGTERM."""

from __future__ import annotations

import imaplib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

HOST = "127.0.6.2"
PASSWORD = "operator chosen password"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def mailstack(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailstack", *args, "--config", str(config)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def served(tmp_path):
    """Yield (port, tls_port, ca_file, process) of a running `mailstack serve --role imap`."""
    port, tls_port = free_port(), free_port()
    config = tmp_path / "here.toml"
    config.write_text(
        f'[server]\nname = "here"\nhostname = "localhost"\nlisten = ["{HOST}"]\n'
        f'data_dir = "{tmp_path / "data"}"\ndomains = ["here.test"]\nshutdown_timeout = 5\n'
        f"[imap]\nport = {port}\ntls_port = {tls_port}\nauth_failure_delay = 0.05\n"
    )
    created = mailstack(config, "user", "add", "bob@here.test", "--password-stdin", stdin=PASSWORD + "\n")
    assert created.returncode == 0, created.stderr
    log_path = tmp_path / "serve.log"
    log_file = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mailstack", "serve", "--config", str(config), "--role", "imap"],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection((HOST, tls_port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "server did not start in 30 s"
            time.sleep(0.05)
    ca_file = tmp_path / "data" / "tls" / "ca.pem"
    yield port, tls_port, ca_file, process, log_path
    if process.poll() is None:
        process.kill()
        process.wait(10)
    log_file.close()


def test_serve_imap_end_to_end(served):
    port, tls_port, ca_file, process, log_path = served
    context = ssl.create_default_context(cafile=str(ca_file))

    plain = imaplib.IMAP4(HOST, port, timeout=10)
    assert "LOGINDISABLED" in plain.capabilities
    plain.starttls(ssl_context=context)
    assert plain.login("bob@here.test", PASSWORD)[0] == "OK"
    assert plain.append("Drafts", "(\\Draft)", None, b"Subject: draft\r\n\r\nunfinished\r\n")[0] == "OK"
    plain.logout()

    client = imaplib.IMAP4_SSL(HOST, tls_port, ssl_context=context, timeout=10)
    client.login("bob@here.test", PASSWORD)
    typ, count = client.select("Drafts")
    assert count == [b"1"]
    typ, data = client.fetch("1", "(FLAGS BODY.PEEK[TEXT])")
    assert data[0][1] == b"unfinished\r\n"
    assert b"\\Draft" in data[0][0]

    # A session in IDLE when SIGTERM arrives gets BYE and the process exits cleanly.
    tag = client._new_tag()
    client.send(tag + b" IDLE\r\n")
    assert client.readline().startswith(b"+")
    process.send_signal(signal.SIGTERM)
    assert client.readline().startswith(b"* BYE")
    assert process.wait(20) == 0
    log = log_path.read_text()
    assert "IMAP stopped" in log
    assert PASSWORD not in log


def test_serve_rejects_bad_login_and_logs_it(served):
    _port, tls_port, ca_file, process, log_path = served
    context = ssl.create_default_context(cafile=str(ca_file))
    client = imaplib.IMAP4_SSL(HOST, tls_port, ssl_context=context, timeout=10)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login("bob@here.test", "not the password")
    client.logout()
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    log = log_path.read_text()
    assert "login failed for 'bob@here.test'" in log
    assert "not the password" not in log


def test_list_wildcard_attack_answers_promptly(served):
    """LIST with alternating % and * against a long name must not stall the process.

    A backtracking matcher needs time exponential in the number of wildcard pairs
    here and blocks the event loop, so the socket timeout is the failure mode.
    """
    _port, tls_port, ca_file, process, _log_path = served
    context = ssl.create_default_context(cafile=str(ca_file))
    client = imaplib.IMAP4_SSL(HOST, tls_port, ssl_context=context, timeout=5)
    client.login("bob@here.test", PASSWORD)
    long_name = "x" * 1000
    assert client.create(long_name)[0] == "OK"

    typ, listed = client.list('""', '"' + "%*" * 8 + '!"')
    assert typ == "OK"
    assert listed == [None]
    typ, listed = client.list('""', '"' + "%*" * 8 + 'x"')
    assert typ == "OK"
    assert any(long_name.encode() in line for line in listed)
    assert client.noop()[0] == "OK"
    client.logout()
