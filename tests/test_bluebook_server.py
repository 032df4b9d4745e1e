"""The Blue Book server over real UDP and TCP sockets on 127.0.3.x.

Clients are dnspython (resolver, dns.asyncquery, inbound zone transfer), raw
sockets for the exact bytes of bad input, and dig and nsupdate from
bind9-dnsutils.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import struct

import dns.asyncquery
import dns.asyncresolver
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.tsigkeyring
import dns.update
import dns.zone
import pytest

from mailstack import config as config_module
from mailstack.bluebook import mailzone
from mailstack.bluebook.config import BlueBookConfig
from mailstack.bluebook.responder import UpdateRequest
from mailstack.bluebook.server import BlueBookServer
from mailstack.bluebook.zonestore import IN, ZoneStore, parse_rdata, to_name

HOST = "127.0.3.1"
KEY_NAME = "update-key"
SECRET = base64.b64encode(b"k" * 32).decode()
KEYRING = dns.tsigkeyring.from_text({KEY_NAME: SECRET})
WRONG_KEYRING = dns.tsigkeyring.from_text({KEY_NAME: base64.b64encode(b"x" * 32).decode()})
UNKNOWN_KEYRING = dns.tsigkeyring.from_text({"stranger": SECRET})
TIMEOUT = 3.0

needs_dig = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (bind9-dnsutils) is not installed")
needs_nsupdate = pytest.mark.skipif(shutil.which("nsupdate") is None, reason="nsupdate (bind9-dnsutils) is not installed")


class Running:
    def __init__(self, server: BlueBookServer, store: ZoneStore) -> None:
        self.server = server
        self.store = store
        self.host, self.port = server.addresses[0]

    async def udp(self, query: dns.message.Message, **kw) -> dns.message.Message:
        return await dns.asyncquery.udp(query, self.host, port=self.port, timeout=TIMEOUT, **kw)

    async def tcp(self, query: dns.message.Message, **kw) -> dns.message.Message:
        return await dns.asyncquery.tcp(query, self.host, port=self.port, timeout=TIMEOUT, **kw)

    async def serial(self, zone: str = "here.test") -> int:
        return (await self.store.zone(zone)).serial


def make_config(tmp_path, **server_options) -> BlueBookConfig:
    server = {"listen": [HOST], "port": 0, "data_dir": str(tmp_path), "reload_interval": 0.05}
    server.update(server_options)
    return config_module.load(
        BlueBookConfig,
        environ={},
        overrides={"server": server, "keys": {"tsig": [f"{KEY_NAME}:{SECRET}"]}},
    )


async def start(tmp_path, **server_options):
    config = make_config(tmp_path, **server_options)
    store = await ZoneStore.open(config.database_url)
    spec = mailzone.MailDomain(
        domain=to_name("here.test"), mx=[(10, to_name("mx.here.test"))], addresses=["127.0.1.10", "::1"]
    )
    await store.create_zone(mailzone.build_zone(spec, config.zone, config.server.listen))
    server = BlueBookServer(config, store)
    await server.start()
    return Running(server, store)


@pytest.fixture
async def bluebook(tmp_path):
    running = await start(tmp_path)
    yield running
    await running.server.stop()
    await running.store.close()


class UDPClient(asyncio.DatagramProtocol):
    """A raw UDP socket that queues every datagram it receives."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr) -> None:
        self.replies.put_nowait(data)


@pytest.fixture
async def raw_udp(bluebook):
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(UDPClient, remote_addr=(bluebook.host, bluebook.port))

    async def exchange(*packets: bytes) -> bytes:
        for packet in packets:
            transport.sendto(packet)
        return await asyncio.wait_for(client.replies.get(), TIMEOUT)

    exchange.client = client
    yield exchange
    transport.close()


def query_bytes(name: str, rdtype: str, *, query_id: int = 0x1234, edns: int = -1, payload: int = 1232) -> bytes:
    message = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload)
    message.id = query_id
    message.flags = 0
    return message.to_wire()


async def run_tool(*argv: str, stdin: bytes | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(stdin), 20)
    return process.returncode, output.decode()


# Answers ------------------------------------------------------------------------------


