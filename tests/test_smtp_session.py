"""The shared SMTP base with small handlers, over real sockets on loopback."""

from __future__ import annotations

import asyncio
import base64
import logging
import smtplib

import pytest

from mailstack import tls
from mailstack.smtp import session as session_module
from mailstack.smtp import Listener, Reply, SMTPError, SMTPHandler, SMTPOptions, SMTPServer
from test_submission_support import HOST, RawClient


class RecordingHandler(SMTPHandler):
    supports_auth = True

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.fail_with: BaseException | None = None

    async def authenticate(self, session, mechanism, username, password):
        if username == "raise":
            raise SMTPError(Reply(454, "4.7.0", "Temporary authentication failure"))
        return username if password == "right" else None

    async def check_recipient(self, session, envelope, path):
        if path.local_part == "boom":
            raise RuntimeError("database password is hunter2")

    async def handle_message(self, session, envelope, content):
        if self.fail_with is not None:
            raise self.fail_with
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), content))
        return Reply(250, "2.0.0", "Stored")


@pytest.fixture
def ssl_context(tmp_path):
    files = tls.ensure_server_certificate(tmp_path, "mx.test", (HOST,))
    return tls.server_context(files), files


@pytest.fixture
async def smtp(ssl_context):
    handler = RecordingHandler()
    server = SMTPServer("test", handler, SMTPOptions(hostname="mx.test", max_message_size=5000), ssl_context[0])
    [(_, port)] = await server.listen(HOST, 0, Listener("plain", tls="starttls"))
    [(_, tls_port)] = await server.listen(HOST, 0, Listener("implicit", tls="implicit"))
    yield server, handler, port, tls_port
    await server.close(2.0)


def client_context(files):
    import ssl

    return ssl.create_default_context(cafile=str(files.ca_file))


async def test_unexpected_error_451_with_reference(smtp, caplog):
    server, handler, port, _ = smtp
    caplog.set_level(logging.ERROR, logger="mailstack.smtp.session")
    client = await RawClient.connect(port)
    await client.command("EHLO c.test")
    assert (await client.command("MAIL FROM:<>"))[0] == 250
    code, [line] = await client.command("RCPT TO:<boom@x.test>")
    assert code == 451
    assert line.startswith("4.3.0 Internal error, reference ")
    assert "hunter2" not in line
    assert "RuntimeError" not in line
    reference = line.split("reference ")[1].split(";")[0]
    assert any(reference in r.getMessage() and r.exc_info for r in caplog.records)
    # The session goes on.
    assert await client.command("NOOP") == (250, ["2.0.0 OK"])
    await client.close()


async def test_handle_message_error_one_reply(smtp):
    server, handler, port, _ = smtp
    handler.fail_with = ValueError("x")
    client = await RawClient.connect(port)
    await client.command("EHLO c.test")
    await client.command("MAIL FROM:<a@x.test>")
    await client.command("RCPT TO:<b@x.test>")
    assert (await client.command("DATA"))[0] == 354
    await client.send(b"Subject: s\r\n\r\nbody\r\n.\r\n")
    assert (await client.reply())[0] == 451
    # The transaction was reset: a new MAIL is not "nested".
    assert (await client.command("MAIL FROM:<a@x.test>"))[0] == 250
    await client.close()


async def test_rejecting_authenticator_still_replies(smtp, ssl_context):
    server, handler, _, tls_port = smtp
    client = await RawClient.connect(tls_port, ssl_context=client_context(ssl_context[1]))
    code, lines = await client.command("EHLO c.test")
    assert "AUTH PLAIN LOGIN" in lines
    assert await client.login("user", "wrong") == (535, ["5.7.8 Authentication credentials invalid"])
    assert await client.login("raise", "x") == (454, ["4.7.0 Temporary authentication failure"])
    assert await client.command("AUTH LOGIN " + base64.b64encode(b"user").decode()) == (334, ["UGFzc3dvcmQ6"])
    assert await client.command(base64.b64encode(b"wrong").decode()) == (535, ["5.7.8 Authentication credentials invalid"])
    assert (await client.login("user", "right"))[0] == 235
    await client.close()


async def test_auth_refused_without_tls_and_during_transaction(smtp, ssl_context):
    server, handler, port, tls_port = smtp
    client = await RawClient.connect(port)
    code, lines = await client.command("EHLO c.test")
    assert not any(line.startswith("AUTH") for line in lines)
    assert (await client.login("user", "right"))[0] == 530
    await client.close()
    client = await RawClient.connect(tls_port, ssl_context=client_context(ssl_context[1]))
    await client.command("EHLO c.test")
    await client.command("MAIL FROM:<a@x.test>")
    assert (await client.login("user", "right"))[0] == 503
    await client.close()


