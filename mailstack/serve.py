"""`mailstack serve`: every configured role of one mail server in one asyncio process.

Each role lives in a module with ``async def start(context, stack)`` that binds
its listeners and pushes its clean-up onto ``stack``. Services start in one
AsyncExitStack, so SIGTERM or SIGINT closes them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import ssl
from dataclasses import dataclass, field
from typing import Any

from mailstack import tls
from mailstack.settings import ROLES, MailServerConfig
from mailstack.store import Store

log = logging.getLogger(__name__)

ROLE_MODULES = {
    "submission": "mailstack.submission.service",
    "imap": "mailstack.imap.service",
    "transfer": "mailstack.transfer.service",
}


class ServeError(Exception):
    """A service could not start; the message names the service and the cause."""


@dataclass
class ServerContext:
    """What every service of one mail server shares."""

    config: MailServerConfig
    store: Store
    tls_files: tls.TLSFiles
    ssl_context: ssl.SSLContext
    roles: tuple[str, ...]
    # Services put objects here for each other (for example the queue runner).
    shared: dict[str, Any] = field(default_factory=dict)


def available_roles() -> list[str]:
    """Return the roles whose service module is installed."""
    found = []
    for role in ROLES:
        try:
            module = importlib.import_module(ROLE_MODULES[role])
        except ModuleNotFoundError as exc:
            if exc.name != ROLE_MODULES[role]:
                raise
            continue
        if hasattr(module, "start"):
            found.append(role)
    return found


async def start_services(config: MailServerConfig, roles: tuple[str, ...], stack: contextlib.AsyncExitStack) -> ServerContext:
    """Open the store and start ``roles`` on ``stack``; raise ServeError if any fails."""
    available = available_roles()
    missing = [role for role in roles if role not in available]
    if missing:
        raise ServeError(
            f"role(s) not available in this build: {', '.join(missing)}; available: {', '.join(available) or 'none'}"
        )

    config.server.data_dir.mkdir(parents=True, exist_ok=True)
    store = await Store.open(
        config.database_url,
        busy_timeout=config.store.busy_timeout,
        pool_size=config.store.pool_size,
        upgrade=config.store.auto_upgrade,
    )
    stack.push_async_callback(store.close)
    await store.ensure_domains(config.server.domains)

    files = tls.resolve_files(config)
    context = ServerContext(config, store, files, tls.server_context(files), roles)
    for role in ROLES:
        if role not in roles:
            continue
        module = importlib.import_module(ROLE_MODULES[role])
        try:
            await module.start(context, stack)
        except OSError as exc:
            raise ServeError(f"{role}: cannot start: {exc.strerror or exc}") from exc
        log.info("%s started", role, extra={"server": config.server.name})
    return context


async def run(config: MailServerConfig, roles: tuple[str, ...]) -> int:
    """Run until SIGTERM or SIGINT; return the process exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                await start_services(config, roles, stack)
            except ServeError as exc:
                log.error("%s", exc)
                return 1
            log.info("server %s running roles %s", config.server.name, ", ".join(roles))
            await stop.wait()
            log.info("server %s stopping", config.server.name)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("server %s stopped", config.server.name)
    return 0


def run_forever(config: MailServerConfig, roles: tuple[str, ...]) -> int:
    """Run the event loop (uvloop where installed) until the server stops."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(run(config, roles))
    return uvloop.run(run(config, roles))
