"""`mailstack demo --check` on offset ports, run twice on the same data folder.

The first run may not bind ports below 1024 and must pick the fallback offset by
itself; the second run is given another offset explicitly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from address_claims import claim_addresses

pytestmark = pytest.mark.slow

# This file's share of the demo tests' loopback range 127.0.8.0/24: the first free
# (Blue Book, here.test, there.test) triple, so that concurrent runs do not collide.
CANDIDATE_ADDRESSES = [(f"127.0.8.{153 + i}", f"127.0.8.{110 + i}", f"127.0.8.{120 + i}") for i in range(5)]
SERVICE_MODULES = (
    "mailstack.bluebook.cli",
    "mailstack.submission.service",
    "mailstack.imap.service",
    "mailstack.transfer.service",
)


def _missing() -> list[str]:
    missing = []
    for name in SERVICE_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


def can_drop_bind_capability() -> bool:
    """Return whether this process can run a child without CAP_NET_BIND_SERVICE (root with setpriv)."""
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


def run_check(data_dir: Path, addresses: str, *extra: str, low_ports_allowed: bool = True) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "mailstack", "demo", "--check", "--data", str(data_dir),
        "--addresses", addresses, "--timeout", "30", "--log-file", str(data_dir.parent / "check.log"), *extra,
    ]
    if not low_ports_allowed:
        # Root without this capability may not bind ports below 1024, like an ordinary user.
        command = ["setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL)


def explain(result: subprocess.CompletedProcess[str], data_dir: Path) -> str:
    log_file = data_dir.parent / "check.log"
    logs = log_file.read_text().splitlines()[-60:] if log_file.exists() else []
    return f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nlogs:\n" + "\n".join(logs)


def test_check_passes_twice(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    missing = _missing()
    if missing:
        pytest.skip(f"services not on main yet: {', '.join(missing)}")
    data_dir = tmp_path / "world"
    triple, claim = claim_addresses(CANDIDATE_ADDRESSES, (10053, 10025))
    request.addfinalizer(lambda: os.close(claim))
    addresses = ",".join(triple)

    if can_drop_bind_capability():
        first = run_check(data_dir, addresses, low_ports_allowed=False)
    else:
        first = run_check(data_dir, addresses, "--port-offset", "10000")
    assert first.returncode == 0, explain(first, data_dir)
    lines = first.stdout.splitlines()
    step = r"^\[\s*\d+\.\d\d s\] "
    assert re.search(step + r"alice@here\.test -> bob@there\.test: arrived in bob@there\.test's INBOX$", first.stdout, re.M)
    assert re.search(step + r"bob@there\.test -> alice@here\.test: arrived in alice@here\.test's INBOX$", first.stdout, re.M)
    assert re.search(step + r"alice@here\.test -> nobody@there\.test: bounce arrived in alice@here\.test's INBOX", first.stdout, re.M)
    assert lines[-1].endswith("check passed: 3 of 3 arrived")
    assert "FAILED" not in first.stdout
    assert "using standard ports + 10000" in first.stderr
    assert not (data_dir / "world.json").exists()

    config = (data_dir / "here.test" / "mailstack.toml").read_text()
    assert "port = 10025" in config
    assert "dns_port = 10053" in config
    saved = json.loads((data_dir / "passwords.json").read_text())

    # Between the runs, an operator removes bob and the there.test zone. The second
    # run reuses the folder and its passwords, and creates both again.
    for command in (
        ["user", "remove", "bob@there.test", "--yes", "--config", str(data_dir / "there.test" / "mailstack.toml")],
        ["bluebook", "remove", "there.test", "--config", str(data_dir / "bluebook" / "bluebook.toml")],
    ):
        removed = subprocess.run([sys.executable, "-m", "mailstack", *command], capture_output=True, text=True, timeout=60)
        assert removed.returncode == 0, removed.stderr
    # The second run also moves every port, so the zones' SRV records change too.
    second = run_check(data_dir, addresses, "--port-offset", "20000")
    assert second.returncode == 0, explain(second, data_dir)
    assert "port = 20025" in (data_dir / "here.test" / "mailstack.toml").read_text()
    assert json.loads((data_dir / "passwords.json").read_text()) == saved
    assert second.stdout.splitlines()[-1].endswith("check passed: 3 of 3 arrived")


def test_check_fails_when_nothing_can_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "world"
    data_dir.mkdir()
    (data_dir / "unrelated.txt").write_text("not a demo folder")
    triple, claim = claim_addresses(CANDIDATE_ADDRESSES, (10053, 10025))
    try:
        result = run_check(data_dir, ",".join(triple), "--port-offset", "10000")
    finally:
        os.close(claim)
    assert result.returncode == 1
    assert "was not made by `mailstack demo`" in result.stderr
    assert (data_dir / "unrelated.txt").exists()
