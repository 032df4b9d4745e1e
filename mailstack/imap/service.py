"""The imap role of ``mailstack serve``: IMAP with STARTTLS (143) and implicit TLS (993)."""

from __future__ import annotations

import contextlib
import logging

from mailstack.imap.server import IMAPServer

log = logging.getLogger(__name__)


async def start(context, stack: contextlib.AsyncExitStack) -> None:
    """Bind the IMAP ports on every listen address; clean-up stops accepting and ends sessions.

    At shutdown, sessions waiting for the client get BYE at once, and commands
    that are running get ``server.shutdown_timeout`` seconds to finish.
    """
    config = context.config
    section = config.imap
    server = IMAPServer(context.store, section, context.ssl_context)
    await server.prepare()
    stack.push_async_callback(server.close, config.server.shutdown_timeout)
    for host in config.server.listen:
        if section.port:
            await server.listen(host, section.port, implicit_tls=False)
        if section.tls_port:
            await server.listen(host, section.tls_port, implicit_tls=True)
    if not section.port and not section.tls_port:
        log.warning("imap: both ports are 0, so no IMAP listener was started")
    context.shared["imap_server"] = server
