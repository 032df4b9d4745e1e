"""The relay: MX resolution against a DNS server on loopback, and the queue runner
sending to aiosmtpd peers, with a fake clock for retry schedules."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy

import pytest

from mailstack.store import Store
from mailstack.transfer.client import ClientSettings, Sender
from mailstack.transfer.resolver import MXResolver, PermanentDNSFailure, TemporaryDNSFailure
from mailstack.transfer.runner import QueueRunner, RetryPolicy
from test_transfer_queue import FakeClock, postgres  # noqa: F401 (fixture)
from test_transfer_support import DNSResponder, Peer

DNS_HOST = "127.0.5.1"
PEER_HOST = "127.0.5.2"
PEER_BACKUP = "127.0.5.3"
PEER_PORT = 2525
MESSAGE = (
    b"From: Alice <alice@here.test>\r\nTo: bob@there.test\r\nSubject: relay test\r\n"
    b"Message-ID: <relay-test@here.test>\r\n\r\nHello Bob.\r\n.leading dot\r\n"
)


@pytest.fixture
async def dns_server():
    server = DNSResponder(DNS_HOST)
    await server.start()
    server.add("there.test", "MX", "10 mx.there.test.")
    server.add("mx.there.test", "A", PEER_HOST)
    yield server
    await server.stop()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def resolver(dns_server, clock):
    return MXResolver((DNS_HOST,), port=dns_server.port, timeout=2.0, clock=clock)


@pytest.fixture
async def store(tmp_path, clock):
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'here.db'}", clock=clock)
    await opened.add_domain("here.test")
    await opened.create_account("alice@here.test", "pw")
    yield opened
    await opened.close()


@pytest.fixture
def peer():
    server = Peer(PEER_HOST, "there.test", port=PEER_PORT, unknown={"nobody@there.test"}, busy={"busy@there.test"})
    server.start()
    yield server
    server.stop()


def make_runner(store, resolver, clock, **retry) -> QueueRunner:
    settings = ClientSettings(local_hostname="mx.here.test", port=PEER_PORT, connect_timeout=2, command_timeout=5)
    return QueueRunner(
        store,
        resolver=resolver,
        sender=Sender(settings),
        reporting_mta="mx.here.test",
        retry=RetryPolicy(**retry),
        clock=clock,
        owner="test-runner",
    )


async def submit(store, recipients, sender="alice@here.test") -> str:
    alice = await store.get_account("alice@here.test")
    return await store.submit(
        MESSAGE, account_id=alice.id, envelope_sender=sender, local_account_ids=[], remote_recipients=recipients
    )


async def inbox_messages(store, name="INBOX") -> list[email.message.EmailMessage]:
    alice = await store.get_account("alice@here.test")
    mailbox = await store.get_mailbox(alice.id, name)
    from sqlalchemy import select

    from mailstack.store.models import Message, MessageContent

    async with store.read() as session:
        rows = await session.scalars(
            select(MessageContent.data)
            .join(Message, Message.content_sha256 == MessageContent.sha256)
            .where(Message.mailbox_id == mailbox.id)
            .order_by(Message.uid)
        )
        return [email.message_from_bytes(data, policy=email.policy.default) for data in rows]


def delivery_status(notice: email.message.EmailMessage) -> list[dict[str, str]]:
    """Return the per-recipient blocks of a DSN's message/delivery-status part."""
    for part in notice.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = part.get_payload()
            return [dict(block.items()) for block in blocks[1:]]
    raise AssertionError("no message/delivery-status part")


# Resolver ------------------------------------------------------------------------


async def test_resolver_orders_mx_by_preference(dns_server, clock):
    dns_server.records.clear()
    dns_server.add("multi.test", "MX", "20 b.multi.test.", "10 a2.multi.test.", "10 a1.multi.test.")
    for name, address in (("a1", "127.0.5.11"), ("a2", "127.0.5.12"), ("b", "127.0.5.13")):
        dns_server.add(f"{name}.multi.test", "A", address)
    dns_server.add("b.multi.test", "AAAA", "::1")
    resolver = MXResolver((DNS_HOST,), port=dns_server.port, clock=clock, shuffle=lambda names: names.sort())
    hosts = await resolver.resolve("MULTI.test.")
    assert [h.name for h in hosts] == ["a1.multi.test", "a2.multi.test", "b.multi.test"]
    assert [h.preference for h in hosts] == [10, 10, 20]
    assert hosts[2].addresses == ("::1", "127.0.5.13")