async def test_mx_answer_is_authoritative(bluebook):
    response = await bluebook.udp(dns.message.make_query("here.test", "MX"))
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert not response.flags & dns.flags.RA
    assert [r.to_text() for r in response.answer[0]] == ["10 mx.here.test."]
    additional = {(rrset.name.to_text(), rrset.rdtype) for rrset in response.additional}
    assert ("mx.here.test.", dns.rdatatype.A) in additional
    assert ("mx.here.test.", dns.rdatatype.AAAA) in additional


async def test_resolver_finds_mail_records(bluebook):
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [bluebook.host]
    resolver.port = bluebook.port
    mx = await resolver.resolve("here.test", "MX")
    assert mx[0].exchange == to_name("mx.here.test")
    address = await resolver.resolve("mx.here.test", "A")
    assert address[0].address == "127.0.1.10"
    address6 = await resolver.resolve("mx.here.test", "AAAA")
    assert address6[0].address == "::1"
    srv = {}
    for label in ("_submission._tcp", "_submissions._tcp", "_imap._tcp", "_imaps._tcp"):
        answer = await resolver.resolve(f"{label}.here.test", "SRV")
        srv[label] = (answer[0].port, answer[0].target.to_text())
    assert srv == {
        "_submission._tcp": (587, "mx.here.test."),
        "_submissions._tcp": (465, "mx.here.test."),
        "_imap._tcp": (143, "mx.here.test."),
        "_imaps._tcp": (993, "mx.here.test."),
    }
    txt = await resolver.resolve("here.test", "TXT")
    assert [b"".join(r.strings) for r in txt] == [b"v=spf1 mx -all"]
    ns = await resolver.resolve("here.test", "NS")
    assert ns[0].target == to_name("ns.here.test")
    ns_address = await resolver.resolve("ns.here.test", "A")
    assert ns_address[0].address == HOST


async def test_question_case_echoed(bluebook, raw_udp):
    sent = query_bytes("HeRe.TeSt", "MX", query_id=1)
    first = await raw_udp(sent)
    # The second, differently cased query is answered from the wire cache.
    sent_again = query_bytes("hErE.tEsT", "MX", query_id=2)
    second = await raw_udp(sent_again)
    question_end = 12 + len(b"\x04HeRe\x04TeSt\x00") + 4
    assert first[12:question_end] == sent[12:question_end]
    assert second[12:question_end] == sent_again[12:question_end]
    assert second[:2] == b"\x00\x02"
    parsed = dns.message.from_wire(second)
    assert parsed.answer[0][0].exchange == to_name("mx.here.test")


async def test_cached_answer_copies_rd_flag(bluebook, raw_udp):
    plain = query_bytes("here.test", "A", query_id=7)
    with_rd = bytearray(plain)
    with_rd[2] |= 0x01
    with_rd[1] = 8
    first = await raw_udp(plain)
    second = await raw_udp(bytes(with_rd))
    assert not first[2] & 0x01
    assert second[2] & 0x01
    assert not second[3] & 0x80  # RA stays clear


async def test_outside_zones_refused(bluebook):
    response = await bluebook.udp(dns.message.make_query("example.com", "A"))
    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.AA
    assert not response.flags & dns.flags.RA
    assert response.answer == []


async def test_missing_name_nxdomain_with_soa(bluebook):
    response = await bluebook.udp(dns.message.make_query("nobody.here.test", "A"))
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    assert response.answer == []
    soa = response.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == to_name("here.test")
    assert soa.ttl == min(soa.ttl, soa[0].minimum)


async def test_missing_type_nodata_with_soa(bluebook):
    response = await bluebook.udp(dns.message.make_query("mx.here.test", "TXT"))
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert response.authority[0].rdtype == dns.rdatatype.SOA


async def test_empty_non_terminal_is_nodata(bluebook):
    response = await bluebook.udp(dns.message.make_query("_tcp.here.test", "SRV"))
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert response.authority[0].rdtype == dns.rdatatype.SOA


async def test_unknown_qtype_is_nodata(bluebook, raw_udp):
    # QTYPE 65280 (private use) at the apex.
    packet = b"\x00\x0b\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04here\x04test\x00\xff\x00\x00\x01"
    response = dns.message.from_wire(await raw_udp(packet))
    assert response.id == 0x0B
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert response.authority[0].rdtype == dns.rdatatype.SOA


