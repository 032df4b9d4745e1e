"""`mailstack serve` role "submission": SMTP submission on 587 (STARTTLS) and 465 (implicit TLS)."""

from __future__ import annotations

import contextlib
import logging

from mailstack.smtp import Listener, SMTPOptions, SMTPServer
from mailstack.store.batch import SubmitBatcher
from mailstack.submission.handler import SubmissionHandler
from mailstack.submission.throttle import AuthThrottle

log = logging.getLogger(__name__)

STARTTLS_LISTENER = Listener("submission", tls="starttls", require_tls=True, require_auth=True)
IMPLICIT_TLS_LISTENER = Listener("submissions", tls="implicit", require_tls=True, require_auth=True)


def build_server(context, batcher: SubmitBatcher | None = None) -> SMTPServer:
    """Create the submission server for a ServerContext, without binding sockets.

    With a ``batcher``, messages are stored by group commit; without, one
    transaction each.
    """
    config = context.config
    section = config.submission
    throttle = AuthThrottle(
        limit=section.auth_failure_limit,
        window=section.auth_failure_window,
        delay=section.auth_failure_delay,
    )
    handler = SubmissionHandler(
        context.store,
        hostname=config.server.hostname,
        throttle=throttle,
        trusted_networks=section.trusted_networks,
        submit=batcher.submit if batcher is not None else None,
    )
    options = SMTPOptions(
        hostname=config.server.hostname,
        max_message_size=section.max_message_size,
        max_recipients=section.max_recipients,
        idle_timeout=section.idle_timeout,
        max_connections=section.max_connections,
        max_connections_per_address=section.max_connections_per_address,
    )
    return SMTPServer("submission", handler, options, context.ssl_context)


async def start(context, stack: contextlib.AsyncExitStack) -> None:
    """Bind the submission ports on every listen address; closing is pushed on ``stack``."""
    config = context.config
    section = config.submission
    if not log.isEnabledFor(logging.DEBUG):
        # aiosmtpd logs every command line at INFO; the session log covers what matters.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
    batcher = SubmitBatcher(context.store, busy_timeout=config.store.busy_timeout)
    # The exit stack runs callbacks in reverse: sessions finish before the batcher stops.
    stack.push_async_callback(batcher.close)
    server = build_server(context, batcher)
    stack.push_async_callback(server.close, config.server.shutdown_timeout)
    for host in config.server.listen:
        if section.port:
            await server.listen(host, section.port, STARTTLS_LISTENER)
        if section.tls_port:
            await server.listen(host, section.tls_port, IMPLICIT_TLS_LISTENER)
    if section.trusted_networks:
        log.warning(
            "submission: clients in %s may submit without TLS and AUTH", ", ".join(section.trusted_networks)
        )
    context.shared["submission"] = server
