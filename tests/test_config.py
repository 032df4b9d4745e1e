"""Configuration loading: types, ranges, unknown keys, files and environment overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailstack import config
from mailstack.settings import MailServerConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_empty_file_gives_defaults(tmp_path):
    loaded = config.load(MailServerConfig, write(tmp_path, ""), environ={})
    assert loaded.submission.port == 587
    assert loaded.submission.tls_port == 465
    assert loaded.imap.port == 143
    assert loaded.transfer.port == 25
    assert loaded.database_url.startswith("sqlite+aiosqlite:///")


def test_values_are_typed_and_frozen(tmp_path):
    path = write(tmp_path, '[server]\ndomains = ["here.test"]\ndata_dir = "data"\n[submission]\nport = 2587\n')
    loaded = config.load(MailServerConfig, path, environ={})
    assert loaded.server.domains == ("here.test",)
    assert loaded.server.data_dir == tmp_path / "data"
    assert loaded.submission.port == 2587
    with pytest.raises(AttributeError):
        loaded.submission.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[submission]\nprot = 1\n", "unknown key 'prot' in [submission]"),
        ("[smtp]\nport = 1\n", "unknown section [smtp]"),
        ("[submission]\nport = \"587\"\n", "[submission] port: invalid value: expected an integer"),
        ("[submission]\nport = 70000\n", "[submission] port: invalid value: must be at most 65535"),
        ("[submission]\nport = -1\n", "must be at least 0"),
        ("[transfer]\ntls_policy = \"sometimes\"\n", "[transfer] tls_policy: invalid value: expected one of"),
        ("[imap]\nport = true\n", "[imap] port: invalid value: expected an integer"),
        ("[tls]\ncert_file = \"missing.pem\"\nkey_file = \"missing.key\"\n", "file not found"),
        ("[submission]\nport = 25\n", "both use port 25"),
        ("[server]\nroles = [\"pop3\"]\n", "unknown role 'pop3'"),
        ("[server\n", "invalid TOML"),
    ],
)
def test_invalid_values_name_key_and_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(MailServerConfig, path, environ={})
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(config.ConfigError, match="configuration file not found"):
        config.load(MailServerConfig, tmp_path / "absent.toml", environ={})


def test_environment_overrides_file(tmp_path):
    path = write(tmp_path, "[submission]\nport = 2587\n")
    environ = {
        "MAILSTACK_SUBMISSION__PORT": "3587",
        "MAILSTACK_SERVER__DOMAINS": "here.test, there.test",
        "MAILSTACK_STORE__AUTO_UPGRADE": "false",
        "UNRELATED": "x",
    }
    loaded = config.load(MailServerConfig, path, environ=environ)
    assert loaded.submission.port == 3587
    assert loaded.server.domains == ("here.test", "there.test")
    assert loaded.store.auto_upgrade is False


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MAILSTACK_SUBMISSION__PORT", "many", "MAILSTACK_SUBMISSION__PORT: invalid value: expected an integer"),
        ("MAILSTACK_SUBMISSION__PROT", "1", "unknown key 'prot'"),
        ("MAILSTACK_NOPE__PORT", "1", "unknown section [nope]"),
    ],
)
def test_invalid_environment_names_variable(tmp_path, variable, value, expected):
    with pytest.raises(config.ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        config.load(MailServerConfig, write(tmp_path, ""), environ={variable: value})


def test_secrets_are_masked(tmp_path):
    path = write(tmp_path, '[store]\nurl = "postgresql+asyncpg://mail:hunter2@127.0.0.1/mail"\n')
    shown = config.to_dict(config.load(MailServerConfig, path, environ={}))
    assert shown["store"]["url"] == "********"
    assert "hunter2" not in repr(shown)


def test_every_option_is_documented():
    for row in config.describe_options(MailServerConfig):
        assert row["help"], f"[{row['section']}] {row['key']} has no help text"


def test_configuration_doc_is_current():
    """docs/configuration.md must be the output of `mailstack config docs`."""
    from mailstack.cli import render_option_docs

    doc = Path(__file__).parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == render_option_docs(), "run: mailstack config docs > docs/configuration.md"


def test_config_check_command_exits_nonzero(tmp_path):
    path = write(tmp_path, "[imap]\nport = 100000\n")
    result = subprocess.run(
        [sys.executable, "-m", "mailstack", "config", "check", str(path)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "[imap] port" in result.stderr
    assert str(path) in result.stderr


def test_config_check_command_prints_effective_values(tmp_path):
    path = write(tmp_path, '[submission]\nport = 2587\n[store]\nurl = "sqlite+aiosqlite:///x.db"\n')
    result = subprocess.run(
        [sys.executable, "-m", "mailstack", "config", "check", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "port = 2587" in result.stdout
    assert 'url = "********"' in result.stdout


def test_unset_file_options_print_empty(tmp_path):
    shown = config.to_dict(config.load(MailServerConfig, write(tmp_path, ""), environ={}))
    assert shown["tls"]["cert_file"] == ""
    assert shown["tls"]["key_file"] == ""
    assert shown["transfer"]["tls_ca_file"] == ""