async def test_any_gets_rfc8482_answer(bluebook, raw_udp):
    packet = b"\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04here\x04test\x00\x00\xff\x00\x01"
    response = dns.message.from_wire(await raw_udp(packet))
    assert response.rcode() == dns.rcode.NOERROR
    assert len(response.answer) == 1
    assert response.answer[0].rdtype == dns.rdatatype.HINFO
    assert response.answer[0][0].cpu == b"RFC8482"


async def test_cname_wildcard_and_delegation(bluebook):
    def change(content):
        for name, rdtype, text in (
            ("www.here.test", "CNAME", "mx.here.test."),
            ("*.wild.here.test", "A", "192.0.2.7"),
            ("sub.here.test", "NS", "ns.sub.here.test."),
            ("ns.sub.here.test", "A", "192.0.2.53"),
        ):
            content.put(to_name(name), dns.rdataset.from_rdata(300, parse_rdata(rdtype, text)))

    await bluebook.store.modify_zone("here.test", change)
    await bluebook.server.reload()

    cname = await bluebook.udp(dns.message.make_query("www.here.test", "A"))
    assert [rrset.rdtype for rrset in cname.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert cname.answer[1][0].address == "127.0.1.10"

    wild = await bluebook.udp(dns.message.make_query("anything.wild.here.test", "A"))
    assert wild.answer[0].name == to_name("anything.wild.here.test")
    assert wild.answer[0][0].address == "192.0.2.7"

    referral = await bluebook.udp(dns.message.make_query("host.sub.here.test", "A"))
    assert referral.rcode() == dns.rcode.NOERROR
    assert not referral.flags & dns.flags.AA
    assert referral.authority[0].rdtype == dns.rdatatype.NS
    assert referral.additional[0][0].address == "192.0.2.53"


async def test_tcp_several_queries_one_connection(bluebook):
    reader, writer = await asyncio.open_connection(bluebook.host, bluebook.port)
    names = ["here.test", "mx.here.test", "nobody.here.test"]
    for index, name in enumerate(names):
        wire = query_bytes(name, "A", query_id=100 + index)
        writer.write(struct.pack("!H", len(wire)) + wire)
    await writer.drain()
    replies = []
    for _ in names:
        (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))
        replies.append(dns.message.from_wire(await reader.readexactly(length)))
    writer.close()
    assert [reply.id for reply in replies] == [100, 101, 102]
    assert [reply.rcode() for reply in replies] == [dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.NXDOMAIN]


# EDNS and truncation -------------------------------------------------------------------


async def add_big_txt(bluebook, count: int = 15) -> None:
    def change(content):
        rdataset = dns.rdataset.Rdataset(IN, dns.rdatatype.TXT, ttl=300)
        for index in range(count):
            rdataset.add(parse_rdata("TXT", f'"{index:03d}-' + "x" * 190 + '"'))
        content.put(to_name("big.here.test"), rdataset)

    await bluebook.store.modify_zone("here.test", change)
    await bluebook.server.reload()


async def test_edns_opt_answered(bluebook):
    response = await bluebook.udp(dns.message.make_query("here.test", "MX", use_edns=0, payload=1232))
    assert response.edns == 0
    assert response.payload == 4096
    plain = await bluebook.udp(dns.message.make_query("here.test", "MX", use_edns=False))
    assert plain.edns == -1


async def test_edns_version_1_badvers(bluebook, raw_udp):
    question = b"\x04here\x04test\x00\x00\x0f\x00\x01"
    # OPT: root name, type 41, payload 1232, extended rcode 0, version 1, no flags, no data.
    opt = b"\x00\x00\x29\x04\xd0\x00\x01\x00\x00\x00\x00"
    packet = b"\x00\x0d\x00\x00\x00\x01\x00\x00\x00\x00\x00\x01" + question + opt
    response = dns.message.from_wire(await raw_udp(packet))
    assert response.rcode() == dns.rcode.BADVERS
    assert response.edns == 0


async def test_udp_truncation_without_edns(bluebook, raw_udp):
    await add_big_txt(bluebook)
    wire = await raw_udp(query_bytes("big.here.test", "TXT"))
    assert len(wire) <= 512
    assert wire[2] & 0x02  # TC
    parsed = dns.message.from_wire(wire)  # counts agree with the records present
    assert parsed.flags & dns.flags.TC
    full = await bluebook.tcp(dns.message.make_query("big.here.test", "TXT"))
    assert not full.flags & dns.flags.TC
    assert len(full.answer[0]) == 15


