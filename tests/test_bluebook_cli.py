"""The `mailstack bluebook` commands as an operator runs them, against a served database.

A module-scoped `mailstack bluebook serve` process listens on 127.0.3.2; the
commands change its database and dnspython checks what the server answers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.resolver
import dns.tsigkeyring
import dns.update
import pytest
from click.testing import CliRunner, Result

from mailstack.cli import main

HOST = "127.0.3.2"
MAILSTACK = [sys.executable, "-m", "mailstack"]


def free_port() -> int:
    """Return a port free for both UDP and TCP on HOST."""
    import socket

    for _attempt in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def run(config: Path, *args: str, check: bool = True) -> Result:
    """Run `mailstack bluebook ARGS --config CONFIG` through the real command line, in this process.

    Only `serve` and the first `add` start separate processes, because a
    Python start-up per command would make this file slow on a busy machine.
    """
    result = CliRunner().invoke(main, ["bluebook", *args, "--config", str(config)], env={"MAILSTACK_BLUEBOOK_CONFIG": None})
    if check:
        assert result.exit_code == 0, result.output
    return result


def run_process(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*MAILSTACK, "bluebook", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAILSTACK_")},
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bluebook")
    port = free_port()
    config = folder / "bluebook.toml"
    config.write_text(
        f'[server]\nlisten = ["{HOST}"]\nport = {port}\ndata_dir = "data"\nreload_interval = 0.25\n'
        '[zone]\nttl = 120\n'
    )
    run_process(config, "add", "here.test", "--mx", "mx.here.test", "--address", "127.0.1.10")
    log_file = (folder / "serve.log").open("w")
    process = subprocess.Popen(
        [*MAILSTACK, "--log-level", "INFO", "bluebook", "serve", "--config", str(config)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    query = dns.message.make_query("here.test", "SOA")
    deadline = time.monotonic() + 20
    while True:
        try:
            dns.query.udp(query, HOST, port=port, timeout=0.2)
            break
        except (dns.exception.Timeout, OSError):
            assert process.poll() is None, (folder / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not answer within 20 s"
    yield config, port, process
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    log_file.close()
    text = (folder / "serve.log").read_text()
    assert "Blue Book stopped" in text
    assert "Traceback" not in text


def ask(port: int, name: str, rdtype: str) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype), HOST, port=port, timeout=2)


# The one-second promise is checked by the first tests; the others allow more time so
# that a busy CI machine does not make them fail for a reason they do not test.
RELAXED = 5.0


def wait_for(port: int, name: str, rdtype: str, predicate, limit: float = 1.0) -> float:
    """Query until ``predicate(response)`` holds; return how long it took, failing after ``limit`` s."""
    started = time.monotonic()
    while True:
        response = ask(port, name, rdtype)
        if predicate(response):
            return time.monotonic() - started
        assert time.monotonic() - started < limit, f"{name} {rdtype} not as expected after {limit} s: {response}"
        time.sleep(0.02)


def serial(port: int, zone: str) -> int:
    return ask(port, zone, "SOA").answer[0][0].serial


def test_add_served_within_one_second(served):
    config, port, _process = served
    result = run(config, "add", "there.test", "--mx", "mx.there.test", "--address", "127.0.2.10", "--port-offset", "10000", "--json")
    data = json.loads(result.stdout)
    assert data["domain"] == "there.test"
    assert data["ports"] == {"submission": 10587, "submissions": 10465, "imap": 10143, "imaps": 10993}
    elapsed = wait_for(port, "there.test", "MX", lambda r: r.rcode() == dns.rcode.NOERROR and r.answer)
    assert elapsed < 1.0
    srv = ask(port, "_submission._tcp.there.test", "SRV")
    assert srv.answer[0][0].port == 10587
    address = ask(port, "mx.there.test", "A")
    assert address.answer[0][0].address == "127.0.2.10"


def test_update_raises_serial(served):
    config, port, _process = served
    before = serial(port, "here.test")
    run(config, "update", "here.test", "--address", "127.0.1.11", "--imap-port", "1143")
    wait_for(port, "mx.here.test", "A", lambda r: r.answer and r.answer[0][0].address == "127.0.1.11")
    assert serial(port, "here.test") > before
    assert ask(port, "_imap._tcp.here.test", "SRV").answer[0][0].port == 1143
    # Parts not given stay as they were.
    assert ask(port, "_submission._tcp.here.test", "SRV").answer[0][0].port == 587


def test_record_add_and_remove(served):
    config, port, _process = served
    run(config, "record", "add", "_dmarc.here.test", "TXT", '"v=DMARC1; p=reject"')
    wait_for(port, "_dmarc.here.test", "TXT", lambda r: bool(r.answer), limit=RELAXED)
    run(config, "record", "remove", "_dmarc.here.test", "TXT")
    wait_for(port, "_dmarc.here.test", "TXT", lambda r: r.rcode() == dns.rcode.NXDOMAIN, limit=RELAXED)


def test_remove_zone_then_refused(served):
    config, port, _process = served
    run(config, "add", "gone.test", "--mx", "mx.here.test")
    wait_for(port, "gone.test", "MX", lambda r: bool(r.answer), limit=RELAXED)
    run(config, "remove", "gone.test")
    wait_for(port, "gone.test", "MX", lambda r: r.rcode() == dns.rcode.REFUSED, limit=RELAXED)


def test_key_add_works_for_update(served):
    config, port, _process = served
    info = json.loads(run(config, "key", "add", "demo-key", "--json").stdout)
    assert set(info) == {"name", "algorithm", "secret"}
    assert info["algorithm"] == "hmac-sha256"
    keyring = dns.tsigkeyring.from_text({info["name"]: info["secret"]})
    message = dns.update.UpdateMessage("here.test", keyring=keyring)
    message.add("keyed.here.test.", 60, "A", "192.0.2.5")
    deadline = time.monotonic() + 1.0
    while True:
        # Until the server has loaded the new key it answers BADKEY, which dnspython raises.
        try:
            response = dns.query.tcp(message, HOST, port=port, timeout=2)
            break
        except dns.tsig.PeerBadKey:
            assert time.monotonic() < deadline, "the new key was not accepted within 1 s"
            time.sleep(0.05)
    assert response.rcode() == dns.rcode.NOERROR
    listed = json.loads(run(config, "key", "list", "--json").stdout)
    assert [k["name"] for k in listed] == ["demo-key"]
    assert "secret" not in listed[0]


def test_list_and_show_json(served):
    config, _port, _process = served
    rows = json.loads(run(config, "list", "--json").stdout)
    assert "here.test" in [row["domain"] for row in rows]
    shown = json.loads(run(config, "show", "here.test", "--json").stdout)
    types = {row["type"] for row in shown["records"]}
    assert {"SOA", "NS", "MX", "A", "SRV", "TXT"} <= types
    assert shown["spf"] == ['"v=spf1 mx -all"']
    table = run(config, "list").stdout
    assert "here.test" in table


def test_export_import_round_trip(served, tmp_path):
    config, port, _process = served
    zone_file = tmp_path / "here.zone"
    run(config, "export", "here.test", "--output", str(zone_file))
    text = zone_file.read_text().replace("here.test.", "copy.test.")
    copy = tmp_path / "copy.zone"
    copy.write_text(text)
    result = run(config, "import", str(copy))
    assert "zone copy.test imported" in result.stdout
    wait_for(port, "copy.test", "MX", lambda r: bool(r.answer) and r.answer[0][0].exchange.to_text() == "mx.copy.test.", limit=RELAXED)
    again = run(config, "import", str(copy), check=False)
    assert again.exit_code == 1
    assert "already exists" in again.stderr
    before = serial(port, "copy.test")
    run(config, "import", str(copy), "--replace")
    wait_for(port, "copy.test", "SOA", lambda r: r.answer[0][0].serial > before, limit=RELAXED)


def test_errors_are_clear(served, tmp_path):
    config, _port, _process = served
    duplicate = run(config, "add", "here.test", "--mx", "mx.here.test", "--address", "127.0.1.10", check=False)
    assert duplicate.exit_code == 1
    assert "already exists" in duplicate.stderr
    bad_address = run(config, "add", "bad.test", "--mx", "mx.bad.test", "--address", "not-an-ip", check=False)
    assert bad_address.exit_code == 1
    assert "invalid IP address 'not-an-ip'" in bad_address.stderr
    no_address = run(config, "add", "bad.test", "--mx", "mx.bad.test", check=False)
    assert "give its address with --address" in no_address.stderr
    new_host = run(config, "update", "here.test", "--mx", "mx2.here.test", check=False)
    assert new_host.exit_code == 1
    assert "mail host mx2.here.test. is inside zone here.test.; give its address with --address" in new_host.stderr
    missing = run(config, "update", "absent.test", "--spf", "v=spf1 -all", check=False)
    assert missing.exit_code == 1
    assert "zone absent.test. not found" in missing.stderr
    bad_data = run(config, "record", "add", "x.here.test", "MX", "not", "valid", check=False)
    assert bad_data.exit_code == 1
    assert "invalid MX data" in bad_data.stderr
    soa = run(config, "record", "remove", "here.test", "SOA", check=False)
    assert "SOA record cannot be removed" in soa.stderr
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[server]\nport = 70000\n")
    result = run(bad_config, "list", check=False)
    assert result.exit_code == 1
    assert "port" in result.stderr
    assert "at most 65535" in result.stderr


def test_config_check_bluebook(tmp_path):
    config = tmp_path / "bluebook.toml"
    config.write_text('[keys]\ntsig = ["k:c2VjcmV0"]\n[server]\nlisten = ["127.0.3.9"]\n')
    result = CliRunner().invoke(main, ["config", "check", "--bluebook", str(config)])
    assert result.exit_code == 0, result.output
    assert "c2VjcmV0" not in result.stdout
    assert '"127.0.3.9"' in result.stdout
    config.write_text('[keys]\ntsig = ["k:not base64!"]\n')
    result = CliRunner().invoke(main, ["config", "check", "--bluebook", str(config)])
    assert result.exit_code == 1
    assert "not valid base64" in result.stderr


def test_database_readable_by_owner_only(served):
    config, _port, _process = served
    database = config.parent / "data" / "bluebook.db"
    assert database.stat().st_mode & 0o777 == 0o600
