"""The SMTP server base that submission (587/465) and transfer (25) share, built on aiosmtpd.

A service describes its policy in an :class:`SMTPHandler` subclass and runs it
on an :class:`SMTPServer`::

    class InboundHandler(SMTPHandler):
        async def check_recipient(self, session, envelope, path):
            if not await store.resolve_recipient(path.address):
                raise SMTPError(Reply(550, "5.1.1", "No such user"))

        async def handle_message(self, session, envelope, content):
            queue_id = await store_it(content)          # returns after the commit
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    server = SMTPServer("transfer", InboundHandler(), SMTPOptions(hostname=..., max_message_size=...),
                        ssl_context)
    await server.listen("127.0.0.1", 25, Listener("smtp", tls="starttls"))
    ...
    await server.close(timeout)

Hooks (all optional except ``handle_message``; each may raise
``SMTPError(reply, reason)``, where ``reason`` goes to the log only):

- ``is_trusted(client_address) -> bool``: skip require_tls/require_auth.
- ``authenticate(session, mechanism, username, password)``: with
  ``supports_auth = True``; return an identity (kept in
  ``session.auth_data``) or None for 535 5.7.8. AUTH is offered only over
  TLS, STARTTLS or implicit.
- ``check_sender(session, envelope, path)``: ``path.is_null`` for ``<>``.
- ``check_recipient(session, envelope, path)``: the session enforces
  ``max_recipients`` (452 4.5.3) before calling it. Store per-recipient
  findings in ``envelope.notes``.
- ``handle_message(session, envelope, content) -> Reply``: ``content`` is
  the message with dot-stuffing removed, every line ending in CRLF. Return
  the 250 only after a durable commit.

What the base guarantees, so handlers need not check it:

- Reply text is printable US-ASCII: client input echoed in a reply has
  every other character replaced by "?".
- HELP replies 214 with the supported commands, or with one command's syntax.
- Every reply after the greeting and EHLO carries an enhanced status code
  (RFC 2034), including aiosmtpd's own replies, which get a default by code.
- EHLO advertises SIZE, 8BITMIME, SMTPUTF8, PIPELINING, ENHANCEDSTATUSCODES,
  STARTTLS (when offered and not yet active) and AUTH PLAIN LOGIN (over TLS,
  when the handler supports it).
- MAIL and RCPT: a bad path gets 501 5.1.3; a declared SIZE over the limit
  552 5.3.4; unknown parameters 555 5.5.4; a non-ASCII address without
  SMTPUTF8 553 5.6.7.
- A command line ends only at CRLF: a line with a bare LF in it gets one
  500 5.5.2 and is not run.
- DATA ends only at CRLF "." CRLF. A bare CR or LF anywhere gives
  550 5.6.0, a line over 998 octets 500 5.5.2, a message over SIZE
  552 5.3.4; each after reading to the final dot, with exactly one reply
  and no call to ``handle_message``.
- Bytes pipelined after STARTTLS, before the handshake, are discarded.
- Idle timeout (421 4.4.2), connection limits in total and per client address
  (421 4.7.0), shutdown (421 4.3.2 to idle sessions).
- An unexpected exception becomes 451 4.3.0 with a reference that is also
  logged with the traceback; exception text never reaches the peer.
- Log lines carry the service name and a session id. AUTH responses are
  never logged. aiosmtpd's own logger ("mail.log") logs each command line at
  INFO with AUTH arguments masked; services usually raise it to WARNING.
"""

from mailstack.smtp.data import DataReader
from mailstack.smtp.paths import NULL_PATH, Path, PathError
from mailstack.smtp.replies import Reply, SMTPError, add_enhanced_code
from mailstack.smtp.server import Listener, SMTPOptions, SMTPServer
from mailstack.smtp.session import Envelope, SessionState, SMTPHandler, SMTPSession

__all__ = [
    "NULL_PATH",
    "DataReader",
    "Envelope",
    "Listener",
    "Path",
    "PathError",
    "Reply",
    "SMTPError",
    "SMTPHandler",
    "SMTPOptions",
    "SMTPServer",
    "SMTPSession",
    "SessionState",
    "add_enhanced_code",
]