async def test_udp_payload_size_honoured(bluebook, raw_udp):
    await add_big_txt(bluebook)
    small = await raw_udp(query_bytes("big.here.test", "TXT", edns=0, payload=1232, query_id=1))
    assert len(small) <= 1232
    assert small[2] & 0x02
    large = await raw_udp(query_bytes("big.here.test", "TXT", edns=0, payload=8192, query_id=2))
    assert not large[2] & 0x02
    assert len(large) > 1232
    assert len(dns.message.from_wire(large).answer[0]) == 15
    # A payload below 512 counts as 512: an answer of more than 100 bytes comes whole.
    tiny = await raw_udp(query_bytes("here.test", "MX", edns=0, payload=100, query_id=3))
    assert 100 < len(tiny) <= 512
    assert not tiny[2] & 0x02


# Bad input ----------------------------------------------------------------------------------


async def test_short_packet_dropped(bluebook, raw_udp):
    good = query_bytes("here.test", "MX", query_id=0x0BBB)
    reply = await raw_udp(b"\x12\x34\x00\x00\x00\x01\x00\x00\x00\x00\x00", good)
    assert reply[:2] == b"\x0b\xbb"
    assert raw_udp.client.replies.empty()


async def test_response_packet_ignored(bluebook, raw_udp):
    response_bit = bytearray(query_bytes("here.test", "MX", query_id=0x0AAA))
    response_bit[2] |= 0x80
    good = query_bytes("here.test", "MX", query_id=0x0BBB)
    reply = await raw_udp(bytes(response_bit), good)
    assert reply[:2] == b"\x0b\xbb"


