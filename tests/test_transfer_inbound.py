"""The port 25 listener, started by the transfer role of `mailstack serve` on loopback.

Clients are smtplib and swaks. Each relay probe checks the reply and that
nothing was stored or queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import smtplib
import ssl
import subprocess
import textwrap

import pytest
from sqlalchemy import func, select

from mailstack import config as config_module
from mailstack.serve import start_services
from mailstack.settings import MailServerConfig
from mailstack.store.models import Delivery, Message, MessageContent

HOST = "127.0.5.10"
PORT = 25
MESSAGE = b"From: carol@there.test\r\nTo: bob@here.test\r\nSubject: inbound\r\n\r\nHello Bob.\r\n"


def write_config(tmp_path, name: str, host: str, domains: list[str], extra: str = "") -> MailServerConfig:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [server]
            name = "{name}"
            hostname = "mx.{domains[0]}"
            domains = {domains!r}
            listen = ["{host}"]
            data_dir = "{tmp_path / name}"
            shutdown_timeout = 2.0

            [transfer]
            port = {PORT}
            max_message_size = 100000
            max_received_headers = 5
            """
        )
        + textwrap.dedent(extra)
    )
    return config_module.load(MailServerConfig, path)


@pytest.fixture
async def server(tmp_path):
    config = write_config(tmp_path, "here", HOST, ["here.test"])
    async with contextlib.AsyncExitStack() as stack:
        context = await start_services(config, ("transfer",), stack)
        store = context.store
        bob = await store.create_account("bob@here.test", "pw")
        await store.add_alias("robert@here.test", "bob@here.test")
        await store.add_domain("other.here.test")
        context.bob = bob
        yield context


def smtp_dialogue(commands):
    """Open a session, say EHLO, run ``commands`` in order and return their (code, text) replies."""
    with smtplib.SMTP(HOST, PORT, local_hostname="client.there.test", timeout=10) as client:
        client.ehlo()
        return [client.docmd(*command) if isinstance(command, tuple) else client.docmd(command) for command in commands]


async def dialogue(commands):
    return await asyncio.to_thread(smtp_dialogue, commands)


async def stored_messages(store, account_id: int) -> list[bytes]:
    mailbox = await store.get_mailbox(account_id, "INBOX")
    async with store.read() as session:
        rows = await session.scalars(
            select(MessageContent.data)
            .join(Message, Message.content_sha256 == MessageContent.sha256)
            .where(Message.mailbox_id == mailbox.id)
            .order_by(Message.uid)
        )
        return list(rows)


async def counts(store) -> tuple[int, int]:
    async with store.read() as session:
        messages = await session.scalar(select(func.count()).select_from(Message))
        deliveries = await session.scalar(select(func.count()).select_from(Delivery))
    return messages, deliveries


async def test_ehlo_advertises_extensions(server):
    def run():
        with smtplib.SMTP(HOST, PORT, local_hostname="client.there.test", timeout=10) as client:
            code, _ = client.ehlo()
            return code, client.esmtp_features

    code, features = await asyncio.to_thread(run)
    assert code == 250
    for name in ("size", "8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes", "starttls"):
        assert name in features, name
    assert features["size"] == "100000"
    assert "auth" not in features


async def test_delivers_with_trace_fields(server):
    def run():
        with smtplib.SMTP(HOST, PORT, local_hostname="client.there.test", timeout=10) as client:
            client.starttls(context=ssl._create_unverified_context())
            client.ehlo()
            return client.sendmail("carol@there.test", ["bob@here.test", "robert@here.test"], MESSAGE)

    refused = await asyncio.to_thread(run)
    assert refused == {}
    (data,) = await stored_messages(server.store, server.bob.id)
    assert data.endswith(MESSAGE)
    header = data[: -len(MESSAGE)].decode()
    assert header.startswith("Return-Path: <carol@there.test>\r\nReceived: from client.there.test ([127.0.0.1])")
    assert "by mx.here.test (mailstack) with ESMTPS id " in header
    assert "(using TLSv1.3" in header


