"""`mailstack queue`: inspect and steer the relay queue, as `mailq` and `postqueue` do.

The commands change the database only. A running server picks up a flushed
or released entry at its next scan, at most ``[transfer] scan_interval`` later.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click

from mailstack.cli import config_option, json_option, load_server_config, run_async, with_store
from mailstack.store.queue import QueueEntry


def _age(created: dt.datetime, now: dt.datetime) -> str:
    seconds = max(int((now - created).total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


def _entry_json(entry: QueueEntry) -> dict:
    return {
        "queue_id": entry.queue_id,
        "created": entry.created.isoformat(timespec="seconds"),
        "size": entry.size,
        "sender": entry.envelope_sender,
        "delay_warned": entry.delay_warned,
        "recipients": [
            {
                "recipient": d.recipient,
                "state": d.state,
                "attempts": d.attempts,
                "next_attempt": d.next_attempt.isoformat(timespec="seconds"),
                "last_reply": d.last_reply,
                "leased_by": d.lease_owner,
                "lease_expiry": d.lease_expiry.isoformat(timespec="seconds") if d.lease_expiry else None,
            }
            for d in entry.deliveries
        ],
    }


def _print_entries(entries: list[QueueEntry], *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([_entry_json(e) for e in entries], indent=2))
        return
    if not entries:
        click.echo("Mail queue is empty")
        return
    now = dt.datetime.now(dt.timezone.utc)
    click.echo(f"{'Queue ID':<18} {'Age':>7} {'Size':>9}  Sender")
    recipients = 0
    for entry in entries:
        click.echo(f"{entry.queue_id:<18} {_age(entry.created, now):>7} {entry.size:>9}  <{entry.envelope_sender}>")
        for d in entry.deliveries:
            recipients += 1
            next_text = d.next_attempt.isoformat(timespec="seconds") if d.state in ("queued", "deferred") else "-"
            click.echo(f"    <{d.recipient}>  {d.state}, {d.attempts} attempt(s), next {next_text}")
            if d.last_reply:
                click.echo(f"        {d.last_reply}")
        click.echo("")
    click.echo(f"-- {len(entries)} message(s), {recipients} recipient(s)")


@click.group("queue")
def queue() -> None:
    """Show and manage the outbound relay queue."""


@queue.command("list")
@config_option
@json_option
def queue_list(config_path: Path | None, as_json: bool) -> None:
    """List queued messages with each recipient's state, attempts, next attempt and last reply."""
    config = load_server_config(config_path)
    entries = run_async(with_store(config, lambda store: store.list_queue()))
    _print_entries(entries, as_json=as_json)


@queue.command("show")
@click.argument("queue_id")
@config_option
@json_option
def queue_show(queue_id: str, config_path: Path | None, as_json: bool) -> None:
    """Show one queued message, its recipients and its headers."""
    config = load_server_config(config_path)

    async def action(store):
        entry = await store.get_queue_entry(queue_id)
        return entry, await store.load_content(entry.content_sha256)

    entry, data = run_async(with_store(config, action))
    end = data.find(b"\r\n\r\n")
    headers = (data if end < 0 else data[:end]).decode("utf-8", "replace")
    if as_json:
        shown = _entry_json(entry)
        shown["headers"] = headers
        click.echo(json.dumps(shown, indent=2))
        return
    _print_entries([entry], as_json=False)
    click.echo("")
    click.echo(headers)


@queue.command("flush")
@click.argument("queue_id", required=False)
@config_option
def queue_flush(queue_id: str | None, config_path: Path | None) -> None:
    """Make every queued and deferred delivery (or those of QUEUE_ID) due now."""
    config = load_server_config(config_path)
    count = run_async(with_store(config, lambda store: store.flush_queue(queue_id)))
    click.echo(f"{count} delivery(ies) due now")


@queue.command("hold")
@click.argument("queue_id")
@config_option
def queue_hold(queue_id: str, config_path: Path | None) -> None:
    """Keep QUEUE_ID back from delivery until it is released."""
    config = load_server_config(config_path)
    count = run_async(with_store(config, lambda store: store.hold_queue_entry(queue_id)))
    click.echo(f"{queue_id}: {count} delivery(ies) held")


@queue.command("release")
@click.argument("queue_id")
@config_option
def queue_release(queue_id: str, config_path: Path | None) -> None:
    """Return a held QUEUE_ID to the queue, due now."""
    config = load_server_config(config_path)
    count = run_async(with_store(config, lambda store: store.release_queue_entry(queue_id)))
    click.echo(f"{queue_id}: {count} delivery(ies) released")


@queue.command("delete")
@click.argument("queue_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_option
def queue_delete(queue_id: str, yes: bool, config_path: Path | None) -> None:
    """Remove QUEUE_ID from the queue and the sender's Outbox, without a bounce."""
    config = load_server_config(config_path)
    if not yes:
        click.confirm(f"Delete {queue_id} without notifying the sender?", abort=True)
    count = run_async(with_store(config, lambda store: store.delete_queue_entry(queue_id)))
    click.echo(f"{queue_id}: deleted, {count} recipient(s) were still pending")
