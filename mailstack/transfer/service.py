"""The transfer role of ``mailstack serve``: the port 25 listener and the relay queue runner."""

from __future__ import annotations

import contextlib
import logging

from mailstack.smtp import Listener, SMTPOptions, SMTPServer
from mailstack.transfer.client import Sender
from mailstack.transfer.inbound import InboundHandler
from mailstack.transfer.resolver import MXResolver
from mailstack.transfer.runner import QueueRunner, settings_from_config

log = logging.getLogger(__name__)


def build_runner(context, *, owner: str | None = None) -> QueueRunner:
    """Build the queue runner of a server from its configuration and store."""
    config = context.config
    section = config.transfer
    client_settings, retry = settings_from_config(config)
    resolver = MXResolver(
        section.nameservers,
        port=section.dns_port,
        timeout=section.dns_timeout,
        clock=context.store.clock,
    )
    return QueueRunner(
        context.store,
        resolver=resolver,
        sender=Sender(client_settings),
        reporting_mta=config.server.hostname,
        retry=retry,
        lease_time=section.lease_time,
        scan_interval=section.scan_interval,
        max_connections=section.max_outbound_connections,
        max_connections_per_domain=section.max_connections_per_domain,
        owner=owner,
    )


async def start(context, stack: contextlib.AsyncExitStack) -> None:
    """Bind port 25 on every listen address and start the queue runner.

    Clean-up runs in reverse: the runner stops claiming and gives back its
    leases, then the listener stops accepting and lets running sessions end.
    """
    config = context.config
    section = config.transfer
    handler = InboundHandler(
        context.store,
        hostname=config.server.hostname,
        max_received_headers=section.max_received_headers,
        local_addresses=config.server.listen,
        primary_domain=config.server.domains[0] if config.server.domains else None,
    )
    options = SMTPOptions(
        hostname=config.server.hostname,
        max_message_size=section.max_message_size,
        max_recipients=section.max_recipients,
        idle_timeout=section.idle_timeout,
        max_connections=section.max_connections,
        max_connections_per_address=section.max_connections_per_address,
    )
    server = SMTPServer("transfer", handler, options, context.ssl_context)
    stack.push_async_callback(server.close, config.server.shutdown_timeout)
    if section.port:
        for host in config.server.listen:
            await server.listen(host, section.port, Listener("smtp", tls="starttls"))
    else:
        log.info("transfer: inbound port disabled (port = 0); relaying only")
    context.shared["transfer_server"] = server

    runner = build_runner(context)
    runner.start()
    stack.push_async_callback(runner.stop, config.server.shutdown_timeout)
    context.shared["queue_runner"] = runner