async def test_null_sender_allowed_by_base_and_data_kept(smtp):
    server, handler, port, _ = smtp
    client = await RawClient.connect(port)
    await client.command("EHLO c.test")
    assert await client.command("MAIL FROM:<>") == (250, ["2.1.0 Sender OK"])
    assert (await client.command("RCPT TO:<Postmaster>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    await client.send(b"Subject: s\r\n\r\n\xff\xfe raw\r\n...\r\n.\r\n")
    assert await client.reply() == (250, ["2.0.0 Stored"])
    assert handler.messages == [("", ["postmaster"], b"Subject: s\r\n\r\n\xff\xfe raw\r\n..\r\n")]
    await client.close()


async def test_smtputf8_required_for_non_ascii(smtp):
    server, handler, port, _ = smtp
    client = await RawClient.connect(port)
    await client.command("EHLO c.test")
    assert await client.command("MAIL FROM:<jörg@x.test>") == (553, ["5.6.7 Non-ASCII address requires the SMTPUTF8 parameter"])
    assert (await client.command("MAIL FROM:<jörg@x.test> SMTPUTF8"))[0] == 250
    assert (await client.command("RCPT TO:<zoë@bücher.test>"))[0] == 250
    await client.close()


async def test_helo_session_rules(smtp):
    server, handler, port, _ = smtp
    client = await RawClient.connect(port)
    assert (await client.command("MAIL FROM:<a@x.test>"))[0] == 503
    assert await client.command("HELO c.test") == (250, ["mx.test"])
    assert (await client.command("MAIL FROM:<a@x.test> SIZE=10"))[1] == ["5.5.4 Parameters need EHLO"]
    assert (await client.command("AUTH PLAIN"))[0] == 503
    assert (await client.command("MAIL FROM:<a@x.test> "))[0] == 250
    assert (await client.command("MAIL FROM:<a@x.test>"))[0] == 503
    await client.close()


async def test_bad_command_lines(smtp):
    server, handler, port, _ = smtp
    client = await RawClient.connect(port)
    await client.command("EHLO c.test")
    assert (await client.command("NOOP " + "x" * 600))[0] == 500
    assert (await client.command("MAIL FROM:<a@x.test> FOO=BAR"))[0] == 555
    assert (await client.command("MAIL FROM:<a@x.test> BODY=BINARYMIME"))[0] == 501
    assert (await client.command("MAIL FROM:<a@x.test> SIZE=abc"))[0] == 501
    assert (await client.command("MAIL TO:<a@x.test>"))[0] == 501
    assert (await client.command("STARTTLS now"))[0] == 501
    await client.close()


async def test_disconnect_during_data_stores_nothing(smtp):
    server, handler, port, _ = smtp
    client = await RawClient.connect(port)
    await client.command("EHLO c.test")
    await client.command("MAIL FROM:<a@x.test>")
    await client.command("RCPT TO:<b@x.test>")
    assert (await client.command("DATA"))[0] == 354
    await client.send(b"Subject: partial\r\n\r\nno end")
    await client.close()
    # The server sets this event when its last session is gone.
    await asyncio.wait_for(server._idle.wait(), 5)
    assert not server.sessions
    assert handler.messages == []


async def test_starttls_twice_refused(smtp, ssl_context):
    server, handler, port, _ = smtp
    client = await RawClient.connect(port)
    await client.command("EHLO c.test")
    await client.starttls(client_context(ssl_context[1]))
    await client.command("EHLO c.test")
    assert await client.command("STARTTLS") == (503, ["5.5.1 TLS already active"])
    await client.close()


async def test_implicit_tls_limit_counts_before_handshake(ssl_context):
    # Clients that connect to the implicit-TLS port and never send a
    # ClientHello still take a per-address slot.
    server = SMTPServer(
        "test",
        RecordingHandler(),
        SMTPOptions(hostname="mx.test", max_message_size=5000, max_connections_per_address=3),
        ssl_context[0],
    )
    [(_, tls_port)] = await server.listen(HOST, 0, Listener("implicit", tls="implicit"))
    silent = []
    try:
        for _ in range(5):
            silent.append(await asyncio.open_connection(HOST, tls_port, local_addr=("127.0.4.2", 0)))
        # The two over the limit are closed at once, without waiting for a handshake timeout.
        for reader, _ in silent[3:]:
            assert await asyncio.wait_for(reader.read(), 3) == b""
        assert sum(server._per_address.values()) == 3

        def send_one() -> dict:
            context = client_context(ssl_context[1])
            with smtplib.SMTP_SSL(HOST, tls_port, context=context, source_address=("127.0.4.3", 0), timeout=10) as client:
                client.ehlo("c.test")
                return client.sendmail("a@x.test", ["b@x.test"], b"Subject: s\r\n\r\nhi\r\n")

        assert await asyncio.to_thread(send_one) == {}
        assert [message[0] for message in server.handler.messages] == ["a@x.test"]
    finally:
        for _, writer in silent:
            writer.close()
        await server.close(2.0)
    assert not server.sessions
    assert not server._per_address


async def test_implicit_tls_handshake_timeout_frees_slot(ssl_context, monkeypatch):
    monkeypatch.setattr(session_module, "TLS_HANDSHAKE_TIMEOUT", 0.2)
    server = SMTPServer(
        "test",
        RecordingHandler(),
        SMTPOptions(hostname="mx.test", max_message_size=5000, max_connections_per_address=1),
        ssl_context[0],
    )
    [(_, tls_port)] = await server.listen(HOST, 0, Listener("implicit", tls="implicit"))
    try:
        reader, writer = await asyncio.open_connection(HOST, tls_port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await asyncio.wait_for(server._idle.wait(), 5)
        assert not server._per_address
        client = await RawClient.connect(tls_port, ssl_context=client_context(ssl_context[1]))
        assert (await client.command("EHLO c.test"))[0] == 250
        await client.close()
    finally:
        await server.close(2.0)


async def test_bare_lf_command_line_rejected(smtp):
    server, handler, port, _ = smtp
    client = await RawClient.connect(port)
    await client.command("EHLO c.test")
    bare_lf = (500, ["5.5.2 Syntax error: bare LF in command line, lines must end with CRLF"])
    # One line up to CRLF, so one reply: not two commands.
    await client.send(b"FOO\nBAR\r\nNOOP\r\n")
    assert await client.reply() == bare_lf
    assert await client.reply() == (250, ["2.0.0 OK"])
    await client.send(b"NOOP\nNOOP\r\n")
    assert await client.reply() == bare_lf
    assert await client.command("MAIL FROM:<a@x.test>") == (250, ["2.1.0 Sender OK"])
    await client.send(b"RCPT TO:<b@x.test>\nRCPT TO:<c@x.test>\r\n")
    assert await client.reply() == bare_lf
    assert (await client.command("RCPT TO:<d@x.test>"))[0] == 250
    # A line over the reader's limit is discarded whole, even with a bare LF in its tail.
    await client.send(b"NOOP " + b"x" * 70000 + b"\ntail\r\nNOOP\r\n")
    assert (await client.reply())[0] == 500
    assert await client.reply() == (250, ["2.0.0 OK"])
    # DATA and its end are unchanged.
    assert (await client.command("DATA"))[0] == 354
    await client.send(b"Subject: s\r\n\r\nbody\r\n.\r\n")
    assert await client.reply() == (250, ["2.0.0 Stored"])
    assert handler.messages == [("a@x.test", ["d@x.test"], b"Subject: s\r\n\r\nbody\r\n")]
    await client.close()


async def test_replies_printable_ascii_only(smtp):
    server, handler, port, _ = smtp
    client = await RawClient.connect(port)
    await client.send(b"foo\x00bar\r\n")
    line = await client.reader.readline()
    assert line == b'500 5.5.2 Error: command "FOO?BAR" not recognized\r\n'
    # A bare CR inside the command must not reach the reply.
    await client.send(b"FOO\rBAR\r\n")
    line = await client.reader.readline()
    assert line == b'500 5.5.2 Error: command "FOO?BAR" not recognized\r\n'
    await client.send("EHLO c\x01\x7fé.test\r\n".encode("utf-8"))
    code, lines = await client.reply()
    assert code == 250
    assert lines[0] == "mx.test greets c???.test"
    await client.send(b"\x1b[31mx\r\n")
    line = await client.reader.readline()
    assert line == b'500 5.5.2 Error: command "?[31MX" not recognized\r\n'
    assert await client.command("NOOP") == (250, ["2.0.0 OK"])
    await client.close()


async def test_help_lists_real_commands(smtp, ssl_context):
    server, handler, port, _ = smtp
    client = await RawClient.connect(port)
    listing = "2.0.0 Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET STARTTLS VRFY"
    assert await client.command("HELP") == (214, [listing])
    assert await client.command("HELP mail") == (
        214, ["2.0.0 Syntax: MAIL FROM:<address> [SIZE=octets] [BODY=7BIT|8BITMIME] [SMTPUTF8]"])
    assert await client.command("HELP RCPT") == (214, ["2.0.0 Syntax: RCPT TO:<address>"])
    code, [line] = await client.command("HELP EXPN")
    assert code == 504
    assert line.startswith("5.5.4 No help for that topic; supported commands: AUTH DATA")
    # After TLS, STARTTLS is no longer offered.
    await client.command("EHLO c.test")
    await client.starttls(client_context(ssl_context[1]))
    assert await client.command("HELP") == (
        214, ["2.0.0 Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"])
    await client.close()