async def test_garbage_gets_formerr(bluebook, raw_udp):
    # A header claiming one question followed by a label that runs past the end.
    reply = await raw_udp(b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc")
    assert reply[:2] == b"\xab\xcd"
    assert reply[2] & 0x80
    assert reply[3] & 0x0F == dns.rcode.FORMERR


async def test_qdcount_zero_formerr(bluebook, raw_udp):
    reply = await raw_udp(b"\x00\x07\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    assert reply[:2] == b"\x00\x07"
    assert reply[3] & 0x0F == dns.rcode.FORMERR


async def test_qdcount_two_formerr(bluebook, raw_udp):
    question = b"\x04here\x04test\x00\x00\x0f\x00\x01"
    packet = b"\x00\x08\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00" + question + question
    reply = await raw_udp(packet)
    assert reply[:2] == b"\x00\x08"
    assert reply[3] & 0x0F == dns.rcode.FORMERR


async def test_unknown_opcode_notimp(bluebook, raw_udp):
    # Opcode 2 (STATUS): flags byte 0x10.
    packet = b"\x00\x09\x10\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04here\x04test\x00\x00\x01\x00\x01"
    reply = await raw_udp(packet)
    assert reply[:2] == b"\x00\x09"
    assert (reply[2] >> 3) & 0x0F == 2
    assert reply[3] & 0x0F == dns.rcode.NOTIMP


async def test_notify_opcode_notimp(bluebook):
    notify = dns.message.make_query("here.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    response = await bluebook.udp(notify)
    assert response.rcode() == dns.rcode.NOTIMP


async def test_opt_qtype_formerr(bluebook, raw_udp):
    packet = b"\x00\x0a\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04here\x04test\x00\x00\x29\x00\x01"
    reply = await raw_udp(packet)
    assert reply[3] & 0x0F == dns.rcode.FORMERR


async def test_bad_input_logged_rate_limited(bluebook, raw_udp, caplog):
    caplog.set_level(logging.WARNING, logger="mailstack.bluebook.responder")
    bad = b"\x00\x07\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    for _ in range(40):
        await raw_udp(bad)
    lines = [r.getMessage() for r in caplog.records if r.name == "mailstack.bluebook.responder"]
    assert 1 <= len(lines) <= 20
    assert "127.0.0.1" in lines[0] or HOST in lines[0]
    reply = await raw_udp(query_bytes("here.test", "MX", query_id=0x0CCC))
    assert reply[:2] == b"\x0c\xcc"
    assert reply[3] & 0x0F == dns.rcode.NOERROR


async def test_server_survives_fuzzed_packets(bluebook, raw_udp):
    import random

    generator = random.Random(1035)
    base = query_bytes("here.test", "MX", edns=0)
    for _ in range(300):
        packet = bytearray(base)
        for _flip in range(generator.randint(1, 6)):
            packet[generator.randrange(2, len(packet))] = generator.randrange(256)
        result = bluebook.server.handle(bytes(packet), ("127.0.0.1", 1), tcp=False)
        assert result is None or isinstance(result, (bytes, UpdateRequest))
    reply = await raw_udp(query_bytes("here.test", "MX", query_id=0x0DDD))
    assert reply[:2] == b"\x0d\xdd"


# Changes -----------------------------------------------------------------------------------


async def test_store_change_served_within_one_second(bluebook):
    old_serial = await bluebook.serial()

    def change(content):
        content.put(to_name("late.here.test"), dns.rdataset.from_text(IN, "A", 300, "192.0.2.99"))

    loop = asyncio.get_running_loop()
    await bluebook.store.modify_zone("here.test", change)
    started = loop.time()
    while True:
        response = await bluebook.udp(dns.message.make_query("late.here.test", "A"))
        if response.answer:
            break
        assert loop.time() - started < 1.0
        await asyncio.sleep(0.02)
    soa = await bluebook.udp(dns.message.make_query("here.test", "SOA"))
    assert soa.answer[0][0].serial == old_serial + 1


# DNS UPDATE ------------------------------------------------------------------------------------


def signed_update(keyring=KEYRING, zone: str = "here.test") -> dns.update.UpdateMessage:
    return dns.update.UpdateMessage(zone, keyring=keyring, keyname=list(keyring)[0], keyalgorithm=dns.tsig.HMAC_SHA256)


async def test_update_adds_records_atomically(bluebook):
    old_serial = await bluebook.serial()
    message = signed_update()
    message.add("app.here.test.", 120, "A", "192.0.2.10")
    message.add("app.here.test.", 120, "AAAA", "2001:db8::10")
    response = await bluebook.tcp(message)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.had_tsig
    assert await bluebook.serial() == old_serial + 1
    answer = await bluebook.udp(dns.message.make_query("app.here.test", "AAAA"))
    assert answer.answer[0][0].address == "2001:db8::10"


async def test_update_prerequisite_failure_changes_nothing(bluebook):
    old_serial = await bluebook.serial()
    message = signed_update()
    message.absent("mx.here.test.")  # the name exists, so this fails with YXDOMAIN
    message.add("blocked.here.test.", 120, "A", "192.0.2.11")
    response = await dns.asyncquery.udp(message, bluebook.host, port=bluebook.port, timeout=TIMEOUT)
    assert response.rcode() == dns.rcode.YXDOMAIN
    assert await bluebook.serial() == old_serial
    answer = await bluebook.udp(dns.message.make_query("blocked.here.test", "A"))
    assert answer.rcode() == dns.rcode.NXDOMAIN


async def test_update_rrset_prerequisite_value(bluebook):
    message = signed_update()
    message.present("mx.here.test.", dns.rdataset.from_text(IN, "A", 0, "127.0.1.99"))
    message.delete("mx.here.test.", "A")
    response = await dns.asyncquery.udp(message, bluebook.host, port=bluebook.port, timeout=TIMEOUT)
    assert response.rcode() == dns.rcode.NXRRSET
    matching = signed_update()
    matching.present("mx.here.test.", dns.rdataset.from_text(IN, "A", 0, "127.0.1.10"))
    matching.replace("mx.here.test.", 60, "A", "127.0.1.20")
    response = await dns.asyncquery.udp(matching, bluebook.host, port=bluebook.port, timeout=TIMEOUT)
    assert response.rcode() == dns.rcode.NOERROR
    answer = await bluebook.udp(dns.message.make_query("mx.here.test", "A"))
    assert [r.address for r in answer.answer[0]] == ["127.0.1.20"]


async def test_update_deletes_keep_apex_soa_and_ns(bluebook):
    message = signed_update()
    message.delete("here.test.")  # all RRsets at the apex but SOA and NS
    message.delete("here.test.", "NS", "ns.here.test.")  # the last NS stays
    message.delete("_imap._tcp.here.test.", "SRV")
    response = await dns.asyncquery.udp(message, bluebook.host, port=bluebook.port, timeout=TIMEOUT)
    assert response.rcode() == dns.rcode.NOERROR
    content = await bluebook.store.zone("here.test")
    assert content.get(to_name("here.test"), dns.rdatatype.MX) is None
    assert len(content.get(to_name("here.test"), dns.rdatatype.NS)) == 1
    assert content.get(to_name("here.test"), dns.rdatatype.SOA) is not None
    assert content.get(to_name("_imap._tcp.here.test"), dns.rdatatype.SRV) is None


async def test_update_unsigned_refused(bluebook):
    old_serial = await bluebook.serial()
    message = dns.update.UpdateMessage("here.test")
    message.add("evil.here.test.", 60, "A", "192.0.2.66")
    response = await dns.asyncquery.udp(message, bluebook.host, port=bluebook.port, timeout=TIMEOUT)
    assert response.rcode() == dns.rcode.REFUSED
    assert await bluebook.serial() == old_serial


async def test_update_wrong_secret_notauth(bluebook, raw_udp):
    old_serial = await bluebook.serial()
    message = signed_update(WRONG_KEYRING)
    message.add("evil.here.test.", 60, "A", "192.0.2.66")
    reply = await raw_udp(message.to_wire())
    parsed = dns.message.from_wire(reply, keyring=False)
    assert parsed.rcode() == dns.rcode.NOTAUTH
    assert parsed.tsig_error == dns.rcode.BADSIG
    assert parsed.mac == b""
    assert await bluebook.serial() == old_serial


async def test_update_unknown_key_notauth(bluebook, raw_udp):
    message = signed_update(UNKNOWN_KEYRING)
    message.add("evil.here.test.", 60, "A", "192.0.2.66")
    parsed = dns.message.from_wire(await raw_udp(message.to_wire()), keyring=False)
    assert parsed.rcode() == dns.rcode.NOTAUTH
    assert parsed.tsig_error == dns.rcode.BADKEY


async def test_update_other_zone_notauth(bluebook):
    message = signed_update(zone="elsewhere.test")
    message.add("a.elsewhere.test.", 60, "A", "192.0.2.1")
    response = await dns.asyncquery.udp(message, bluebook.host, port=bluebook.port, timeout=TIMEOUT)
    assert response.rcode() == dns.rcode.NOTAUTH


async def test_update_name_outside_zone_notzone(bluebook):
    old_serial = await bluebook.serial()
    message = signed_update()
    message.add("a.elsewhere.test.", 60, "A", "192.0.2.1")
    response = await dns.asyncquery.udp(message, bluebook.host, port=bluebook.port, timeout=TIMEOUT)
    assert response.rcode() == dns.rcode.NOTZONE
    assert await bluebook.serial() == old_serial


async def test_update_with_stored_key(bluebook):
    info = await bluebook.store.add_key("stored-key")
    await bluebook.server.reload()
    keyring = dns.tsigkeyring.from_text({"stored-key": info.secret})
    message = signed_update(keyring)
    message.add("stored.here.test.", 60, "TXT", '"made with a stored key"')
    response = await dns.asyncquery.udp(message, bluebook.host, port=bluebook.port, timeout=TIMEOUT)
    assert response.rcode() == dns.rcode.NOERROR


@needs_nsupdate
async def test_nsupdate_tool(bluebook):
    script = (
        f"server {bluebook.host} {bluebook.port}\nzone here.test\n"
        "update add tool.here.test 60 A 192.0.2.77\nsend\n"
    ).encode()
    code, output = await run_tool("nsupdate", "-y", f"hmac-sha256:{KEY_NAME}:{SECRET}", stdin=script)
    assert code == 0, output
    answer = await bluebook.udp(dns.message.make_query("tool.here.test", "A"))
    assert answer.answer[0][0].address == "192.0.2.77"
    code, output = await run_tool("nsupdate", stdin=script)
    assert code != 0
    assert "REFUSED" in output


# Zone transfer -------------------------------------------------------------------------------


async def test_axfr_signed_with_many_messages(bluebook):
    def change(content):
        for index in range(150):
            content.put(to_name(f"host{index}.here.test"), dns.rdataset.from_text(IN, "A", 300, f"192.0.2.{index}"))

    await bluebook.store.modify_zone("here.test", change)
    await bluebook.server.reload()
    zone = dns.zone.Zone("here.test")
    query = dns.message.make_query("here.test", "AXFR")
    query.use_tsig(KEYRING, KEY_NAME)
    # inbound_xfr checks the TSIG of every message and the SOA at both ends.
    await dns.asyncquery.inbound_xfr(bluebook.host, zone, query=query, port=bluebook.port, timeout=TIMEOUT)
    assert zone.get_rdataset("host149", "A")[0].address == "192.0.2.149"
    assert zone.get_rdataset("@", "SOA")[0].serial == await bluebook.serial()
    assert len(bluebook.server.responder.transfer_messages(query, bluebook.server.responder.directory.zones[to_name("here.test")])) > 1


async def test_axfr_unsigned_refused(bluebook):
    response = await bluebook.tcp(dns.message.make_query("here.test", "AXFR"))
    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == []


async def test_axfr_over_udp_refused(bluebook):
    query = dns.message.make_query("here.test", "AXFR")
    query.use_tsig(KEYRING, KEY_NAME)
    response = await bluebook.udp(query)
    assert response.rcode() == dns.rcode.REFUSED


async def test_axfr_allow_listed_client(tmp_path):
    running = await start(tmp_path, axfr_allow=["127.0.0.0/8"])
    try:
        zone = dns.zone.Zone("here.test")
        await dns.asyncquery.inbound_xfr(running.host, zone, port=running.port, timeout=TIMEOUT)
        assert zone.get_rdataset("@", "MX")[0].exchange.derelativize(zone.origin) == to_name("mx.here.test")
    finally:
        await running.server.stop()
        await running.store.close()


@needs_dig
async def test_dig_query_and_axfr(bluebook):
    code, output = await run_tool("dig", "+norec", f"@{bluebook.host}", "-p", str(bluebook.port), "HERE.test", "MX")
    assert code == 0
    assert "status: NOERROR" in output
    assert "flags: qr aa;" in output
    assert "HERE.test." in output
    code, output = await run_tool("dig", "+tcp", f"@{bluebook.host}", "-p", str(bluebook.port), "nobody.here.test", "A")
    assert "status: NXDOMAIN" in output
    code, output = await run_tool(
        "dig", f"@{bluebook.host}", "-p", str(bluebook.port), "here.test", "AXFR", "-y", f"hmac-sha256:{KEY_NAME}:{SECRET}"
    )
    assert code == 0
    assert output.count("\tSOA\t") == 2, output
    assert "_submission._tcp.here.test." in output
    code, output = await run_tool("dig", f"@{bluebook.host}", "-p", str(bluebook.port), "here.test", "AXFR")
    assert "Transfer failed" in output


# TCP limits -------------------------------------------------------------------------------------


async def test_tcp_idle_timeout_and_connection_limit(tmp_path):
    running = await start(tmp_path, tcp_idle_timeout=0.3, tcp_max_connections=2)
    try:
        first = await asyncio.open_connection(running.host, running.port)
        second = await asyncio.open_connection(running.host, running.port)
        wire = query_bytes("here.test", "MX", query_id=5)
        second[1].write(struct.pack("!H", len(wire)) + wire)
        await second[1].drain()
        await asyncio.wait_for(second[0].readexactly(2), TIMEOUT)
        third_reader, third_writer = await asyncio.open_connection(running.host, running.port)
        assert await asyncio.wait_for(third_reader.read(), TIMEOUT) == b""  # closed at once
        third_writer.close()
        # The idle connection is closed by the server after tcp_idle_timeout.
        assert await asyncio.wait_for(first[0].read(), TIMEOUT) == b""
        first[1].close()
        second[1].close()
    finally:
        await running.server.stop()
        await running.store.close()


async def test_update_stale_time_badtime(bluebook, raw_udp, monkeypatch):
    old_serial = await bluebook.serial()
    message = signed_update()
    message.add("late.here.test.", 60, "A", "192.0.2.66")

    class Clock:
        @staticmethod
        def time() -> float:
            return 1_000_000.0  # far outside the 300 s fudge

    with monkeypatch.context() as patch:
        patch.setattr(dns.message, "time", Clock)
        wire = message.to_wire()
    parsed = dns.message.from_wire(await raw_udp(wire), keyring=False)
    assert parsed.rcode() == dns.rcode.NOTAUTH
    assert parsed.tsig_error == dns.rcode.BADTIME
    assert await bluebook.serial() == old_serial


async def test_update_wrong_algorithm_badkey(bluebook, raw_udp):
    keyring = {dns.name.from_text(KEY_NAME): dns.tsig.Key(KEY_NAME, SECRET, dns.tsig.HMAC_SHA512)}
    message = dns.update.UpdateMessage("here.test", keyring=keyring)
    message.add("evil.here.test.", 60, "A", "192.0.2.66")
    parsed = dns.message.from_wire(await raw_udp(message.to_wire()), keyring=False)
    assert parsed.rcode() == dns.rcode.NOTAUTH
    assert parsed.tsig_error == dns.rcode.BADKEY


async def test_ixfr_gets_whole_zone_or_soa(bluebook):
    query = dns.message.make_query("here.test", "IXFR")
    query.authority.append(dns.rrset.from_text("here.test.", 0, "IN", "SOA", ". . 1 0 0 0 0"))
    query.use_tsig(KEYRING, KEY_NAME)
    over_udp = await bluebook.udp(query)
    assert [rrset.rdtype for rrset in over_udp.answer] == [dns.rdatatype.SOA]
    over_tcp = await bluebook.tcp(query, one_rr_per_rrset=True)
    types = [rrset.rdtype for rrset in over_tcp.answer]
    assert types[0] == dns.rdatatype.SOA
    assert types[-1] == dns.rdatatype.SOA
    assert dns.rdatatype.MX in types


# NOTIFY to secondaries ---------------------------------------------------------------------------


class Secondary(asyncio.DatagramProtocol):
    """A stand-in secondary that records NOTIFY messages and acknowledges them."""

    def __init__(self) -> None:
        self.notifies: asyncio.Queue[dns.message.Message] = asyncio.Queue()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        message = dns.message.from_wire(data)
        self.notifies.put_nowait(message)
        self.transport.sendto(dns.message.make_response(message).to_wire(), addr)


async def test_change_sends_notify_to_secondary(tmp_path):
    loop = asyncio.get_running_loop()
    transport, secondary = await loop.create_datagram_endpoint(Secondary, local_addr=("127.0.3.9", 0))
    port = transport.get_extra_info("sockname")[1]
    running = await start(tmp_path, notify=[f"127.0.3.9:{port}"])
    try:
        assert secondary.notifies.empty()  # the first load sends none

        def change(content):
            content.put(to_name("notified.here.test"), dns.rdataset.from_text(IN, "A", 300, "192.0.2.8"))

        _result, _changed, new_serial = await running.store.modify_zone("here.test", change)
        notify = await asyncio.wait_for(secondary.notifies.get(), TIMEOUT)
        assert notify.opcode() == dns.opcode.NOTIFY
        assert notify.flags & dns.flags.AA
        assert notify.question[0].name == to_name("here.test")
        assert notify.question[0].rdtype == dns.rdatatype.SOA
        assert notify.answer[0][0].serial == new_serial
    finally:
        await running.server.stop()
        await running.store.close()
        transport.close()


async def test_ipv4_and_ipv6_listeners(tmp_path):
    running = await start(tmp_path, listen=["127.0.3.4", "::1"])
    try:
        assert [host for host, _port in running.server.addresses] == ["127.0.3.4", "::1"]
        for host, port in running.server.addresses:
            query = dns.message.make_query("here.test", "MX")
            over_udp = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
            assert over_udp.answer[0][0].exchange == to_name("mx.here.test")
            over_tcp = await dns.asyncquery.tcp(query, host, port=port, timeout=TIMEOUT)
            assert over_tcp.answer[0][0].exchange == to_name("mx.here.test")
    finally:
        await running.server.stop()
        await running.store.close()


async def test_axfr_splits_huge_rrset(bluebook):
    def change(content):
        rdataset = dns.rdataset.Rdataset(IN, dns.rdatatype.TXT, ttl=300)
        for index in range(4000):
            rdataset.add(parse_rdata("TXT", f'"record {index:05d} of a very large RRset"'))
        content.put(to_name("huge.here.test"), rdataset)

    await bluebook.store.modify_zone("here.test", change)
    await bluebook.server.reload()
    query = dns.message.make_query("here.test", "AXFR")
    query.use_tsig(KEYRING, KEY_NAME)
    zone = dns.zone.Zone("here.test")
    await dns.asyncquery.inbound_xfr(bluebook.host, zone, query=query, port=bluebook.port, timeout=TIMEOUT)
    assert len(zone.get_rdataset("huge", "TXT")) == 4000
