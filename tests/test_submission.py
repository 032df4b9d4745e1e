"""The submission server with real clients (smtplib, aiosmtplib, raw sockets) over real TLS."""

from __future__ import annotations

import asyncio
import dataclasses
import base64
import email
import logging
import smtplib
import ssl

import aiosmtplib
import pytest
from sqlalchemy import select, text

from mailstack.store.models import Delivery, OutboundMessage
from test_submission_support import (
    ALICE,
    BOB,
    HOST,
    RawClient,
    authenticated_client,
    build_template,
    count_messages,
    inbox_messages,
    make_env,
    start_submission,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return build_template(tmp_path_factory.mktemp("submission-template"))


@pytest.fixture
async def env(tmp_path, template):
    env = await make_env(tmp_path, template)
    yield env
    await env.store.close()


@pytest.fixture
async def running(env):
    running = await start_submission(env, max_recipients=3, max_message_size=20_000)
    yield running
    await running.close()


# Clients --------------------------------------------------------------------


async def test_smtplib_starttls_login_local_delivery(env, running):
    def send() -> dict:
        with smtplib.SMTP(HOST, running.port, timeout=10) as client:
            client.starttls(context=env.client_context())
            client.login(*ALICE)
            message = b"Subject: hello\r\nFrom: alice@here.test\r\n\r\nHi Bob\r\n"
            return client.sendmail(ALICE[0], [BOB[0]], message)

    refused = await asyncio.to_thread(send)
    assert refused == {}
    [stored] = await inbox_messages(env.store, env.bob_id)
    assert stored.endswith(b"Subject: hello\r\nFrom: alice@here.test\r\n\r\nHi Bob\r\n")
    parsed = email.message_from_bytes(stored)
    received = parsed["Received"]
    assert "with ESMTPSA id" in received
    assert "TLSv1.3" in received
    assert "([127.0.0.1])" in received
    assert parsed["Message-ID"].endswith("@mail.here.test>")
    assert parsed["Date"]


async def test_smtplib_implicit_tls_465(env, running):
    def send() -> tuple[int, bytes]:
        with smtplib.SMTP_SSL(HOST, running.tls_port, context=env.client_context(), timeout=10) as client:
            client.ehlo("client.test")
            assert "auth" in client.esmtp_features
            client.login(*ALICE)
            client.mail(ALICE[0])
            client.rcpt(BOB[0])
            return client.data(b"Subject: implicit\r\n\r\nbody\r\n")

    code, text_ = await asyncio.to_thread(send)
    assert code == 250
    assert text_.startswith(b"2.0.0 Ok: queued as ")
    [stored] = await inbox_messages(env.store, env.bob_id)
    assert b"Subject: implicit" in stored


async def test_aiosmtplib_remote_recipient_queues(env, running):
    woken = asyncio.Event()
    remove = env.store.add_queue_listener(woken.set)
    try:
        client = aiosmtplib.SMTP(hostname=HOST, port=running.port, start_tls=True, tls_context=env.client_context())
        await client.connect()
        await client.login(*ALICE)
        errors, reply = await client.sendmail(
            "al@here.test", ["someone@there.test", BOB[0]], b"Subject: out\r\n\r\nto the world\r\n"
        )
        await client.quit()
    finally:
        remove()
    assert errors == {}
    queue_id = reply.split()[-1]
    assert woken.is_set()
    async with env.store.read() as session:
        outbound = await session.scalar(select(OutboundMessage).where(OutboundMessage.queue_id == queue_id))
        deliveries = list(await session.scalars(select(Delivery).where(Delivery.queue_id == queue_id)))
    assert outbound.envelope_sender == "al@here.test"
    assert outbound.account_id == env.alice_id
    assert [d.recipient for d in deliveries] == ["someone@there.test"]
    [outbox_copy] = await inbox_messages(env.store, env.alice_id, "Outbox")
    assert b"to the world" in outbox_copy
    assert len(await inbox_messages(env.store, env.bob_id)) == 1


async def test_aiosmtplib_implicit_tls_465(env, running):
    client = aiosmtplib.SMTP(hostname=HOST, port=running.tls_port, use_tls=True, tls_context=env.client_context())
    await client.connect()
    await client.ehlo()
    assert "auth" in client.esmtp_extensions
    await client.login(*BOB)
    errors, reply = await client.sendmail(BOB[0], [ALICE[0]], b"Subject: over 465\r\n\r\nhi\r\n")
    await client.quit()
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    [stored] = await inbox_messages(env.store, env.alice_id)
    assert b"Subject: over 465" in stored


async def test_swaks_587_and_465(env, running):
    ca = str(env.tls_files.ca_file)
    base = ["swaks", "--server", HOST, "--from", ALICE[0], "--to", BOB[0], "--auth", "LOGIN",
            "--auth-user", ALICE[0], "--auth-password", ALICE[1], "--tls-ca-path", ca,
            "--header", "Subject: swaks", "--body", "from swaks"]
    for extra in (["--port", str(running.port), "--tls"], ["--port", str(running.tls_port), "--tls-on-connect"]):
        process = await asyncio.create_subprocess_exec(
            *base, *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, output.decode()
        assert b"250 2.0.0 Ok: queued as" in output
        assert b"235 2.7.0" in output
    assert len(await inbox_messages(env.store, env.bob_id)) == 2


# TLS and AUTH ---------------------------------------------------------------


async def test_587_before_tls_refuses_auth_and_mail(env, running):
    client = await RawClient.connect(running.port)
    code, lines = await client.command("EHLO client.test")
    assert code == 250
    assert "STARTTLS" in lines
    assert not any(line.startswith("AUTH") for line in lines)
    for keyword in ("ENHANCEDSTATUSCODES", "PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 20000"):
        assert keyword in lines
    assert await client.command("AUTH PLAIN AGFsaWNlQGhlcmUudGVzdABhbGljZS1wYXNzd29yZA==") == (
        530, ["5.7.0 Must issue a STARTTLS command first"])
    assert (await client.command("MAIL FROM:<alice@here.test>"))[1][0].startswith("5.7.0")
    await client.starttls(env.client_context())
    code, lines = await client.command("EHLO client.test")
    assert "AUTH PLAIN LOGIN" in lines
    assert "STARTTLS" not in lines
    assert (await client.command("MAIL FROM:<alice@here.test>")) == (530, ["5.7.0 Authentication required"])
    assert (await client.login(*ALICE))[0] == 235
    assert (await client.command("MAIL FROM:<alice@here.test>"))[0] == 250
    await client.close()


async def test_plaintext_pipelined_after_starttls_discarded(env, running):
    client = await RawClient.connect(running.port)
    await client.command("EHLO client.test")
    await client.send(b"STARTTLS\r\nAUTH PLAIN AGFsaWNlQGhlcmUudGVzdABhbGljZS1wYXNzd29yZA==\r\n")
    code, _ = await client.reply()
    assert code == 220
    await client.writer.start_tls(env.client_context(), server_hostname=HOST)
    # Had the injected AUTH survived, its 235 would arrive before the EHLO reply,
    # and MAIL would be accepted.
    code, lines = await client.command("EHLO client.test")
    assert code == 250
    assert lines[0].startswith("mail.here.test")
    assert (await client.command("MAIL FROM:<alice@here.test>"))[0] == 530
    await client.close()


async def test_auth_failure_then_success_same_session(env, running):
    client = await RawClient.connect(running.tls_port, ssl_context=env.client_context())
    await client.command("EHLO client.test")
    assert await client.login(ALICE[0], "wrong") == (535, ["5.7.8 Authentication credentials invalid"])
    assert await client.command("AUTH PLAIN %%%notbase64") == (501, ["5.5.2 Cannot decode base64 response"])
    assert await client.command("AUTH PLAIN " + base64.b64encode(b"no-nul-bytes").decode()) == (
        501, ["5.5.2 Malformed PLAIN response: expected authzid NUL authcid NUL password"])
    assert (await client.command("AUTH CRAM-MD5"))[:1] == (504,)
    # AUTH LOGIN with challenges, and cancelling with "*".
    assert await client.command("AUTH LOGIN") == (334, ["VXNlcm5hbWU6"])
    assert await client.command("*") == (501, ["5.7.0 Authentication cancelled"])
    assert await client.command("AUTH LOGIN") == (334, ["VXNlcm5hbWU6"])
    assert await client.command(base64.b64encode(ALICE[0].encode()).decode()) == (334, ["UGFzc3dvcmQ6"])
    assert await client.command(base64.b64encode(ALICE[1].encode()).decode()) == (
        235, ["2.7.0 Authentication successful"])
    assert (await client.login(*ALICE))[0] == 503
    await client.close()


async def test_auth_throttle_locks_out_with_421(env, caplog):
    running = await start_submission(env, auth_failure_limit=3)
    try:
        caplog.set_level(logging.INFO)
        client = await RawClient.connect(running.tls_port, ssl_context=env.client_context())
        await client.command("EHLO client.test")
        for _ in range(3):
            assert (await client.login(ALICE[0], "guess-secret"))[0] == 535
        assert await client.login(*ALICE) == (421, ["4.7.0 Too many failed authentications; try again later"])
        assert await client.at_eof()
        await client.close()
        # The lockout covers the client address in a new session as well.
        client = await RawClient.connect(running.tls_port, ssl_context=env.client_context())
        await client.command("EHLO client.test")
        assert (await client.login(BOB[0], BOB[1]))[0] == 421
        await client.close()
    finally:
        await running.close()
    failures = [r.getMessage() for r in caplog.records if r.name == "mailstack.submission.handler" and "AUTH PLAIN failed" in r.getMessage()]
    assert len(failures) == 3
    assert all("127.0.0.1" in line or HOST in line or "from" in line for line in failures)
    assert not any("guess-secret" in r.getMessage() for r in caplog.records)
    assert not any(ALICE[1] in r.getMessage() for r in caplog.records)


async def test_auth_throttle_delays_failures(env):
    running = await start_submission(env, auth_failure_limit=5, auth_failure_delay=0.2)
    try:
        client = await RawClient.connect(running.tls_port, ssl_context=env.client_context())
        await client.command("EHLO client.test")
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await client.login(ALICE[0], "bad"))[0] == 535
        assert (await client.login(ALICE[0], "bad"))[0] == 535
        # 0.2 s and then 0.4 s: the second failure waits twice as long.
        assert loop.time() - started >= 0.6
        await client.close()
    finally:
        await running.close()


# Envelope rules -------------------------------------------------------------


async def test_sender_must_be_own_address_or_alias(env, running):
    client = await authenticated_client(env, running)
    assert await client.command("MAIL FROM:<bob@here.test>") == (
        553, ["5.7.1 Sender address rejected: not owned by the authenticated user"])
    assert await client.command("MAIL FROM:<>") == (553, ["5.7.1 The null sender is not allowed on submission"])
    assert await client.command("MAIL FROM:<stranger@there.test>") == (
        553, ["5.7.1 Sender address rejected: not owned by the authenticated user"])
    assert (await client.command("MAIL FROM:<AL@Here.Test>"))[0] == 250
    await client.close()


async def test_recipient_rules(env, running):
    client = await authenticated_client(env, running)
    assert (await client.command("RCPT TO:<bob@here.test>"))[0] == 503
    assert (await client.command("MAIL FROM:<alice@here.test>"))[0] == 250
    assert await client.command("RCPT TO:<nobody@here.test>") == (
        550, ["5.1.1 Recipient address rejected: no such user here"])
    assert await client.command("RCPT TO:<bad address@x>") == (501, ["5.1.3 Bad address syntax"])
    assert await client.command("RCPT TO:<a@b..c>") == (501, ["5.1.3 Bad address syntax"])
    assert (await client.command("RCPT TO:<bob@here.test> NOTIFY=NEVER"))[0] == 555
    assert (await client.command("RCPT TO:<bob@here.test>"))[0] == 250
    assert (await client.command("RCPT TO:<x@there.test>"))[0] == 250
    assert (await client.command("RCPT TO:<y@there.test>"))[0] == 250
    # max_recipients is 3 in this fixture.
    assert await client.command("RCPT TO:<z@there.test>") == (452, ["4.5.3 Too many recipients"])
    assert await client.command("RCPT TO:<w@there.test>") == (452, ["4.5.3 Too many recipients"])
    assert (await client.command("DATA"))[0] == 354
    await client.send(b"Subject: three\r\n\r\nx\r\n.\r\n")
    assert (await client.reply())[0] == 250
    async with env.store.read() as session:
        recipients = sorted(await session.scalars(select(Delivery.recipient)))
    assert recipients == ["x@there.test", "y@there.test"]
    await client.close()


async def test_declared_size_too_big(env, running):
    client = await authenticated_client(env, running)
    assert await client.command("MAIL FROM:<alice@here.test> SIZE=20001") == (
        552, ["5.3.4 Message size exceeds fixed maximum message size"])
    assert (await client.command("MAIL FROM:<alice@here.test> SIZE=20000 BODY=8BITMIME"))[0] == 250
    await client.close()


async def test_every_reply_has_enhanced_code(env, running):
    client = await authenticated_client(env, running)
    for command in ["NOOP", "RSET", "HELP", "VRFY bob", "EXPN x", "BOGUS", "MAIL", "DATA", "RCPT TO:<x@y.test>", "QUIT"]:
        code, lines = await client.command(command)
        enhanced = lines[-1].split()[0]
        assert enhanced[0] == str(code)[0], (command, code, lines)
        assert enhanced[1] == ".", (command, code, lines)
    await client.close()


# Message content --------------------------------------------------------------


async def _send_data(client: RawClient, data: bytes) -> tuple[int, list[str]]:
    assert (await client.command("MAIL FROM:<alice@here.test>"))[0] == 250
    assert (await client.command("RCPT TO:<bob@here.test>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    await client.send(data)
    return await client.reply()


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"Subject: x\r\n\r\n" + b"y" * 999 + b"\r\n.\r\n", (500, ["5.5.2 Line too long: more than 998 octets before CRLF"])),
        (b"Subject: x\r\n\r\n" + (b"z" * 900 + b"\r\n") * 30 + b".\r\n",
         (552, ["5.3.4 Message size exceeds fixed maximum message size"])),
        (b"Subject: x\r\n\r\nbare\nlf\r\n.\r\n", (550, ["5.6.0 Bare CR or LF in message data: lines must end with CRLF"])),
        (b"Subject: x\r\n\r\nbare\rcr\r\n.\r\n", (550, ["5.6.0 Bare CR or LF in message data: lines must end with CRLF"])),
    ],
)
async def test_bad_content_one_reply_nothing_stored(env, running, data, expected):
    client = await authenticated_client(env, running)
    assert await _send_data(client, data) == expected
    # Exactly one reply: the next command gets its own answer, not a left-over one.
    assert await client.command("NOOP") == (250, ["2.0.0 OK"])
    assert await count_messages(env.store) == 0
    await client.close()


