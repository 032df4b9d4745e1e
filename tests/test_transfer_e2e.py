"""Whole mail servers relaying to each other: `mailstack serve` processes and in-process
servers on their own 127.0.5.x addresses, with MX records from a DNS server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from mailstack import config as config_module
from mailstack.serve import start_services
from mailstack.settings import MailServerConfig
from mailstack.store import Store
from test_transfer_support import DNSResponder, Peer

DNS_HOST = "127.0.5.1"
BLUE_BOOK_HOST = "127.0.5.30"
HERE_HOST = "127.0.5.20"
THERE_HOST = "127.0.5.21"
PEER_HOST = "127.0.5.22"
MESSAGE = b"From: alice@here.test\r\nTo: bob@there.test\r\nSubject: across\r\n\r\nHello there.\r\n"


def server_config(
    tmp_path, name: str, host: str, domain: str, dns_port: int, extra: str = "", nameserver: str = DNS_HOST
) -> tuple[MailServerConfig, str]:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [server]
            name = "{name}"
            hostname = "mx.{domain}"
            domains = ["{domain}"]
            listen = ["{host}"]
            data_dir = "{tmp_path / name}"
            shutdown_timeout = 5.0

            [transfer]
            port = 25
            nameservers = ["{nameserver}"]
            dns_port = {dns_port}
            dns_timeout = 2.0
            connect_timeout = 5.0
            command_timeout = 10.0
            """
        )
        + textwrap.dedent(extra)
    )
    return config_module.load(MailServerConfig, path), str(path)


