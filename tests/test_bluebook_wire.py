"""The Blue Book's wire handling without sockets: cache keys, hostile bytes, rate-limited logs."""

from __future__ import annotations

import logging

import dns.message
import dns.name
import dns.rcode
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstack.bluebook import mailzone
from mailstack.bluebook.config import ZoneSection
from mailstack.bluebook.directory import Directory, Zone
from mailstack.bluebook.responder import RateLimitedLog, Responder, question_key
from mailstack.bluebook.zonestore import to_name


def make_responder() -> Responder:
    spec = mailzone.MailDomain(domain=to_name("here.test"), mx=[(10, to_name("mx.here.test"))], addresses=["127.0.1.10"])
    content = mailzone.build_zone(spec, ZoneSection(), ("127.0.3.1",))
    return Responder(Directory({content.origin: Zone.from_content(content)}))


RESPONDER = make_responder()
QUERY = dns.message.make_query("here.test", "MX", use_edns=0).to_wire()


def test_question_key_ignores_case_and_id():
    upper = bytearray(dns.message.make_query("HERE.TEST", "MX").to_wire())
    lower = bytearray(dns.message.make_query("here.test", "MX").to_wire())
    upper[:2] = b"\x00\x01"
    lower[:2] = b"\x00\x02"
    assert question_key(bytes(upper), False)[0] == question_key(bytes(lower), False)[0]


def test_question_key_keeps_type_bytes():
    # QTYPE 65 (HTTPS) is the letter "A": lower-casing must not touch it.
    https = dns.message.make_query("here.test", "HTTPS").to_wire()
    type_97 = dns.message.make_query("here.test", "TYPE97").to_wire()
    assert question_key(https, False)[0] != question_key(type_97, False)[0]


def test_question_key_separates_transport_and_edns():
    plain = dns.message.make_query("here.test", "MX").to_wire()
    edns = dns.message.make_query("here.test", "MX", use_edns=0, payload=1232).to_wire()
    keys = {question_key(plain, False)[0], question_key(plain, True)[0], question_key(edns, False)[0]}
    assert len(keys) == 3


def test_question_key_none_for_other_messages():
    padded = dns.message.make_query("here.test", "MX", use_edns=0, pad=128).to_wire()
    assert question_key(padded, False) is None
    response = bytearray(QUERY)
    response[2] |= 0x80
    assert question_key(bytes(response), False) is None
    assert question_key(QUERY[:-3], False) is None


def test_cached_answer_equals_full_answer():
    responder = make_responder()
    query = bytearray(dns.message.make_query("Here.Test", "MX").to_wire())
    full = responder.handle(bytes(query), ("127.0.0.1", 1), False)
    query[:2] = b"\xbe\xef"
    fast = responder.fast(bytes(query), False)
    assert fast is not None
    assert fast[:2] == b"\xbe\xef"
    assert fast[2:] == full[2:]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_answered_or_dropped(data):
    result = RESPONDER.handle(data, ("127.0.0.1", 1), False)
    assert result is None or isinstance(result, bytes)
    if isinstance(result, bytes):
        assert result[:2] == data[:2]
        assert result[2] & 0x80


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=2, max_value=len(QUERY) - 1), st.integers(min_value=0, max_value=255))
def test_mutated_query_answered_or_dropped(position, value):
    data = bytearray(QUERY)
    data[position] = value
    result = RESPONDER.handle(bytes(data), ("127.0.0.1", 1), False)
    assert result is None or result[:2] == data[:2]
    fast = RESPONDER.fast(bytes(data), False)
    assert fast is None or fast[:2] == data[:2]


def test_rate_limited_log_counts_the_rest(caplog):
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("bluebook-test"), burst=3, period=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="bluebook-test")
    for index in range(10):
        limited.warning("bad request %d", index)
    assert [r.getMessage() for r in caplog.records] == ["bad request 0", "bad request 1", "bad request 2"]
    now[0] = 11.0
    limited.warning("bad request %d", 10)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[3] == "7 more bad requests were not logged in the last 10 s"
    assert messages[4] == "bad request 10"


def test_formerr_reply_header_only():
    reply = RESPONDER.handle(b"\x12\x34\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00", ("127.0.0.1", 1), False)
    assert reply == b"\x12\x34\x81\x01" + b"\x00" * 8
    assert reply[3] & 0x0F == dns.rcode.FORMERR
