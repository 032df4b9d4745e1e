"""Pure parts of the transfer role: reply parsing, backoff, notifications and trace fields."""

from __future__ import annotations

import datetime as dt
import email
import email.policy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstack.transfer.client import local_failure, peer_reply
from mailstack.transfer.dsn import MAX_RETURNED_HEADERS, RecipientStatus, build_dsn, original_headers
from mailstack.transfer.inbound import count_received
from mailstack.transfer.runner import RetryPolicy

NOW = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    ("code", "message", "status", "text"),
    [
        (250, "2.0.0 Ok: queued as X", "2.0.0", "2.0.0 Ok: queued as X"),
        (550, "5.1.1 <a@b>: user unknown", "5.1.1", "5.1.1 <a@b>: user unknown"),
        (550, "user unknown", "5.0.0", "user unknown"),
        (451, "4.7.1 greylisted,\n  try again", "4.7.1", "4.7.1 greylisted, try again"),
        # An enhanced code of another class than the reply is ignored (RFC 3463 requires them to match).
        (550, "2.0.0 odd", "5.0.0", "2.0.0 odd"),
        (421, "4.4.20 valid three-part code", "4.4.20", "4.4.20 valid three-part code"),
        (421, "4.4.2000 detail too long", "4.0.0", "4.4.2000 detail too long"),
    ],
)
def test_peer_reply_status(code, message, status, text):
    reply = peer_reply(code, message, "mx.there.test[127.0.5.2]", "RCPT TO")
    assert reply.status == status
    assert reply.text == text
    assert reply.describe() == f"mx.there.test[127.0.5.2] said: {code} {text} (in reply to RCPT TO)"


@given(st.integers(min_value=200, max_value=599), st.text(max_size=2000))
def test_peer_reply_class_follows_code(code, message):
    reply = peer_reply(code, message, "host", "DATA")
    assert reply.status[0] == str(code)[0]
    assert reply.delivered == (code < 300)
    assert reply.permanent == (code >= 500)
    assert "\n" not in reply.describe()
    assert len(reply.text) <= 500


def test_local_failure_is_not_a_peer_reply():
    reply = local_failure("4.4.1", "connection to x failed")
    assert reply.code == 0
    assert not reply.permanent
    assert reply.describe() == "connection to x failed"
    assert local_failure("5.1.2", "no such domain").permanent


def test_backoff_doubles_to_the_cap():
    policy = RetryPolicy(initial=300, maximum=4000)
    delays = [policy.delay(attempt).total_seconds() for attempt in range(1, 8)]
    assert delays == [300, 600, 1200, 2400, 4000, 4000, 4000]


def test_count_received_only_in_header():
    message = (
        b"Received: from a\r\n\tby b; Mon, 1 Jan 2026 00:00:00 +0000\r\n"
        b"RECEIVED: from c by d; Mon, 1 Jan 2026 00:00:00 +0000\r\n"
        b"Subject: x\r\n\r\nReceived: in the body does not count\r\n"
    )
    assert count_received(message) == 2


def test_original_headers_cut_at_line():
    long = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"y" * 60) for i in range(2000))
    headers = original_headers(long + b"\r\nbody\r\n")
    assert len(headers) <= MAX_RETURNED_HEADERS
    assert headers.endswith(b"\r\n")
    assert b"body" not in headers


def test_dsn_structure():
    original = "From: a@here.test\r\nSubject: Grüße\r\n\r\nbody text\r\n".encode()
    data = build_dsn(
        action="failed",
        reporting_mta="mx.here.test",
        envelope_sender="a@here.test",
        queue_id="ABC123",
        arrival=NOW - dt.timedelta(hours=1),
        original=original,
        recipients=[
            RecipientStatus("b@there.test", "5.1.1", "550 5.1.1 unknown\r\nuser", "mx.there.test", smtp_reply=True),
            RecipientStatus("c@nowhere.test", "5.1.2", "domain nowhere.test does not exist"),
        ],
        now=NOW,
    )

    assert b"\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["Return-Path"] == "<>"
    assert message["To"].addresses[0].addr_spec == "a@here.test"
    assert message.get_content_type() == "multipart/report"

    parts = message.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = parts[1].get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; mx.here.test"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 unknown user"
    assert blocks[1]["Remote-MTA"] == "dns; mx.there.test"
    assert blocks[2]["Diagnostic-Code"] == "x-local; domain nowhere.test does not exist"
    assert "Remote-MTA" not in blocks[2]
    assert "body text" not in message.as_string()
    assert parts[2]["Content-Transfer-Encoding"] == "8bit"