@pytest.fixture
async def dns_server():
    server = DNSResponder(DNS_HOST)
    await server.start()
    for domain, host in (("here.test", HERE_HOST), ("there.test", THERE_HOST), ("peer.test", PEER_HOST)):
        server.add(domain, "MX", f"10 mx.{domain}.")
        server.add(f"mx.{domain}", "A", host)
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def blue_book(tmp_path_factory):
    """Run `mailstack bluebook serve` with zones for here.test and there.test; return its port."""
    folder = tmp_path_factory.mktemp("bluebook")
    config = folder / "bluebook.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            listen = ["{BLUE_BOOK_HOST}"]
            port = 53
            data_dir = "{folder / 'data'}"
            """
        )
    )
    for domain, host in (("here.test", HERE_HOST), ("there.test", THERE_HOST)):
        added = subprocess.run(
            [sys.executable, "-m", "mailstack", "bluebook", "add", domain, "--mx", f"mx.{domain}",
             "--address", host, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
    log_file = (folder / "bluebook.log").open("w+b")
    copier = None
    process = subprocess.Popen(
        [sys.executable, "-m", "mailstack", "bluebook", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # The server logs one line when its sockets are bound.
        for line in process.stderr:
            log_file.write(line)
            if b"Blue Book listening on" in line:
                break
        else:
            raise AssertionError("the Blue Book exited before it listened")
        # Keep copying its log so that a full pipe never blocks the server.
        copier = threading.Thread(target=lambda: [log_file.write(line) for line in process.stderr], daemon=True)
        copier.start()
        yield 53
    finally:
        process.terminate()
        process.wait(10)
        if copier is not None:
            copier.join(10)
        log_file.close()


async def stored(store: Store, mailbox_id: int) -> list[bytes]:
    from sqlalchemy import select

    from mailstack.store.models import Message, MessageContent

    async with store.read() as session:
        rows = await session.scalars(
            select(MessageContent.data)
            .join(Message, Message.content_sha256 == MessageContent.sha256)
            .where(Message.mailbox_id == mailbox_id)
        )
        return list(rows)


def inbox_event(store: Store, mailbox_id: int) -> asyncio.Event:
    event = asyncio.Event()
    store.add_mailbox_listener(lambda ids: event.set() if mailbox_id in ids else None)
    return event


async def test_two_servers_relay(tmp_path, blue_book):
    here_config, _ = server_config(tmp_path, "here", HERE_HOST, "here.test", blue_book, nameserver=BLUE_BOOK_HOST)
    there_config, _ = server_config(tmp_path, "there", THERE_HOST, "there.test", blue_book, nameserver=BLUE_BOOK_HOST)
    async with contextlib.AsyncExitStack() as stack:
        there = await start_services(there_config, ("transfer",), stack)
        here = await start_services(here_config, ("transfer",), stack)
        alice = await here.store.create_account("alice@here.test", "pw")
        bob = await there.store.create_account("bob@there.test", "pw")
        bob_inbox = await there.store.get_mailbox(bob.id, "INBOX")
        arrived = inbox_event(there.store, bob_inbox.id)
        outbox = await here.store.get_mailbox(alice.id, "Outbox")

        queue_id = await here.store.submit(
            MESSAGE,
            account_id=alice.id,
            envelope_sender="alice@here.test",
            local_account_ids=[],
            remote_recipients=["bob@there.test"],
        )
        await asyncio.wait_for(arrived.wait(), 20)
        status = await there.store.mailbox_status(bob_inbox.id)
        assert status.messages == 1
        (data,) = await stored(there.store, bob_inbox.id)
        assert data.endswith(MESSAGE)
        assert data.startswith(b"Return-Path: <alice@here.test>\r\nReceived: from mx.here.test ([127.0.5.20])")
        # Opportunistic STARTTLS against the peer's local-CA certificate.
        assert b"with ESMTPS id" in data
        # The runner records the result after the peer's 250; wait for the Outbox to empty.
        emptied = inbox_event(here.store, outbox.id)
        if (await here.store.mailbox_status(outbox.id)).messages:
            await asyncio.wait_for(emptied.wait(), 20)
        assert (await here.store.mailbox_status(outbox.id)).messages == 0
        assert await here.store.list_queue() == []
        assert queue_id


async def test_killed_worker_redelivers_after_lease(tmp_path, dns_server):
    _config, config_path = server_config(
        tmp_path,
        "here",
        HERE_HOST,
        "here.test",
        dns_server.port,
        """
        lease_time = 2.0
        scan_interval = 0.2
        """,
    )
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'here' / 'mailstack.db'}")
    await store.add_domain("here.test")
    alice = await store.create_account("alice@here.test", "pw")
    recipients = ["ann@peer.test", "ben@peer.test", "cid@peer.test"]
    await store.submit(
        MESSAGE, account_id=alice.id, envelope_sender="alice@here.test", local_account_ids=[], remote_recipients=recipients
    )
    peer = Peer(PEER_HOST, "peer.test", stall_rcpt=True)
    peer.start()
    command = [sys.executable, "-m", "mailstack", "serve", "--config", config_path, "--role", "transfer"]
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        stalled = await asyncio.to_thread(peer.handler.stalled.wait, 30)
        assert stalled, "the first worker never reached RCPT"
        os.kill(worker.pid, signal.SIGKILL)
        await asyncio.to_thread(worker.wait, 10)
        (entry,) = await store.list_queue()
        assert {d.state for d in entry.deliveries} == {"queued"}
        assert all(d.lease_owner for d in entry.deliveries)

        peer.handler.stall_rcpt = False
        peer.handler.release.set()
        assert peer.handler.received == []

        worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        arrived = await asyncio.to_thread(peer.handler.arrived.wait, 30)
        assert arrived, "the restarted worker delivered nothing"
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 15) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        peer.stop()
    assert sorted(peer.recipients()) == recipients
    assert await store.list_queue() == []
    outbox = await store.get_mailbox(alice.id, "Outbox")
    assert (await store.mailbox_status(outbox.id)).messages == 0
    await store.close()


async def test_submit_relay_and_read_over_imap(tmp_path, blue_book):
    """A user's path end to end: submission on 587, relay on 25, IMAP on 143."""
    import imaplib
    import smtplib
    import ssl

    roles = ("submission", "imap", "transfer")
    here_config, _ = server_config(tmp_path, "here", HERE_HOST, "here.test", blue_book, nameserver=BLUE_BOOK_HOST)
    there_config, _ = server_config(tmp_path, "there", THERE_HOST, "there.test", blue_book, nameserver=BLUE_BOOK_HOST)
    async with contextlib.AsyncExitStack() as stack:
        there = await start_services(there_config, roles, stack)
        here = await start_services(here_config, roles, stack)
        alice = await here.store.create_account("alice@here.test", "alice-secret")
        bob = await there.store.create_account("bob@there.test", "bob-secret")
        bob_inbox = await there.store.get_mailbox(bob.id, "INBOX")
        outbox = await here.store.get_mailbox(alice.id, "Outbox")
        arrived = inbox_event(there.store, bob_inbox.id)
        outbox_changed = inbox_event(here.store, outbox.id)

        def submit() -> dict:
            context = ssl.create_default_context(cafile=str(here.tls_files.ca_file))
            context.check_hostname = False
            with smtplib.SMTP(HERE_HOST, 587, local_hostname="laptop.here.test", timeout=20) as client:
                client.starttls(context=context)
                client.login("alice@here.test", "alice-secret")
                return client.sendmail("alice@here.test", ["bob@there.test"], MESSAGE)

        assert await asyncio.to_thread(submit) == {}
        await asyncio.wait_for(arrived.wait(), 20)
        while (await here.store.mailbox_status(outbox.id)).messages:
            outbox_changed.clear()
            await asyncio.wait_for(outbox_changed.wait(), 20)

        def read() -> tuple[bytes, bytes]:
            context = ssl.create_default_context(cafile=str(there.tls_files.ca_file))
            context.check_hostname = False
            with imaplib.IMAP4(THERE_HOST, 143, timeout=20) as client:
                client.starttls(ssl_context=context)
                client.login("bob@there.test", "bob-secret")
                client.select("INBOX")
                _, found = client.search(None, "ALL")
                _, data = client.fetch(found[0].split()[0], "(BODY.PEEK[])")
                client.logout()
                return found[0], data[0][1]

        found, body = await asyncio.to_thread(read)
        assert found == b"1"
        assert b"Subject: across" in body
        assert b"Hello there." in body
        assert b"Return-Path: <alice@here.test>" in body
        assert await here.store.list_queue() == []
