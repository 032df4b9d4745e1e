"""The demo's layout, configuration files and command-line guards, without starting servers."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from address_claims import claim_addresses

from mailstack import config as config_module
from mailstack.demo import plan, world as world_module
from mailstack.settings import MailServerConfig

# This file's share of the demo tests' loopback range 127.0.8.0/24.
ADDRESSES = ("127.0.8.201", "127.0.8.202", "127.0.8.203")


@pytest.fixture
def claimed() -> tuple[str, str, str]:
    """A triple of addresses that no concurrent test run binds, for the tests that bind."""
    candidates = [tuple(f"127.0.8.{base + i}" for i in range(3)) for base in (211, 214, 217, 220)]
    triple, claim = claim_addresses(candidates, (30053, 30025))
    yield triple
    os.close(claim)


def _demo(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailstack", "demo", *arguments],
        capture_output=True, text=True, timeout=60, cwd=cwd, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.8.1,127.0.8.2", "three comma-separated"),
        ("127.0.8.1,127.0.8.2,127.0.8.2", "must differ"),
        ("127.0.8.1,10.0.0.1,127.0.8.3", "not a loopback"),
        ("127.0.8.1,::1,127.0.8.3", "not a loopback IPv4"),
        ("127.0.8.1,mail,127.0.8.3", "not an IP address"),
    ],
)
def test_parse_addresses_rejects(text: str, message: str) -> None:
    with pytest.raises(plan.PlanError, match=message):
        plan.parse_addresses(text)


def test_parse_addresses_accepts_loopback() -> None:
    assert plan.parse_addresses(" 127.0.8.1, 127.0.8.2 ,127.0.8.3") == ("127.0.8.1", "127.0.8.2", "127.0.8.3")


def test_port_offset_applies_to_all(tmp_path: Path) -> None:
    world = plan.plan_world(tmp_path, ADDRESSES, 20000)
    assert world.bluebook.port == 20053
    for server in world.servers:
        assert server.ports == {"smtp": 20025, "submission": 20587, "submissions": 20465, "imap": 20143, "imaps": 20993}


def test_explicit_offset_is_kept() -> None:
    assert plan.choose_port_offset(123, ADDRESSES[1]) == 123


def test_port_in_use_is_reported(tmp_path: Path, claimed: tuple[str, str, str]) -> None:
    world = plan.plan_world(tmp_path, claimed, 30000)
    assert plan.check_bindable(world) == []
    with socket.socket() as holder:
        holder.bind((claimed[2], 30587))
        holder.listen()
        problems = plan.check_bindable(world)
    assert len(problems) == 1
    assert problems[0].startswith(f"{claimed[2]}:30587/TCP: already in use")


def test_configs_pass_config_check(tmp_path: Path) -> None:
    world = plan.plan_world(tmp_path / "demo", ADDRESSES, 30000)
    os.close(world_module.prepare_data_dir(world, fresh=False))
    document = world_module.load_secrets(world)
    world_module.issue_certificates(world)
    world_module.write_configs(world, document["tsig"])

    for server in world.servers:
        path = world.server_config(server)
        assert path.stat().st_mode & 0o077 == 0
        loaded = config_module.load(MailServerConfig, path, environ={})
        assert loaded.server.listen == (server.address,)
        assert loaded.server.domains == (server.domain,)
        assert loaded.submission.port == 30587
        assert loaded.transfer.peer_port == loaded.transfer.port == 30025
        assert loaded.transfer.nameservers == (world.bluebook.address,)
        assert loaded.transfer.dns_port == 30053
        assert loaded.transfer.tls_ca_file.resolve() == world.ca_file
        assert loaded.tls.cert_file.is_file()
        result = subprocess.run(
            [sys.executable, "-m", "mailstack", "config", "check", str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr

    bluebook_config = pytest.importorskip("mailstack.bluebook.config")
    loaded = config_module.load(bluebook_config.BlueBookConfig, world.bluebook_config, environ={})
    assert loaded.server.listen == (world.bluebook.address,)
    assert loaded.server.port == 30053
    assert loaded.keys.tsig[0].endswith(document["tsig"]["secret"])


def test_certificates_from_one_ca(tmp_path: Path) -> None:
    from cryptography import x509

    world = plan.plan_world(tmp_path / "demo", ADDRESSES, 30000)
    os.close(world_module.prepare_data_dir(world, fresh=False))
    world_module.issue_certificates(world)
    ca = x509.load_pem_x509_certificate(world.ca_file.read_bytes())
    for server in world.servers:
        certificate = x509.load_pem_x509_certificate((world.server_tls_dir(server) / "server.pem").read_bytes())
        assert certificate.issuer == ca.subject
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert server.hostname in names.get_values_for_type(x509.DNSName)
        assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == [server.address]


def test_secrets_survive_rerun(tmp_path: Path) -> None:
    world = plan.plan_world(tmp_path / "demo", ADDRESSES, 30000)
    os.close(world_module.prepare_data_dir(world, fresh=False))
    first = world_module.load_secrets(world)
    assert set(first["accounts"]) == {"alice@here.test", "bob@there.test"}
    assert world.passwords_file.stat().st_mode & 0o077 == 0
    os.close(world_module.prepare_data_dir(world, fresh=False))
    assert world_module.load_secrets(world) == first
    os.close(world_module.prepare_data_dir(world, fresh=True))
    assert not world.passwords_file.exists()
    assert world_module.load_secrets(world)["accounts"] != first["accounts"]


def test_fresh_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    world = plan.plan_world(tmp_path, ADDRESSES, 30000)
    with pytest.raises(world_module.WorldError, match="was not made by `mailstack demo`"):
        world_module.prepare_data_dir(world, fresh=True)
    with pytest.raises(world_module.WorldError, match="was not made by `mailstack demo`"):
        world_module.prepare_data_dir(world, fresh=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_second_demo_same_folder_rejected(tmp_path: Path) -> None:
    world = plan.plan_world(tmp_path / "demo", ADDRESSES, 30000)
    held = world_module.prepare_data_dir(world, fresh=False)
    try:
        world_module.load_secrets(world)
        with pytest.raises(world_module.WorldError, match="another `mailstack demo` is using"):
            world_module.prepare_data_dir(world, fresh=True)
        # The rejected --fresh deleted nothing.
        assert world.passwords_file.exists()
    finally:
        os.close(held)
    os.close(world_module.prepare_data_dir(world, fresh=False))


def test_cli_rejects_public_address(tmp_path: Path) -> None:
    result = _demo("--addresses", "127.0.8.201,192.0.2.10,127.0.8.203", "--data", str(tmp_path / "d"), cwd=tmp_path)
    assert result.returncode == 2
    assert "192.0.2.10 is not a loopback IPv4 address" in result.stderr
    assert not (tmp_path / "d").exists()


def test_cli_reports_busy_port(tmp_path: Path, claimed: tuple[str, str, str]) -> None:
    with socket.socket() as holder:
        holder.bind((claimed[1], 31025))
        holder.listen()
        result = _demo(
            "--addresses", ",".join(claimed), "--port-offset", "31000", "--data", str(tmp_path / "d"), cwd=tmp_path
        )
    assert result.returncode == 1
    assert f"{claimed[1]}:31025/TCP: already in use" in result.stderr
    assert not (tmp_path / "d").exists()


def test_world_description_lists_accounts(tmp_path: Path) -> None:
    world = plan.plan_world(tmp_path, ADDRESSES, 0)
    passwords = {"alice@here.test": "a-secret", "bob@there.test": "b-secret"}
    tsig = {"name": "demo-key", "algorithm": "hmac-sha256", "secret": "c2VjcmV0"}
    description = json.loads(json.dumps(world.describe(passwords, tsig, {"here.test": 11})))
    assert description["bluebook"]["address"] == ADDRESSES[0]
    assert description["bluebook"]["port"] == 53
    assert description["bluebook"]["tsig"] == tsig
    here = description["servers"]["here.test"]
    assert here["address"] == ADDRESSES[1]
    assert here["ports"]["submission"] == 587
    assert here["accounts"] == [{"address": "alice@here.test", "password": "a-secret"}]
    assert here["pid"] == 11
    assert description["servers"]["there.test"]["accounts"][0]["address"] == "bob@there.test"
    assert description["ca_file"] == str(world.ca_file)


def _processes_mentioning(text: str) -> list[int]:
    """Return the pids whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command_line:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc to find processes")
