"""Test servers for the transfer tests: an authoritative DNS responder and an SMTP peer.

The DNS responder answers from a dict of records over UDP and TCP on
loopback, with the NXDOMAIN, NODATA and SERVFAIL cases the resolver must
tell apart. The SMTP peer is a plain aiosmtpd server that records what it
accepts and can refuse recipients or stall at chosen points.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from aiosmtpd.controller import Controller

SOA = "ns.test. hostmaster.test. 1 3600 600 86400 60"


class DNSResponder:
    """An authoritative server for every name under ``zone``, on loopback UDP and TCP.

    ``records`` maps a lower-case name to {type name: [rdata text]}; a name
    missing from it is NXDOMAIN, and a name in ``servfail`` gets SERVFAIL.
    """

    def __init__(self, host: str, zone: str = "test", ttl: int = 300) -> None:
        self.host = host
        self.zone = dns.name.from_text(zone)
        self.ttl = ttl
        self.records: dict[str, dict[str, list[str]]] = {}
        self.servfail: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.port = 0
        self._transport = None
        self._server = None

    def add(self, name: str, rdtype: str, *values: str) -> None:
        self.records.setdefault(name.lower().rstrip("."), {}).setdefault(rdtype, []).extend(values)

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            response.flags &= ~dns.flags.AA
            return response.to_wire()
        if not question.name.is_subdomain(self.zone):
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        found = self.records.get(name)
        if found is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif rdtype in found:
            response.answer.append(
                dns.rrset.from_text_list(question.name, self.ttl, dns.rdataclass.IN, rdtype, found[rdtype])
            )
        if not response.answer:
            response.authority.append(dns.rrset.from_text(self.zone, self.ttl, dns.rdataclass.IN, "SOA", SOA))
        return response.to_wire()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        responder = self

        class UDP(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                self.transport.sendto(responder.answer(data), addr)

        self._transport, _ = await loop.create_datagram_endpoint(UDP, local_addr=(self.host, 0))
        self.port = self._transport.get_extra_info("sockname")[1]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                    reply = responder.answer(await reader.readexactly(length))
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(tcp, self.host, self.port)

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    connection: int = 0  # identifies the SMTP connection that carried the message


@dataclass
class PeerHandler:
    """An aiosmtpd handler that accepts mail for ``domain`` and records it.

    ``unknown`` recipients get 550 5.1.1 and ``busy`` ones 450 4.2.1. When
    ``stall_rcpt`` is set, RCPT waits for ``release`` before answering. The
    server runs in the Controller's thread, so the events are threading ones.
    """

    domain: str
    unknown: set[str] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)
    received: list[Received] = field(default_factory=list)
    mail_reply: str | None = None
    data_reply: str | None = None
    data_delay: float = 0.0
    active: int = 0
    max_active: int = 0
    tls_sessions: int = 0
    stall_rcpt: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)
    transports: list = field(default_factory=list)
    drop_next_mail: bool = False
    max_recipients: int = 0  # 0: no limit; above it RCPT gets 452 4.5.3

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.drop_next_mail:
            # A peer that ends an idle session just as the client starts a transaction.
            self.drop_next_mail = False
            server.transport.close()
            return "421 4.4.2 closing"
        if self.mail_reply:
            return self.mail_reply
        self.active += 1
        session.counted = True
        self.max_active = max(self.max_active, self.active)
        if session.ssl is not None:
            self.tls_sessions += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RSET(self, server, session, envelope):
        self._end_transaction(session)
        return "250 2.0.0 OK"

    def _end_transaction(self, session) -> None:
        if getattr(session, "counted", False):
            session.counted = False
            self.active -= 1

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.stall_rcpt:
            self.stalled.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
        if not address.lower().endswith("@" + self.domain):
            return "554 5.7.1 Relay access denied"
        if address in self.unknown:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if address in self.busy:
            return "450 4.2.1 Mailbox busy, try again later"
        if self.max_recipients and len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_delay:
            # A slow peer: keeps the transaction open so that concurrency can be counted.
            await asyncio.sleep(self.data_delay)
        self._end_transaction(session)
        if self.data_reply:
            return self.data_reply
        self.received.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, id(server))
        )
        self.transports.append(server.transport)
        self.arrived.set()
        return "250 2.0.0 Ok: queued"


class Peer:
    """An aiosmtpd SMTP server on ``host``:``port`` with a PeerHandler."""

    def __init__(
        self,
        host: str,
        domain: str,
        port: int = 25,
        *,
        tls_context=None,
        smtputf8: bool = True,
        **handler_options,
    ) -> None:
        self.handler = PeerHandler(domain, **handler_options)
        self.controller = Controller(
            self.handler,
            hostname=host,
            port=port,
            server_hostname=f"mx.{domain}",
            decode_data=False,
            enable_SMTPUTF8=smtputf8,
            ready_timeout=10,
            tls_context=tls_context,
        )

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.handler.release.set()
        self.controller.stop()

    def drop_connections(self) -> None:
        """Close every connection that carried a message, from the server side, and wait until done."""
        done = threading.Event()

        def close_all() -> None:
            for transport in self.handler.transports:
                transport.close()
            done.set()

        self.controller.loop.call_soon_threadsafe(close_all)
        assert done.wait(10)

    def recipients(self) -> list[str]:
        return [r for message in self.handler.received for r in message.recipients]
