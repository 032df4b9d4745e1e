"""The submission server's header and throttle helpers, without sockets."""

from __future__ import annotations

import datetime as dt

import pytest

from mailstack.submission import headers
from mailstack.submission.throttle import AuthThrottle

NOW = dt.datetime(2026, 12, 4, 20, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    "message, expected",
    [
        (b"Subject: a\r\nMESSAGE-ID: <x@y>\r\n\r\nDate: not a header\r\n", {"subject", "message-id"}),
        (b"Subject: folded\r\n continued\r\nDate : Thu, 3 Dec 2026\r\n\r\n", {"subject", "date"}),
        (b"\r\nDate: in the body\r\n", set()),
        (b"not a header line\r\nDate: after garbage\r\n", set()),
        (b"From: a@b\r\n", {"from"}),
    ],
)
def test_present_fields(message, expected):
    assert headers.present_fields(message) == expected


def test_prepend_adds_missing_fields_only():
    message = b"message-id: <given@client>\r\nSubject: s\r\n\r\nbody\r\n"
    result = headers.prepend_fields(message, received=b"Received: x\r\n", hostname="mail.here.test", now=NOW)
    assert result.endswith(message)
    added = result[: -len(message)]
    assert added.startswith(b"Received: x\r\n")
    assert b"Message-ID" not in added
    assert added.endswith(b"Date: Fri, 04 Dec 2026 20:00:00 +0000\r\n")


def test_prepend_adds_both_when_absent():
    result = headers.prepend_fields(b"Subject: s\r\n\r\nb\r\n", received=b"Received: x\r\n", hostname="h.test", now=NOW)
    assert b"\r\nMessage-ID: <" in result
    assert b"@h.test>\r\n" in result
    assert b"\r\nDate: " in result


@pytest.mark.parametrize(
    "esmtp, tls, authenticated, smtputf8, keyword",
    [
        (True, True, True, False, "ESMTPSA"),
        (True, False, True, False, "ESMTPA"),
        (True, True, False, False, "ESMTPS"),
        (True, False, False, False, "ESMTP"),
        (True, True, True, True, "UTF8SMTPSA"),
        (False, False, False, False, "SMTP"),
    ],
)
def test_protocol_keyword(esmtp, tls, authenticated, smtputf8, keyword):
    assert headers.with_protocol_keyword(esmtp=esmtp, tls=tls, authenticated=authenticated, smtputf8=smtputf8) == keyword


def test_received_field_shape():
    field = headers.received_field(
        helo="client.test", client_address="127.0.0.1", hostname="mail.here.test", protocol="ESMTPSA",
        queue_id="ABC", tls_version="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384",
        recipients=["bob@here.test"], now=NOW,
    )
    assert field == (
        b"Received: from client.test ([127.0.0.1])\r\n"
        b"\tby mail.here.test (mailstack) with ESMTPSA id ABC\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
        b"\tfor <bob@here.test>; Fri, 04 Dec 2026 20:00:00 +0000\r\n"
    )


def test_received_field_hostile_helo_and_many_recipients():
    field = headers.received_field(
        helo="evil\rInjected: yes", client_address="127.0.0.1", hostname="h", protocol="ESMTPA",
        queue_id="Q", tls_version=None, tls_cipher=None, recipients=["a@x.test", "b@x.test"], now=NOW,
    )
    assert b"Injected" not in field
    assert b"from [invalid] ([127.0.0.1])" in field
    assert b"for <" not in field
    assert field.count(b"\r\n") == 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_delay_doubles_and_caps():
    throttle = AuthThrottle(limit=100, window=60, delay=1.0, clock=FakeClock())
    delays = [throttle.record_failure("192.0.2.1", "alice@here.test") for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_throttle_locks_address_and_account_then_expires():
    clock = FakeClock()
    throttle = AuthThrottle(limit=3, window=60, delay=0, clock=clock)
    for _ in range(3):
        throttle.record_failure("192.0.2.1", "Alice@here.test")
    assert throttle.is_locked("192.0.2.1")
    # Another address is locked out for the same account, case-insensitively.
    assert throttle.is_locked("192.0.2.9", "alice@HERE.test")
    assert not throttle.is_locked("192.0.2.9", "bob@here.test")
    clock.now += 61
    assert not throttle.is_locked("192.0.2.1", "alice@here.test")