async def test_resolver_shuffles_equal_preference(dns_server, clock):
    dns_server.add("multi.test", "MX", "10 a.multi.test.", "10 b.multi.test.")
    dns_server.add("a.multi.test", "A", "127.0.5.11")
    dns_server.add("b.multi.test", "A", "127.0.5.12")
    seen = set()
    for _ in range(30):
        resolver = MXResolver((DNS_HOST,), port=dns_server.port, clock=clock)
        seen.add(tuple(h.name for h in await resolver.resolve("multi.test")))
    assert seen == {("a.multi.test", "b.multi.test"), ("b.multi.test", "a.multi.test")}


async def test_resolver_implicit_mx(dns_server, resolver):
    dns_server.add("plain.test", "A", "127.0.5.20")
    hosts = await resolver.resolve("plain.test")
    assert len(hosts) == 1
    assert hosts[0].name == "plain.test"
    assert hosts[0].implicit
    assert hosts[0].addresses == ("127.0.5.20",)


async def test_resolver_null_mx(dns_server, resolver):
    dns_server.add("nomail.test", "MX", "0 .")
    with pytest.raises(PermanentDNSFailure) as failure:
        await resolver.resolve("nomail.test")
    assert failure.value.status == "5.1.10"


async def test_resolver_nxdomain(resolver):
    with pytest.raises(PermanentDNSFailure) as failure:
        await resolver.resolve("missing.test")
    assert failure.value.status == "5.1.2"


async def test_resolver_no_address_anywhere(dns_server, resolver):
    dns_server.add("empty.test", "TXT", '"v=spf1 -all"')
    with pytest.raises(PermanentDNSFailure) as failure:
        await resolver.resolve("empty.test")
    assert failure.value.status == "5.4.4"
    dns_server.add("dangling.test", "MX", "10 gone.dangling.test.")
    with pytest.raises(PermanentDNSFailure) as failure:
        await resolver.resolve("dangling.test")
    assert failure.value.status == "5.4.4"


async def test_resolver_servfail_is_temporary(dns_server, resolver):
    dns_server.servfail.add("broken.test")
    with pytest.raises(TemporaryDNSFailure) as failure:
        await resolver.resolve("broken.test")
    assert failure.value.status == "4.4.3"


async def test_resolver_timeout_is_temporary(clock):
    # Port 9 of this address has no listener: every query times out or is refused.
    resolver = MXResolver(("127.0.5.250",), port=9, timeout=0.3, clock=clock)
    with pytest.raises(TemporaryDNSFailure):
        await resolver.resolve("there.test")


async def test_resolver_caches_for_ttl(dns_server, resolver, clock):
    await resolver.resolve("there.test")
    count = len(dns_server.queries)
    await resolver.resolve("there.test")
    assert len(dns_server.queries) == count
    with pytest.raises(PermanentDNSFailure):
        await resolver.resolve("missing.test")
    negative = len(dns_server.queries)
    with pytest.raises(PermanentDNSFailure):
        await resolver.resolve("missing.test")
    assert len(dns_server.queries) == negative
    clock.advance(301)
    await resolver.resolve("there.test")
    assert len(dns_server.queries) > negative


# Runner ------------------------------------------------------------------------


async def test_relay_delivers_and_leaves_outbox(store, resolver, clock, peer):
    runner = make_runner(store, resolver, clock)
    queue_id = await submit(store, ["bob@there.test", "Carol@there.test"])
    assert await runner.run_once() == 2
    assert len(peer.handler.received) == 1
    received = peer.handler.received[0]
    assert received.sender == "alice@here.test"
    assert received.recipients == ["bob@there.test", "Carol@there.test"]
    assert received.data == MESSAGE
    assert await store.list_queue() == []
    assert await inbox_messages(store, "Outbox") == []
    assert await runner.run_once() == 0
    assert queue_id


