"""The `mailstack` command line as an operator uses it, in a subprocess."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest


def mailstack(*args: str, config: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mailstack", *args]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "server.toml"
    path.write_text('[server]\ndata_dir = "data"\ndomains = ["here.test"]\n')
    return path


def test_user_lifecycle(config):
    added = mailstack("user", "add", "alice@here.test", "--password-stdin", config=config, stdin="s3cret pass\n")
    assert added.returncode == 0, added.stderr
    assert "account alice@here.test created" in added.stdout

    listed = mailstack("user", "list", "--json", config=config)
    assert listed.returncode == 0, listed.stderr
    assert [row["address"] for row in json.loads(listed.stdout)] == ["alice@here.test"]

    changed = mailstack("user", "passwd", "alice@here.test", "--password-stdin", config=config, stdin="other\n")
    assert changed.returncode == 0, changed.stderr

    removed = mailstack("user", "remove", "alice@here.test", "--yes", config=config)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(mailstack("user", "list", "--json", config=config).stdout) == []


def test_password_never_stored_in_clear(config, tmp_path):
    mailstack("user", "add", "alice@here.test", "--password-stdin", config=config, stdin="very-secret-words\n")
    database = tmp_path / "data" / "mailstack.db"
    with sqlite3.connect(database) as connection:
        (stored,) = connection.execute("SELECT password_hash FROM accounts").fetchone()
    assert stored.startswith("$argon2id$")
    assert b"very-secret-words" not in database.read_bytes()


def test_user_add_has_no_password_argument(config):
    result = mailstack("user", "add", "alice@here.test", "--password", "x", config=config)
    assert result.returncode != 0
    assert "No such option" in result.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("user", "add", "bob@nowhere.test", "--password-stdin"), "pw\n", "domain nowhere.test not found"),
        (("user", "add", "not-an-address", "--password-stdin"), "pw\n", "invalid address 'not-an-address'"),
        (("user", "add", "carol@here.test", "--password-stdin"), "\n", "the password is empty"),
        (("user", "passwd", "nobody@here.test", "--password-stdin"), "pw\n", "account nobody@here.test not found"),
        (("domain", "remove", "nowhere.test"), None, "domain nowhere.test not found"),
        (("domain", "add", "bad..name"), None, "invalid domain 'bad..name'"),
    ],
)
def test_errors_are_plain_and_nonzero(config, args, stdin, message):
    result = mailstack(*args, config=config, stdin=stdin)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_domain_add_list_remove(config):
    assert mailstack("domain", "add", "There.Test", config=config).returncode == 0
    listed = json.loads(mailstack("domain", "list", "--json", config=config).stdout)
    assert [row["domain"] for row in listed] == ["here.test", "there.test"]
    duplicate = mailstack("domain", "add", "there.test", config=config)
    assert duplicate.returncode == 1
    assert "already exists" in duplicate.stderr
    assert mailstack("domain", "remove", "there.test", config=config).returncode == 0


def test_db_upgrade_is_idempotent(config):
    first = mailstack("db", "upgrade", config=config)
    second = mailstack("db", "upgrade", config=config)
    assert first.returncode == 0, first.stderr
    assert "upgraded from empty" in first.stdout
    assert "already at revision" in second.stdout


def test_db_upgrade_refuses_newer_schema(config, tmp_path):
    assert mailstack("db", "upgrade", config=config).returncode == 0
    with sqlite3.connect(tmp_path / "data" / "mailstack.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'ffff_newer'")
    result = mailstack("user", "list", config=config)
    assert result.returncode == 1
    assert "ffff_newer" in result.stderr
    assert "newer mailstack" in result.stderr


def test_invalid_config_stops_before_anything(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[submission]\nport = 700000\n")
    result = mailstack("serve", config=path)
    assert result.returncode == 1
    assert "[submission] port" in result.stderr
    assert str(path) in result.stderr


def test_tls_show_creates_local_ca(config, tmp_path):
    result = mailstack("tls", "show", "--json", config=config)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert Path(info["ca_file"]) == tmp_path / "data" / "tls" / "ca.pem"
    assert len(info["ca_sha256"].split(":")) == 32
    key_mode = (tmp_path / "data" / "tls" / "server.key").stat().st_mode & 0o777
    assert key_mode == 0o600


def test_log_format_json(config):
    result = mailstack("--log-level", "INFO", "--log-format", "json", "domain", "add", "there.test", config=config)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(r["message"] == "domain added: there.test" and r["level"] == "INFO" for r in records)