SMUGGLING = [b"\n.\r\n", b"\r.\r", b"\n.\n", b"\r\n.\r"]


@pytest.mark.parametrize("separator", SMUGGLING)
async def test_smuggling_variants_make_at_most_one_message(env, running, separator):
    client = await authenticated_client(env, running)
    smuggled = (
        b"Subject: outer\r\n\r\nouter body" + separator
        + b"MAIL FROM:<alice@here.test>\r\nRCPT TO:<bob@here.test>\r\nDATA\r\n"
        + b"Subject: smuggled\r\n\r\ninner\r\n.\r\n"
    )
    code, lines = await _send_data(client, smuggled)
    # One reply for the whole thing; the smuggled commands were message data.
    assert code == 550
    assert lines == ["5.6.0 Bare CR or LF in message data: lines must end with CRLF"]
    assert await client.command("NOOP") == (250, ["2.0.0 OK"])
    assert await count_messages(env.store) <= 1
    stored = await inbox_messages(env.store, env.bob_id)
    assert not any(b"Subject: smuggled" in m and b"outer" not in m for m in stored)
    await client.close()


async def test_dot_stuffing_and_bytes_kept(env, running):
    client = await authenticated_client(env, running)
    body = b"message-id: <given@client.test>\r\nDATE: Thu, 3 Dec 2026 10:00:00 +0000\r\nSubject: s\r\n\r\n..leading dot\r\n\xc3\xa9 8bit\r\n"
    code, lines = await _send_data(client, body + b".\r\n")
    assert code == 250
    [stored] = await inbox_messages(env.store, env.bob_id)
    assert stored.endswith(body.replace(b"\r\n..", b"\r\n."))
    headers_part = stored.split(b"\r\n\r\n")[0].lower()
    assert headers_part.count(b"message-id:") == 1
    assert headers_part.count(b"date:") == 1
    assert stored.startswith(b"Received: from client.test")
    await client.close()