def test_dsn_delayed_has_retry_until():
    data = build_dsn(
        action="delayed",
        reporting_mta="mx.here.test",
        envelope_sender="a@here.test",
        queue_id="ABC123",
        arrival=NOW,
        original=b"Subject: x\r\n\r\n.\r\n",
        recipients=[RecipientStatus("b@there.test", "4.4.1", "connection refused")],
        now=NOW,
        will_retry_until=NOW + dt.timedelta(days=5),
    )
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    block = message.get_payload()[1].get_payload()[1]
    assert block["Action"] == "delayed"
    assert block["Will-Retry-Until"] == "Sat, 10 Jan 2026 12:00:00 +0000"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('nameservers = ["ns.example"]', "'ns.example' is not an IP address"),
        ("retry_initial = 600\nretry_max = 300", "retry_max (300 s) must not be below retry_initial (600 s)"),
        ('tls_policy = "sometimes"', "tls_policy"),
    ],
)
def test_transfer_config_rejects(tmp_path, text, message):
    from mailstack import config as config_module
    from mailstack.settings import MailServerConfig

    path = tmp_path / "bad.toml"
    path.write_text(f"[transfer]\n{text}\n")
    with pytest.raises(config_module.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_module.load(MailServerConfig, path)


@pytest.mark.parametrize(
    ("target", "candidates", "expected"),
    [
        ("127.0.5.2", ("127.0.5.20",), "127.0.5.20"),
        ("192.0.2.1", ("127.0.5.20",), None),
        ("192.0.2.1", ("127.0.5.20", "198.51.100.7"), "198.51.100.7"),
        ("2001:db8::1", ("198.51.100.7", "2001:db8::25"), "2001:db8::25"),
        ("192.0.2.1", ("0.0.0.0",), None),
        ("::1", ("127.0.0.1", "::1"), "::1"),
        ("127.0.5.2", (), None),
    ],
)
def test_source_address_choice(target, candidates, expected):
    from mailstack.transfer.client import choose_source

    assert choose_source(target, candidates) == expected


# Relay policy ---------------------------------------------------------------------

LOCAL_PARTS = st.text(alphabet="abob%!@\".+-_", min_size=1, max_size=12)
DOMAINS = st.sampled_from(
    ["here.test", "HERE.test", "here.test.", "there.test", "sub.here.test", "here.test.example.com",
     "[127.0.5.10]", "[192.0.2.1]", "[IPv6:::1]", "other.example"]
)


@pytest.fixture(scope="module")
def relay_policy(tmp_path_factory):
    """An InboundHandler on a real store with here.test and accounts bob and bob%x, on one event loop."""
    import asyncio

    from mailstack.store import Store
    from mailstack.transfer.inbound import InboundHandler

    loop = asyncio.new_event_loop()
    path = tmp_path_factory.mktemp("policy") / "mail.db"

    async def setup():
        store = await Store.open(f"sqlite+aiosqlite:///{path}")
        await store.add_domain("here.test")
        await store.create_account("bob@here.test", "pw")
        return store

    store = loop.run_until_complete(setup())
    handler = InboundHandler(store, hostname="mx.here.test", local_addresses=("127.0.5.10",))
    yield loop, handler
    loop.run_until_complete(store.close())
    loop.close()


@given(local=LOCAL_PARTS, domain=DOMAINS)
def test_only_local_mailboxes_pass_policy(relay_policy, local, domain):
    from mailstack.smtp import Path, SMTPError

    loop, handler = relay_policy
    path = Path(f"{local}@{domain}", local, domain)
    try:
        address = loop.run_until_complete(handler._local_address(path, session=None))
    except SMTPError as error:
        code = error.reply.code
        foreign = domain.lower() not in ("here.test", "[127.0.5.10]")
        if foreign or any(mark in local for mark in '%!@"'):
            assert code == 554
            assert error.reply.enhanced == "5.7.1"
        else:
            assert code in (550, 554)
        return
    assert domain.lower() == "here.test"
    assert not any(mark in local for mark in '%!@"')
    assert address == path.address


def test_temporary_status_rewrites_class():
    from mailstack.transfer.client import _temporary_status

    assert _temporary_status("5.5.3 Too many recipients") == "4.5.3 Too many recipients"
    assert _temporary_status("Too many recipients") == "Too many recipients"
    assert _temporary_status("4.5.3 Too many") == "4.5.3 Too many"
