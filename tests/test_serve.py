"""`mailstack serve` as a process: start-up failures, roles and orderly shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ADDRESS = "127.0.7.10"


def free_port(address: str = ADDRESS) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def write_config(tmp_path: Path, **ports: int) -> Path:
    path = tmp_path / "server.toml"
    lines = [
        "[server]",
        'name = "serve-test"',
        'hostname = "mail.here.test"',
        'domains = ["here.test"]',
        f'listen = ["{ADDRESS}"]',
        'data_dir = "data"',
        "shutdown_timeout = 2.0",
    ]
    for section in ("submission", "imap", "transfer"):
        lines.append(f"[{section}]")
        for key in ("port", "tls_port"):
            name = f"{section}_{key}"
            if name in ports:
                lines.append(f"{key} = {ports[name]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def all_ports() -> dict[str, int]:
    return {
        "submission_port": free_port(),
        "submission_tls_port": free_port(),
        "imap_port": free_port(),
        "imap_tls_port": free_port(),
        "transfer_port": free_port(),
    }


def start(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mailstack", "--log-level", "INFO", "serve", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 30.0) -> list[str]:
    """Read the process output until a line contains ``needle``; return the lines read."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen; output:\n{''.join(lines)}")


def test_port_in_use_fails_with_its_name(tmp_path):
    ports = all_ports()
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind((ADDRESS, ports["imap_port"]))
        blocker.listen()
        config = write_config(tmp_path, **ports)
        result = subprocess.run(
            [sys.executable, "-m", "mailstack", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert "imap" in result.stderr
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_unknown_role_is_rejected(tmp_path):
    config = write_config(tmp_path, **all_ports())
    result = subprocess.run(
        [sys.executable, "-m", "mailstack", "serve", "--config", str(config), "--role", "imap,pop3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown role(s) pop3" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_services_in_reverse(tmp_path, signum):
    ports = all_ports()
    process = start(write_config(tmp_path, **ports))
    try:
        wait_for_line(process, "running roles submission, imap, transfer")
        with socket.create_connection((ADDRESS, ports["transfer_port"]), timeout=5) as client:
            assert client.recv(512).startswith(b"220 ")
        os.kill(process.pid, signum)
        output = process.communicate(timeout=30)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "server serve-test stopped" in output
    stopped = [line for line in output.splitlines() if line.rstrip().endswith(" stopped")]
    order = [name for line in stopped for name in ("transfer", "IMAP", "submission") if f" {name} stopped" in line]
    assert order == ["transfer", "IMAP", "submission"], stopped


def test_role_subset_binds_only_its_ports(tmp_path):
    ports = all_ports()
    process = start(write_config(tmp_path, **ports), "--role", "transfer")
    try:
        wait_for_line(process, "running roles transfer")
        with socket.create_connection((ADDRESS, ports["transfer_port"]), timeout=5) as client:
            assert client.recv(512).startswith(b"220 ")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ADDRESS, ports["submission_port"]), timeout=5).close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ADDRESS, ports["imap_port"]), timeout=5).close()
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert process.returncode == 0