async def test_pipelined_transaction(env, running):
    client = await authenticated_client(env, running)
    await client.send(
        b"MAIL FROM:<alice@here.test>\r\nRCPT TO:<bob@here.test>\r\nRCPT TO:<nobody@here.test>\r\nDATA\r\n"
    )
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 550
    assert (await client.reply())[0] == 354
    await client.send(b"Subject: p\r\n\r\none\r\n.\r\nMAIL FROM:<alice@here.test>\r\nRCPT TO:<bob@here.test>\r\nDATA\r\n")
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 354
    await client.send(b"Subject: q\r\n\r\ntwo\r\n.\r\nQUIT\r\n")
    assert (await client.reply())[0] == 250
    assert (await client.reply())[0] == 221
    assert len(await inbox_messages(env.store, env.bob_id)) == 2
    await client.close()


# Storing ---------------------------------------------------------------------


@pytest.mark.parametrize("group_commit", [True, False])
async def test_failed_commit_451_nothing_stored(env, group_commit):
    running = await start_submission(env, group_commit=group_commit)
    # Without an Outbox the transaction fails after the INBOX copy was written.
    async with env.store.write() as session:
        await session.execute(
            text("DELETE FROM mailboxes WHERE account_id = :a AND name = 'Outbox'"), {"a": env.alice_id}
        )
    client = await authenticated_client(env, running)
    assert (await client.command("MAIL FROM:<alice@here.test>"))[0] == 250
    assert (await client.command("RCPT TO:<bob@here.test>"))[0] == 250
    assert (await client.command("RCPT TO:<far@there.test>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    await client.send(b"Subject: f\r\n\r\nx\r\n.\r\n")
    assert await client.reply() == (451, ["4.3.0 Message not stored because of a local error; try again later"])
    assert await count_messages(env.store) == 0
    await client.close()
    await running.close()


# Operations --------------------------------------------------------------------


async def test_idle_timeout_421(env):
    running = await start_submission(env)
    running.server.options = dataclasses.replace(running.server.options, idle_timeout=0.3)
    try:
        client = await RawClient.connect(running.port)
        assert await client.reply() == (421, ["4.4.2 Error: timeout exceeded"])
        assert await client.at_eof()
        await client.close()
    finally:
        await running.close()


async def test_connection_limit_per_address_and_total(env):
    running = await start_submission(env, max_connections_per_address=2, max_connections=3)
    try:
        first = await RawClient.connect(running.port)
        second = await RawClient.connect(running.tls_port, ssl_context=env.client_context())
        reader, writer = await asyncio.open_connection(HOST, running.port)
        assert await reader.readline() == b"421 4.7.0 Too many connections from your address, try again later\r\n"
        writer.close()
        await first.close()
        await second.close()
    finally:
        await running.close()


async def test_shutdown_sends_421_to_idle_sessions(env):
    running = await start_submission(env)
    client = await authenticated_client(env, running)
    await running.close()
    assert await client.reply() == (421, ["4.3.2 Service shutting down"])
    assert await client.at_eof()
    await client.close()


async def test_trusted_network_submits_without_auth(env):
    running = await start_submission(env, trusted_networks=("127.0.0.0/8",))
    try:
        client = await RawClient.connect(running.port)
        code, lines = await client.command("EHLO app.test")
        assert "STARTTLS" in lines
        assert await client.command("MAIL FROM:<nobody@there.test>") == (
            553, ["5.7.1 Sender address rejected: not a local account"])
        assert (await client.command("MAIL FROM:<al@here.test>"))[0] == 250
        assert (await client.command("RCPT TO:<bob@here.test>"))[0] == 250
        assert (await client.command("DATA"))[0] == 354
        await client.send(b"Subject: from a script\r\n\r\nhi\r\n.\r\n")
        assert (await client.reply())[0] == 250
        await client.close()
    finally:
        await running.close()
    [stored] = await inbox_messages(env.store, env.bob_id)
    # Neither TLS nor AUTH: the plain ESMTP keyword.
    assert b" with ESMTP id " in stored


async def test_untrusted_network_still_needs_tls(env):
    running = await start_submission(env, trusted_networks=("192.0.2.0/24",))
    try:
        client = await RawClient.connect(running.port)
        await client.command("EHLO app.test")
        assert (await client.command("MAIL FROM:<al@here.test>"))[0] == 530
        await client.close()
    finally:
        await running.close()