def test_sigint_during_setup_leaves_nothing(tmp_path: Path, claimed: tuple[str, str, str]) -> None:
    if importlib.util.find_spec("mailstack.bluebook") is None:
        pytest.skip("the Blue Book package is not on main yet")
    data_dir = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "mailstack", "demo", "--data", str(data_dir), "--addresses", ",".join(claimed),
         "--port-offset", "30000"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stderr is not None
        # The line is printed just before the first registration command starts.
        for line in process.stderr:
            if line.startswith("mailstack demo: setting up"):
                break
        else:
            raise AssertionError("the demo never reached the set-up step")
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1
    assert "interrupted before every server responded" in errors
    assert "mailstack demo: stopped" in errors
    assert _processes_mentioning(str(data_dir)) == []
    assert not (data_dir / "world.json").exists()


def test_stale_world_file_removed(tmp_path: Path) -> None:
    world = plan.plan_world(tmp_path / "demo", ADDRESSES, 30000)
    os.close(world_module.prepare_data_dir(world, fresh=False))
    # A demo killed with SIGKILL cannot remove its world.json.
    world.world_file.write_text('{"servers": {}}')
    os.close(world_module.prepare_data_dir(world, fresh=False))
    assert not world.world_file.exists()


def test_passwords_never_look_like_options() -> None:
    passwords = [world_module.generate_password() for _ in range(2000)]
    assert all(password.isalnum() and len(password) == 16 for password in passwords)
    assert len(set(passwords)) == len(passwords)
