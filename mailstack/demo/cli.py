"""The `mailstack demo` command: run the two-domain world until Ctrl-C, or check it and exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

import click

from mailstack import logs
from mailstack.demo import check as check_module
from mailstack.demo import instructions, world as world_module
from mailstack.demo.plan import (
    DEFAULT_ADDRESSES,
    DEFAULT_DATA_DIR,
    FALLBACK_PORT_OFFSET,
    PlanError,
    World,
    check_bindable,
    choose_port_offset,
    parse_addresses,
    plan_world,
)
from mailstack.demo.processes import TAG_WIDTH, ChildFailed, Supervisor

log = logging.getLogger(__name__)

# Printed on standard output once world.json is written; scripts may wait for it.
READY_LINE = "mailstack demo: ready"
# Added to each server's shutdown_timeout before the demo kills what is still running.
KILL_MARGIN = 5.0


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the check was running."""


def _echo_now(text: str) -> None:
    """Print one line and flush it, so that a reader of a pipe gets each check step at once."""
    click.echo(text)
    sys.stdout.flush()


async def _run(
    world: World,
    supervisor: Supervisor,
    *,
    fresh: bool,
    check: bool,
    timeout: float,
    stop: asyncio.Event,
    ready: asyncio.Event,
    locks: list[int],
) -> int:
    locks.append(world_module.prepare_data_dir(world, fresh))
    secrets_document = world_module.load_secrets(world)
    world_module.issue_certificates(world)
    world_module.write_configs(world, secrets_document["tsig"])
    click.echo(f"mailstack demo: setting up {world.data_dir}", err=True)
    await world_module.register(world, supervisor, secrets_document["accounts"])

    started = time.monotonic()
    children = await world_module.start_servers(world, supervisor)
    await world_module.wait_until_ready(world, supervisor, timeout)
    description = world_module.write_world_file(world, secrets_document, children)
    ready.set()
    log.info("every server responded %.2f s after start", time.monotonic() - started)

    if check:
        _echo_now(f"{READY_LINE} (check mode)")
        check_task = asyncio.create_task(check_module.run_check(description, _echo_now, timeout))
        failure = asyncio.create_task(supervisor.wait_for_failure())
        stopped = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({check_task, failure, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (check_task, failure, stopped):
                task.cancel()
        if failure in done:
            raise ChildFailed(failure.result())
        if check_task in done:
            return 0 if check_task.result() else 1
        raise Interrupted()

    click.echo(instructions.render(description))
    click.echo(READY_LINE)
    sys.stdout.flush()
    failure = asyncio.create_task(supervisor.wait_for_failure())
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({failure, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        failure.cancel()
        stopped.cancel()
    if failure in done and not stop.is_set():
        raise ChildFailed(failure.result())
    return 0


async def run_demo(world: World, *, fresh: bool, check: bool, timeout: float, sink: TextIO) -> int:
    """Run the world until a signal (or, with ``check``, until the check ends); return the exit status."""
    loop = asyncio.get_running_loop()
    supervisor = Supervisor(sink)
    stop = asyncio.Event()
    ready = asyncio.Event()
    # The data folder's lock, released only after every child has stopped.
    locks: list[int] = []
    work = asyncio.create_task(
        _run(world, supervisor, fresh=fresh, check=check, timeout=timeout, stop=stop, ready=ready, locks=locks)
    )

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("%s received again; already stopping", signal.Signals(signum).name)
            return
        log.info("%s received; stopping the demo", signal.Signals(signum).name)
        stop.set()
        # Until the world is ready, stopping means abandoning the start-up.
        if not ready.is_set():
            work.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await work
    except asyncio.CancelledError:
        click.echo("mailstack demo: interrupted before every server responded", err=True)
        return 1
    except Interrupted:
        click.echo("mailstack demo: interrupted during the check", err=True)
        return 1
    except (world_module.WorldError, ChildFailed, PlanError) as exc:
        click.echo(f"mailstack demo: {exc}", err=True)
        return 1
    finally:
        # world.json belongs to whoever holds the data folder's lock: a demo that
        # was rejected because another one runs there must leave its file alone.
        if locks:
            with contextlib.suppress(FileNotFoundError):
                world.world_file.unlink()
        await supervisor.stop(world.shutdown_timeout + KILL_MARGIN)
        for descriptor in locks:
            os.close(descriptor)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        click.echo("mailstack demo: stopped" if locks else "mailstack demo: nothing was started", err=True)


def _log_to_stream(sink: TextIO, *, json_format: bool) -> None:
    """Send the demo's own log records to the merged stream, tagged like a server's lines."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sink)
            if not json_format:
                handler.setFormatter(logging.Formatter(f"{'demo':<{TAG_WIDTH}}| {logs.TEXT_FORMAT}"))


@click.command("demo")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="Folder for the configurations, stores, CA and world.json; reused on the next run.",
)
@click.option("--fresh", is_flag=True, help="Delete the data folder of a previous demo run first.")
@click.option(
    "--addresses",
    default=",".join(DEFAULT_ADDRESSES),
    show_default=True,
    help="Loopback addresses of the Blue Book, here.test and there.test, comma-separated.",
)
@click.option(
    "--port-offset",
    type=click.IntRange(0, 55000),
    default=None,
    help=f"Number added to every standard port (53, 25, 587, 465, 143, 993). Default: 0 when "
    f"this process may bind ports below 1024, else {FALLBACK_PORT_OFFSET}.",
)
@click.option("--check", is_flag=True, help="Send alice to bob, bob to alice and one mail to an unknown user, wait for each, then stop.")
@click.option(
    "--timeout",
    type=click.FloatRange(1, 3600),
    default=60.0,
    show_default=True,
    help="Seconds allowed for the servers to respond at start-up, and for each mail in --check.",
)
@click.option(
    "--log-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Append the servers' merged log stream to this file instead of standard error.",
)
@click.option(
    "--server-log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Lowest level the servers log.",
)
@click.pass_context
def demo(
    context: click.Context,
    data_dir: Path,
    fresh: bool,
    addresses: str,
    port_offset: int | None,
    check: bool,
    timeout: float,
    log_file: Path | None,
    server_log_level: str,
) -> None:
    """Run a Blue Book and two mail servers, here.test and there.test, on loopback addresses.

    Prints the passwords, the CA file and commands for swaks, dig, curl, Python,
    Thunderbird and mutt once every server responds, then runs until Ctrl-C or SIGTERM.
    """
    obj = context.obj or {}
    logs.setup(obj.get("log_level") or "INFO", obj.get("log_format") or "text")
    try:
        chosen = parse_addresses(addresses)
        offset = choose_port_offset(port_offset, chosen[1])
    except PlanError as exc:
        raise click.UsageError(str(exc)) from None
    world = plan_world(data_dir, chosen, offset, log_level=server_log_level.upper())
    problems = check_bindable(world)
    if problems:
        raise click.ClickException("cannot bind the demo's listeners:\n  " + "\n  ".join(problems))
    if offset:
        click.echo(f"mailstack demo: using standard ports + {offset}", err=True)

    with contextlib.ExitStack() as files:
        sink = files.enter_context(log_file.open("a", encoding="utf-8")) if log_file else sys.stderr
        _log_to_stream(sink, json_format=(obj.get("log_format") == "json"))
        status = asyncio.run(run_demo(world, fresh=fresh, check=check, timeout=timeout, sink=sink))
    sys.exit(status)