async def test_relay_peer_down_then_flush(store, resolver, clock):
    runner = make_runner(store, resolver, clock)
    queue_id = await submit(store, ["bob@there.test"])
    assert await runner.run_once() == 1
    entry = await store.get_queue_entry(queue_id)
    (delivery,) = entry.deliveries
    assert delivery.state == "deferred"
    assert delivery.attempts == 1
    assert "connection to mx.there.test[127.0.5.2] failed" in delivery.last_reply
    assert delivery.next_attempt == clock() + dt.timedelta(seconds=300)
    assert len(await inbox_messages(store, "Outbox")) == 1

    peer = Peer(PEER_HOST, "there.test", port=PEER_PORT)
    peer.start()
    try:
        assert await runner.run_once() == 0
        assert await store.flush_queue(queue_id) == 1
        assert await runner.run_once() == 1
        assert await runner.run_once() == 0
        assert peer.recipients() == ["bob@there.test"]
    finally:
        peer.stop()
    assert await store.list_queue() == []


async def test_relay_unknown_recipient_bounces(store, resolver, clock, peer):
    runner = make_runner(store, resolver, clock)
    queue_id = await submit(store, ["bob@there.test", "nobody@there.test"])
    await runner.run_once()
    assert peer.recipients() == ["bob@there.test"]
    assert await store.list_queue() == []
    (notice,) = await inbox_messages(store)
    assert notice["Return-Path"] == "<>"
    assert notice["Auto-Submitted"] == "auto-replied"
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    (status,) = delivery_status(notice)
    assert status["Final-Recipient"] == "rfc822; nobody@there.test"
    assert status["Action"] == "failed"
    assert status["Status"] == "5.1.1"
    assert status["Remote-MTA"] == "dns; mx.there.test"
    assert status["Diagnostic-Code"].startswith("smtp; 550 5.1.1 <nobody@there.test>")
    headers = [p for p in notice.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert b"Message-ID: <relay-test@here.test>" in headers[0].get_payload(decode=True)
    assert queue_id in notice.as_string()
    await runner.run_once()
    assert peer.recipients() == ["bob@there.test"]


async def test_relay_busy_recipient_deferred(store, resolver, clock, peer):
    runner = make_runner(store, resolver, clock)
    queue_id = await submit(store, ["bob@there.test", "busy@there.test"])
    await runner.run_once()
    entry = await store.get_queue_entry(queue_id)
    states = {d.recipient: d for d in entry.deliveries}
    assert states["bob@there.test"].state == "delivered"
    assert states["busy@there.test"].state == "deferred"
    assert "450 4.2.1" in states["busy@there.test"].last_reply
    assert "(in reply to RCPT TO)" in states["busy@there.test"].last_reply
    peer.handler.busy.clear()
    clock.advance(300)
    await runner.run_once()
    assert peer.recipients() == ["bob@there.test", "busy@there.test"]
    assert await store.list_queue() == []


@pytest.mark.parametrize(
    ("domain", "records", "status"),
    [
        ("nomail.test", {"MX": ["0 ."]}, "5.1.10"),
        ("missing.test", None, "5.1.2"),
    ],
)
async def test_relay_dns_permanent_failures(store, resolver, clock, dns_server, domain, records, status):
    for rdtype, values in (records or {}).items():
        dns_server.add(domain, rdtype, *values)
    runner = make_runner(store, resolver, clock)
    await submit(store, [f"user@{domain}"])
    await runner.run_once()
    assert await store.list_queue() == []
    (notice,) = await inbox_messages(store)
    (block,) = delivery_status(notice)
    assert block["Status"] == status
    assert block["Diagnostic-Code"].startswith("x-local; ")


async def test_relay_mx_pointing_here_bounces(store, resolver, clock, dns_server):
    dns_server.add("loop.test", "MX", "10 mx.here.test.")
    dns_server.add("mx.here.test", "A", "127.0.5.9")
    runner = make_runner(store, resolver, clock)
    await submit(store, ["user@loop.test"])
    await runner.run_once()
    assert await store.list_queue() == []
    (notice,) = await inbox_messages(store)
    (block,) = delivery_status(notice)
    assert block["Status"] == "5.4.6"
    assert "loops back to myself" in block["Diagnostic-Code"]


async def test_relay_implicit_mx(store, resolver, clock, dns_server):
    dns_server.add("plain.test", "A", PEER_BACKUP)
    backup = Peer(PEER_BACKUP, "plain.test", port=PEER_PORT)
    backup.start()
    try:
        runner = make_runner(store, resolver, clock)
        await submit(store, ["user@plain.test"])
        await runner.run_once()
        assert backup.recipients() == ["user@plain.test"]
    finally:
        backup.stop()


async def test_relay_falls_back_to_next_mx(store, clock, dns_server):
    dns_server.add("two.test", "MX", "10 primary.two.test.", "20 backup.two.test.")
    dns_server.add("primary.two.test", "A", "127.0.5.4")  # nothing listens there
    dns_server.add("backup.two.test", "A", PEER_BACKUP)
    resolver = MXResolver((DNS_HOST,), port=dns_server.port, clock=clock)
    backup = Peer(PEER_BACKUP, "two.test", port=PEER_PORT)
    backup.start()
    try:
        runner = make_runner(store, resolver, clock)
        await submit(store, ["user@two.test"])
        await runner.run_once()
        assert backup.recipients() == ["user@two.test"]
    finally:
        backup.stop()


async def test_relay_servfail_retries_then_expires(store, resolver, clock, dns_server):
    dns_server.servfail.add("broken.test")
    runner = make_runner(store, resolver, clock, delay_warning=3600)
    queue_id = await submit(store, ["user@broken.test"])
    start = clock()
    waits = []
    while await store.list_queue():
        assert await runner.run_once() == 1
        entries = await store.list_queue()
        if not entries:
            break
        (delivery,) = entries[0].deliveries
        assert delivery.state == "deferred"
        assert "DNS server failure for broken.test MX" in delivery.last_reply
        waits.append((delivery.next_attempt - clock()).total_seconds())
        clock.now = delivery.next_attempt
    assert waits[:6] == [300, 600, 1200, 2400, 4000, 4000]
    assert clock() - start >= dt.timedelta(days=5)
    assert len(waits) < 120
    notices = await inbox_messages(store)
    assert [n["Subject"] for n in notices] == ["Delayed Mail (still being retried)", "Undelivered Mail Returned to Sender"]
    (delayed,) = delivery_status(notices[0])
    assert delayed["Action"] == "delayed"
    assert delayed["Status"] == "4.4.3"
    assert "Will-Retry-Until" in delayed
    (failed,) = delivery_status(notices[1])
    assert failed["Action"] == "failed"
    assert failed["Status"] == "4.4.3"
    assert queue_id


async def test_relay_null_sender_never_bounces(store, resolver, clock):
    runner = make_runner(store, resolver, clock)
    await submit(store, ["user@missing.test"], sender="")
    await runner.run_once()
    assert await store.list_queue() == []
    assert await inbox_messages(store) == []


async def test_runner_wakes_on_submission(store, resolver, clock, peer):
    runner = make_runner(store, resolver, clock)
    runner.scan_interval = 60
    runner.start()
    try:
        await asyncio.sleep(0)
        await submit(store, ["bob@there.test"])
        arrived = await asyncio.to_thread(peer.handler.arrived.wait, 10)
        assert arrived
    finally:
        await runner.stop(5)
    assert peer.recipients() == ["bob@there.test"]


# Peer replies, TLS and limits ----------------------------------------------------


async def test_relay_mail_refused_bounces_all(store, resolver, clock):
    peer = Peer(PEER_HOST, "there.test", port=PEER_PORT, mail_reply="553 5.7.1 Sender rejected by policy")
    peer.start()
    try:
        runner = make_runner(store, resolver, clock)
        await submit(store, ["bob@there.test", "carol@there.test"])
        await runner.run_once()
    finally:
        peer.stop()
    (notice,) = await inbox_messages(store)
    blocks = delivery_status(notice)
    assert [b["Status"] for b in blocks] == ["5.7.1", "5.7.1"]
    assert "(in reply to MAIL FROM)" in notice.as_string()


async def test_relay_data_tempfail_defers(store, resolver, clock):
    peer = Peer(PEER_HOST, "there.test", port=PEER_PORT, data_reply="451 4.3.0 Queue full")
    peer.start()
    try:
        runner = make_runner(store, resolver, clock)
        queue_id = await submit(store, ["bob@there.test"])
        await runner.run_once()
    finally:
        peer.stop()
    (delivery,) = (await store.get_queue_entry(queue_id)).deliveries
    assert delivery.state == "deferred"
    assert delivery.last_reply.endswith("451 4.3.0 Queue full (in reply to DATA)")


async def test_relay_utf8_needs_peer_support(store, resolver, clock):
    peer = Peer(PEER_HOST, "there.test", port=PEER_PORT, smtputf8=False)
    peer.start()
    try:
        runner = make_runner(store, resolver, clock)
        await submit(store, ["jörg@there.test"])
        await runner.run_once()
    finally:
        peer.stop()
    assert peer.recipients() == []
    (notice,) = await inbox_messages(store)
    (block,) = delivery_status(notice)
    assert block["Status"] == "5.6.7"
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@there.test"


async def test_relay_utf8_with_peer_support(store, resolver, clock, peer):
    runner = make_runner(store, resolver, clock)
    await submit(store, ["jörg@there.test"])
    await runner.run_once()
    assert peer.recipients() == ["jörg@there.test"]


async def test_relay_per_domain_connection_limit(store, resolver, clock):
    peer = Peer(PEER_HOST, "there.test", port=PEER_PORT, data_delay=0.2)
    peer.start()
    try:
        runner = make_runner(store, resolver, clock)
        runner._per_domain_limit = 2
        for index in range(6):
            await submit(store, [f"user{index}@there.test"])
        assert await runner.run_once() == 6
    finally:
        peer.stop()
    assert len(peer.recipients()) == 6
    assert peer.handler.max_active == 2
    assert runner._per_domain == {}


def tls_peer_context(tmp_path):
    from mailstack import tls

    files = tls.ensure_server_certificate(tmp_path / "peer-tls", "mx.there.test", (PEER_HOST,))
    return files, tls.server_context(files)


def tls_runner(store, resolver, clock, policy: str, ca_file=None) -> QueueRunner:
    runner = make_runner(store, resolver, clock)
    runner.sender = Sender(
        ClientSettings(
            local_hostname="mx.here.test", port=PEER_PORT, tls_policy=policy, tls_ca_file=ca_file,
            connect_timeout=2, command_timeout=5,
        )
    )
    return runner


@pytest.mark.parametrize(
    ("policy", "peer_tls", "trusted", "expected_state", "tls_sessions"),
    [
        ("opportunistic", True, False, "delivered", 1),
        ("opportunistic", False, False, "delivered", 0),
        ("none", True, False, "delivered", 0),
        ("required", False, False, "deferred", 0),
        ("required", True, False, "delivered", 1),
        ("verify", True, True, "delivered", 1),
        ("verify", True, False, "deferred", 0),
    ],
)
async def test_relay_tls_policy(tmp_path, store, resolver, clock, policy, peer_tls, trusted, expected_state, tls_sessions):
    files, context = tls_peer_context(tmp_path)
    if trusted:
        ca_file = files.ca_file
    else:
        # Another CA that did not issue the peer's certificate.
        from mailstack import tls

        ca_file = tls.ensure_server_certificate(tmp_path / "other-ca", "other", ()).ca_file
    peer = Peer(PEER_HOST, "there.test", port=PEER_PORT, tls_context=context if peer_tls else None)
    peer.start()
    try:
        runner = tls_runner(store, resolver, clock, policy, ca_file)
        queue_id = await submit(store, ["bob@there.test", "carol@there.test"])
        await runner.run_once()
    finally:
        peer.stop()
    assert peer.handler.tls_sessions == tls_sessions
    entries = await store.list_queue()
    if expected_state == "delivered":
        assert entries == []
        assert len(peer.recipients()) == 2
    else:
        (entry,) = entries
        assert entry.queue_id == queue_id
        assert {d.state for d in entry.deliveries} == {"deferred"}
        reply = entry.deliveries[0].last_reply
        assert ("4.7.4" in reply or "does not offer STARTTLS" in reply) if not peer_tls else "TLS handshake" in reply
        assert peer.recipients() == []


async def test_two_workers_share_postgres_queue(postgres, resolver, clock, peer):
    url = postgres.create_database("relay_shared")
    first = await Store.open(url, clock=clock)
    second = await Store.open(url, clock=clock)
    try:
        await first.add_domain("here.test")
        alice = await first.create_account("alice@here.test", "pw")
        expected = []
        for index in range(15):
            recipients = [f"m{index}r{n}@there.test" for n in range(3)]
            expected += recipients
            await first.submit(
                MESSAGE, account_id=alice.id, envelope_sender="alice@here.test", local_account_ids=[],
                remote_recipients=recipients,
            )
        workers = [make_runner(first, resolver, clock), make_runner(second, resolver, clock)]
        workers[0].owner, workers[1].owner = "worker-1", "worker-2"
        counts = await asyncio.gather(*(worker.run_once() for worker in workers))
        assert sum(counts) == len(expected)
        assert sorted(peer.recipients()) == sorted(expected)
        assert await first.list_queue() == []
    finally:
        await first.close()
        await second.close()


async def test_relay_skips_message_deleted_after_claim(store, resolver, clock, peer):
    runner = make_runner(store, resolver, clock)
    alice = await store.get_account("alice@here.test")
    # A local copy keeps the content stored after the queue entry is gone.
    queue_id = await store.submit(
        MESSAGE, account_id=alice.id, envelope_sender="alice@here.test", local_account_ids=[alice.id],
        remote_recipients=["bob@there.test"],
    )
    claimed = await store.claim_due(runner.owner, 60)
    assert await store.delete_queue_entry(queue_id) == 1
    await runner._attempt(claimed)
    assert peer.recipients() == []
    assert await store.list_queue() == []


async def test_relay_reuses_connection(store, resolver, clock, peer):
    runner = make_runner(store, resolver, clock)
    for name in ("bob", "carol", "dave"):
        await submit(store, [f"{name}@there.test"])
        await runner.run_once()
    assert peer.recipients() == ["bob@there.test", "carol@there.test", "dave@there.test"]
    assert len({message.connection for message in peer.handler.received}) == 1
    await runner.sender.close()


async def test_relay_replaces_broken_cached_connection(store, resolver, clock, peer):
    runner = make_runner(store, resolver, clock)
    await submit(store, ["bob@there.test"])
    await runner.run_once()
    peer.drop_connections()
    await submit(store, ["carol@there.test"])
    await runner.run_once()
    await runner.sender.close()
    assert peer.recipients() == ["bob@there.test", "carol@there.test"]
    assert len({message.connection for message in peer.handler.received}) == 2
    assert await store.list_queue() == []


async def test_relay_retries_when_cached_connection_drops_at_mail(store, resolver, clock, peer):
    runner = make_runner(store, resolver, clock)
    await submit(store, ["bob@there.test"])
    await runner.run_once()
    peer.handler.drop_next_mail = True
    await submit(store, ["carol@there.test"])
    await runner.run_once()
    await runner.sender.close()
    assert peer.recipients() == ["bob@there.test", "carol@there.test"]
    assert await store.list_queue() == []


async def test_runner_renews_leases_during_slow_attempt(store, resolver, clock):
    renewed = asyncio.Event()
    renew = store.renew_leases

    async def observed_renew(*args, **kwargs):
        count = await renew(*args, **kwargs)
        renewed.set()
        return count

    store.renew_leases = observed_renew
    peer = Peer(PEER_HOST, "there.test", port=PEER_PORT, stall_rcpt=True)
    peer.start()
    try:
        runner = make_runner(store, resolver, clock)
        runner.lease_time = 0.3
        await submit(store, ["bob@there.test"])
        attempt = asyncio.create_task(runner.run_once())
        assert await asyncio.to_thread(peer.handler.stalled.wait, 10)
        for _ in range(3):
            renewed.clear()
            clock.advance(0.25)
            await asyncio.wait_for(renewed.wait(), 10)
            # The first lease ended 0.3 s after the claim; renewal keeps the row away from others.
            assert await store.claim_due("other-worker", 60) == []
        peer.handler.release.set()
        await asyncio.wait_for(attempt, 10)
    finally:
        peer.stop()
    assert peer.recipients() == ["bob@there.test"]
    assert await store.list_queue() == []


async def test_resolver_cache_is_bounded(dns_server, clock, monkeypatch):
    from mailstack.transfer import resolver as resolver_module

    monkeypatch.setattr(resolver_module, "MAX_CACHE_ENTRIES", 4)
    resolver = MXResolver((DNS_HOST,), port=dns_server.port, clock=clock)
    for index in range(6):
        dns_server.add(f"d{index}.test", "A", "127.0.5.30")
        await resolver.resolve(f"d{index}.test")
    assert len(resolver._cache) <= 4


async def test_relay_splits_at_peer_recipient_limit(store, resolver, clock):
    peer = Peer(PEER_HOST, "there.test", port=PEER_PORT, max_recipients=2)
    peer.start()
    try:
        runner = make_runner(store, resolver, clock)
        recipients = [f"user{index}@there.test" for index in range(5)]
        await submit(store, recipients)
        await runner.run_once()
        await runner.sender.close()
    finally:
        peer.stop()
    assert [len(message.recipients) for message in peer.handler.received] == [2, 2, 1]
    assert len({message.connection for message in peer.handler.received}) == 1
    assert sorted(peer.recipients()) == recipients
    assert await store.list_queue() == []
