"""`mailstack queue` run as an operator runs it, against a store with queued mail."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from mailstack.cli import main
from mailstack.store import Store

MESSAGE = b"From: alice@here.test\r\nTo: bob@there.test\r\nSubject: queued\r\n\r\nWaiting.\r\n"


@pytest.fixture
async def queued(tmp_path):
    config = tmp_path / "here.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            domains = ["here.test"]
            data_dir = "{tmp_path / 'data'}"
            """
        )
    )
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'mailstack.db'}")
    await store.add_domain("here.test")
    alice = await store.create_account("alice@here.test", "pw")
    queue_id = await store.submit(
        MESSAGE,
        account_id=alice.id,
        envelope_sender="alice@here.test",
        local_account_ids=[],
        remote_recipients=["bob@there.test", "carol@there.test"],
    )
    await store.close()
    return config, queue_id


def mailstack(config, *args: str) -> subprocess.CompletedProcess:
    """Run the installed command in a new process, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "mailstack", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def invoke(config, *args: str):
    """Run a command in this process with click's test runner, which is much faster."""
    return CliRunner().invoke(main, [*args, "--config", str(config)], catch_exceptions=False)


def test_queue_list_text_and_json(queued):
    config, queue_id = queued
    text = mailstack(config, "queue", "list")
    assert text.returncode == 0, text.stderr
    assert queue_id in text.stdout
    assert "<bob@there.test>  queued, 0 attempt(s)" in text.stdout
    assert "-- 1 message(s), 2 recipient(s)" in text.stdout

    listed = mailstack(config, "queue", "list", "--json")
    (entry,) = json.loads(listed.stdout)
    assert entry["queue_id"] == queue_id
    assert entry["sender"] == "alice@here.test"
    assert entry["size"] == len(MESSAGE)
    assert [r["recipient"] for r in entry["recipients"]] == ["bob@there.test", "carol@there.test"]
    assert {r["state"] for r in entry["recipients"]} == {"queued"}


def test_queue_show_prints_headers(queued):
    config, queue_id = queued
    shown = mailstack(config, "queue", "show", queue_id.lower(), "--json")
    assert shown.returncode == 0, shown.stderr
    entry = json.loads(shown.stdout)
    assert "Subject: queued" in entry["headers"]
    assert "Waiting." not in entry["headers"]


def test_queue_hold_release_flush_delete(queued):
    config, queue_id = queued
    held = invoke(config, "queue", "hold", queue_id)
    assert held.output.strip() == f"{queue_id}: 2 delivery(ies) held"
    listed = json.loads(invoke(config, "queue", "list", "--json").output)
    assert {r["state"] for r in listed[0]["recipients"]} == {"held"}
    released = invoke(config, "queue", "release", queue_id)
    assert released.output.strip() == f"{queue_id}: 2 delivery(ies) released"
    flushed = invoke(config, "queue", "flush")
    assert flushed.output.strip() == "2 delivery(ies) due now"
    deleted = invoke(config, "queue", "delete", queue_id, "--yes")
    assert deleted.exit_code == 0, deleted.output
    assert "2 recipient(s) were still pending" in deleted.output
    assert invoke(config, "queue", "list").output.strip() == "Mail queue is empty"


def test_queue_unknown_id_fails(queued):
    config, _ = queued
    for command in (["show", "NOSUCHID"], ["hold", "NOSUCHID"], ["flush", "NOSUCHID"], ["delete", "NOSUCHID", "--yes"]):
        result = invoke(config, "queue", *command)
        assert result.exit_code == 1, command
        assert "queue id NOSUCHID not found" in result.stderr