async def test_null_sender_accepted(server):
    replies = await dialogue(["MAIL FROM:<>", "RCPT TO:<bob@here.test>"])
    assert [code for code, _ in replies] == [250, 250]


async def test_unknown_user_rejected(server):
    replies = await dialogue(["MAIL FROM:<carol@there.test>", "RCPT TO:<nobody@here.test>"])
    assert replies[1][0] == 550
    assert replies[1][1].startswith(b"5.1.1")


@pytest.mark.parametrize(
    "recipient",
    [
        "<victim@example.com>",
        "<victim%example.com@here.test>",
        "<example.com!victim@here.test>",
        '<"victim@example.com"@here.test>',
        "<victim@[192.0.2.1]>",
        "<bob@here.test.>",
        "<@here.test:victim@example.com>",
        "<victim@here.test.example.com>",
    ],
)
async def test_relay_probe_rejected(server, recipient):
    before = await counts(server.store)
    replies = await dialogue(["MAIL FROM:<spammer@example.com>", f"RCPT TO:{recipient}", "DATA"])
    assert replies[1][0] == 554, replies[1]
    assert replies[1][1].startswith(b"5.7.1")
    assert replies[2][0] == 503
    assert await counts(server.store) == before


async def test_relay_probe_with_swaks(server):
    if shutil.which("swaks") is None:
        pytest.skip("swaks not installed")
    result = await asyncio.to_thread(
        subprocess.run,
        ["swaks", "--server", HOST, "--port", str(PORT), "--from", "spam@example.com", "--to", "victim@example.org",
         "--helo", "probe.example.com", "--timeout", "10"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "554 5.7.1" in result.stdout
    assert await counts(server.store) == (0, 0)


async def test_source_route_ignored(server):
    replies = await dialogue(["MAIL FROM:<carol@there.test>", "RCPT TO:<@relay.example.com:bob@here.test>"])
    assert replies[1][0] == 250


async def test_postmaster_without_domain(server):
    missing = await dialogue(["MAIL FROM:<carol@there.test>", "RCPT TO:<postmaster>"])
    assert missing[1][0] == 550
    await server.store.add_alias("postmaster@here.test", "bob@here.test")
    replies = await dialogue(["MAIL FROM:<carol@there.test>", "RCPT TO:<Postmaster>", f"RCPT TO:<postmaster@[{HOST}]>"])
    assert [code for code, _ in replies] == [250, 250, 250]


async def test_loop_rejected(server):
    hops = b"".join(b"Received: from a by b; Mon, 1 Jan 2026 00:00:00 +0000\r\n" for _ in range(6))

    def run():
        with smtplib.SMTP(HOST, PORT, local_hostname="client.there.test", timeout=10) as client:
            client.ehlo()
            client.mail("carol@there.test")
            client.rcpt("bob@here.test")
            return client.data(hops + MESSAGE)

    code, text = await asyncio.to_thread(run)
    assert code == 554
    assert text.startswith(b"5.4.6")
    assert await stored_messages(server.store, server.bob.id) == []


async def test_bare_lf_rejected_after_dot(server):
    def run():
        with smtplib.SMTP(HOST, PORT, local_hostname="client.there.test", timeout=10) as client:
            client.ehlo()
            client.mail("carol@there.test")
            client.rcpt("bob@here.test")
            client.putcmd("DATA")
            assert client.getreply()[0] == 354
            client.send(b"Subject: x\r\n\r\nbare\nline\r\n.\r\n")
            first = client.getreply()
            second = client.docmd("NOOP")
            return first, second

    first, second = await asyncio.to_thread(run)
    assert first[0] == 550
    assert first[1].startswith(b"5.6.0")
    assert second[0] == 250
    assert await stored_messages(server.store, server.bob.id) == []


async def test_oversized_message_rejected(server):
    def run():
        with smtplib.SMTP(HOST, PORT, local_hostname="client.there.test", timeout=10) as client:
            client.ehlo()
            client.mail("carol@there.test")
            client.rcpt("bob@here.test")
            return client.data(MESSAGE + b"x" * 120 + (b"y" * 900 + b"\r\n") * 120)

    code, text = await asyncio.to_thread(run)
    assert code == 552
    assert text.startswith(b"5.3.4")


async def test_second_local_domain_accepted(server):
    await server.store.create_account("dave@other.here.test", "pw")
    replies = await dialogue(["MAIL FROM:<carol@there.test>", "RCPT TO:<DAVE@Other.Here.Test>"])
    assert replies[1][0] == 250


async def test_long_line_rejected_after_dot(server):
    def run():
        with smtplib.SMTP(HOST, PORT, local_hostname="client.there.test", timeout=10) as client:
            client.ehlo()
            client.mail("carol@there.test")
            client.rcpt("bob@here.test")
            reply = client.data(b"Subject: long\r\n\r\n" + b"z" * 1200 + b"\r\nend\r\n")
            return reply, client.noop()

    (code, text), noop = await asyncio.to_thread(run)
    assert code == 500
    assert text.startswith(b"5.5.2")
    assert noop[0] == 250
    assert await stored_messages(server.store, server.bob.id) == []


async def test_store_failure_gets_451_and_no_250(server, monkeypatch):
    async def broken(data, account_ids):
        raise OSError("disk full")

    monkeypatch.setattr(server.store, "deliver_local", broken)

    def run():
        with smtplib.SMTP(HOST, PORT, local_hostname="client.there.test", timeout=10) as client:
            client.ehlo()
            client.mail("carol@there.test")
            client.rcpt("bob@here.test")
            return client.data(MESSAGE)

    code, text = await asyncio.to_thread(run)
    assert code == 451
    assert text.startswith(b"4.3.0 Internal error, reference ")
    assert b"disk full" not in text


async def test_smtputf8_recipient(server):
    jorg = await server.store.create_account("jörg@here.test", "pw")
    body = "From: carol@there.test\r\nTo: jörg@here.test\r\nSubject: Grüße\r\n\r\nHallo.\r\n".encode()

    def run():
        with smtplib.SMTP(HOST, PORT, local_hostname="client.there.test", timeout=10) as client:
            client.ehlo()
            return client.sendmail("carol@there.test", ["jörg@here.test"], body, mail_options=["SMTPUTF8"])

    assert await asyncio.to_thread(run) == {}
    (data,) = await stored_messages(server.store, jorg.id)
    assert b"with UTF8SMTP id " in data
    assert data.endswith(body)


async def test_postmaster_goes_to_first_configured_domain(tmp_path):
    # [server] domains lists zz.test first, although aa.test sorts first.
    host = "127.0.4.30"
    config = write_config(tmp_path, "two", host, ["zz.test", "aa.test"])
    async with contextlib.AsyncExitStack() as stack:
        context = await start_services(config, ("transfer",), stack)
        store = context.store
        zoe = await store.create_account("zoe@zz.test", "pw")
        adam = await store.create_account("adam@aa.test", "pw")
        await store.add_alias("postmaster@aa.test", "adam@aa.test")

        def send(recipient: str) -> dict:
            with smtplib.SMTP(host, PORT, local_hostname="client.there.test", timeout=10) as client:
                return client.sendmail("carol@there.test", [recipient], MESSAGE)

        # Only aa.test has a postmaster, so <postmaster> reaches it.
        assert await asyncio.to_thread(send, "<postmaster>") == {}
        assert len(await stored_messages(store, adam.id)) == 1
        await store.add_alias("postmaster@zz.test", "zoe@zz.test")
        assert await asyncio.to_thread(send, "<POSTMASTER>") == {}
        assert len(await stored_messages(store, zoe.id)) == 1
        assert len(await stored_messages(store, adam.id)) == 1
