"""Wire-level query handling, free of I/O: bytes in, reply bytes (or a request for async work) out.

Two paths answer a query. The fast path reads only the header, the question
and an OPT record, looks the lower-cased question, the RD bit, the transport
and the EDNS state up in a cache of prebuilt wire answers, and patches the ID
and the question (so its case is echoed exactly) into a copy. Everything else
goes through the full path: dnspython parses the message, TSIG is verified, and
the answer is built with dnspython objects. A full-path answer that depends
only on the cache key is stored for the fast path. The server replaces the
:class:`Directory` after every change, which empties the cache.

Bad input rules, in the order they apply:

* fewer than 12 bytes (no complete header): dropped;
* QR=1 (a response sent to us): dropped;
* unparseable, or a QUERY whose QDCOUNT is not 1: FORMERR, header only;
* an opcode other than QUERY and UPDATE: NOTIMP;
* an EDNS version other than 0: BADVERS (RFC 6891 section 6.1.3);
* a TSIG with an unknown key, a wrong MAC or a time outside the fudge:
  NOTAUTH with the TSIG error BADKEY, BADSIG or BADTIME, unsigned
  (RFC 8945 section 5.2).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.renderer
import dns.rrset
import dns.tsig
import dns.update

from mailstack.bluebook.directory import Directory, Zone
from mailstack.bluebook.zonestore import KeyInfo

log = logging.getLogger(__name__)

RT = dns.rdatatype
HEADER_SIZE = 12
TCP_MAX = 65535
# RRsets per message of a zone transfer; each message stays far below 64 KiB for ordinary records.
TRANSFER_RRSETS_PER_MESSAGE = 64
EDNS_OPTION_PADDING = 12
# Question types answered NOTIMP: obsolete mail meta-types and key exchange.
UNSUPPORTED_QTYPES = frozenset({RT.MAILA, RT.MAILB, RT.TKEY})
# Question types that are never valid in a question.
INVALID_QTYPES = frozenset({RT.OPT, RT.TSIG})

_FLAG_QR = 0x80
_OPCODE_MASK = 0x78
_QUERY_COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"
_QUERY_COUNTS_EDNS = b"\x00\x01\x00\x00\x00\x00\x00\x01"


class RateLimitedLog:
    """Log bad input with its peer, at most ``burst`` lines per ``period``; count the rest.

    When a period with dropped lines ends, one line reports how many were dropped.
    """

    def __init__(self, logger: logging.Logger, burst: int = 20, period: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self.clock = clock
        self._window_start = clock()
        self._logged = 0
        self._suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        now = self.clock()
        if now - self._window_start >= self.period:
            if self._suppressed:
                self.logger.warning("%d more bad requests were not logged in the last %.0f s", self._suppressed, self.period)
            self._window_start = now
            self._logged = 0
            self._suppressed = 0
        if self._logged < self.burst:
            self._logged += 1
            self.logger.warning(message, *args)
        else:
            self._suppressed += 1


@dataclass
class UpdateRequest:
    """A signed DNS UPDATE that the server must apply to the store before replying."""

    message: dns.update.UpdateMessage
    zone: Zone
    peer: Any


@dataclass
class Transfer:
    """The messages of a zone transfer, to be written one after another on TCP."""

    messages: list[bytes]


Result = bytes | UpdateRequest | Transfer | None


def question_key(data: bytes, tcp: bool) -> tuple[bytes, int] | None:
    """Return the cache key of a plain query and the end offset of its question, or None.

    Only a QUERY with one question, no answer or authority records, and at
    most an OPT record of version 0 without padding has a key. Any other
    message takes the full path.
    """
    size = len(data)
    if size < 17 or data[2] & (_FLAG_QR | _OPCODE_MASK):
        return None
    counts = data[4:12]
    if counts == _QUERY_COUNTS_PLAIN:
        with_edns = False
    elif counts == _QUERY_COUNTS_EDNS:
        with_edns = True
    else:
        return None
    offset = 12
    length = data[12]
    while length:
        if length > 63:
            return None  # a compression pointer or a reserved label type
        offset += length + 1
        if offset >= size:
            return None
        length = data[offset]
    name_end = offset + 1
    question_end = name_end + 4
    if question_end > size:
        return None
    flags = b"\x01" if data[2] & 0x01 else b"\x00"
    transport = b"t" if tcp else b"u"
    if not with_edns:
        if question_end != size:
            return None
        return data[12:name_end].lower() + data[name_end:question_end] + flags + transport, question_end
    opt = data[question_end:]
    # OPT: root name, type 41, payload size, extended rcode, version, flags, rdata length.
    if len(opt) < 11 or opt[0] != 0 or opt[1:3] != b"\x00\x29" or opt[6] != 0:
        return None
    rdlength = (opt[9] << 8) | opt[10]
    if len(opt) != 11 + rdlength:
        return None
    position = 11
    while position < len(opt):
        if position + 4 > len(opt):
            return None
        code = (opt[position] << 8) | opt[position + 1]
        if code == EDNS_OPTION_PADDING:
            return None
        position += 4 + ((opt[position + 2] << 8) | opt[position + 3])
    if position != len(opt):
        return None
    edns_state = opt[3:5] + (b"\x80" if opt[7] & 0x80 else b"\x00")
    return data[12:name_end].lower() + data[name_end:question_end] + flags + transport + edns_state, question_end


def header_reply(data: bytes, rcode: int) -> bytes:
    """Return a header-only reply with ``rcode`` for a message whose rest cannot be trusted."""
    flags = _FLAG_QR | (data[2] & (_OPCODE_MASK | 0x01))
    return data[:2] + bytes((flags, rcode & 0x0F)) + b"\x00" * 8


class Responder:
    """Answers DNS messages from one :class:`Directory` and the TSIG keys of the store and config."""

    def __init__(
        self,
        directory: Directory,
        *,
        keys: Iterable[KeyInfo] = (),
        max_udp_payload: int = 4096,
        cache_size: int = 100_000,
        axfr_allow: tuple[str, ...] = (),
    ) -> None:
        self.max_udp_payload = max_udp_payload
        self.cache_size = cache_size
        self.axfr_allow = tuple(ipaddress.ip_network(n, strict=False) for n in axfr_allow)
        self.cache: dict[bytes, bytes] = {}
        self.bad_input = RateLimitedLog(log)
        # Counts of the full path only: the fast path stays free of bookkeeping.
        self.stats = {"full": 0, "dropped": 0, "formerr": 0}
        self.directory = directory
        self.keyring: dict[dns.name.Name, dns.tsig.Key] = {}
        self.set_keys(keys)

    # State --------------------------------------------------------------------------

    def set_directory(self, directory: Directory) -> None:
        self.directory = directory
        self.cache.clear()

    def set_keys(self, keys: Iterable[KeyInfo]) -> None:
        keyring = {}
        for key in keys:
            name = dns.name.from_text(key.name)
            keyring[name] = dns.tsig.Key(name, base64.b64decode(key.secret), key.algorithm)
        self.keyring = keyring

    # Entry points --------------------------------------------------------------------

    def fast(self, data: bytes, tcp: bool) -> bytes | None:
        """Return the cached answer for a plain query with its ID and question patched in, or None."""
        found = question_key(data, tcp)
        if found is None:
            return None
        key, question_end = found
        cached = self.cache.get(key)
        if cached is None:
            return None
        return data[:2] + cached[2:12] + data[12:question_end] + cached[question_end:]

    def handle(self, data: bytes, peer: Any, tcp: bool) -> Result:
        """Answer one message through the full path; None means send nothing."""
        if len(data) < HEADER_SIZE:
            self.stats["dropped"] += 1
            self.bad_input.warning("dropped %d-byte message from %s: shorter than a DNS header", len(data), _peer(peer))
            return None
        if data[2] & _FLAG_QR:
            self.stats["dropped"] += 1
            self.bad_input.warning("dropped a response (QR=1) from %s", _peer(peer))
            return None
        self.stats["full"] += 1

        try:
            query = dns.message.from_wire(data, keyring=self._find_key)
        except dns.message.UnknownTSIGKey:
            return self._tsig_error(data, peer, dns.rcode.BADKEY, "unknown TSIG key")
        except dns.tsig.BadAlgorithm:
            return self._tsig_error(data, peer, dns.rcode.BADKEY, "TSIG algorithm does not match the key")
        except dns.tsig.BadSignature:
            return self._tsig_error(data, peer, dns.rcode.BADSIG, "bad TSIG signature")
        except dns.tsig.BadTime:
            return self._tsig_error(data, peer, dns.rcode.BADTIME, "TSIG time outside the allowed fudge")
        except Exception as exc:  # noqa: BLE001 - any parse failure of hostile bytes is FORMERR
            self.stats["formerr"] += 1
            self.bad_input.warning("FORMERR to %s: unparseable message: %s", _peer(peer), _reason(exc))
            return header_reply(data, dns.rcode.FORMERR)

        opcode = query.opcode()
        if opcode not in (dns.opcode.QUERY, dns.opcode.UPDATE):
            self.bad_input.warning("NOTIMP to %s: opcode %s", _peer(peer), dns.opcode.to_text(opcode))
            return self._finish(self._response(query, dns.rcode.NOTIMP), query, tcp)
        if query.edns > 0:
            self.bad_input.warning("BADVERS to %s: EDNS version %d", _peer(peer), query.edns)
            response = self._response(query, dns.rcode.BADVERS)
            return self._finish(response, query, tcp)
        if opcode == dns.opcode.UPDATE:
            return self._update(query, peer, tcp)
        return self._query(data, query, peer, tcp)

    # Queries ---------------------------------------------------------------------------

    def _query(self, data: bytes, query: dns.message.Message, peer: Any, tcp: bool) -> Result:
        if len(query.question) != 1:
            self.stats["formerr"] += 1
            self.bad_input.warning("FORMERR to %s: QDCOUNT is %d, not 1", _peer(peer), len(query.question))
            return header_reply(data, dns.rcode.FORMERR)
        question = query.question[0]
        qname, qtype, qclass = question.name, question.rdtype, question.rdclass

        if qtype in INVALID_QTYPES:
            self.bad_input.warning("FORMERR to %s: question type %s", _peer(peer), RT.to_text(qtype))
            return self._finish(self._response(query, dns.rcode.FORMERR), query, tcp)
        if qtype in UNSUPPORTED_QTYPES:
            return self._finish(self._response(query, dns.rcode.NOTIMP), query, tcp)
        if qtype in (RT.AXFR, RT.IXFR):
            return self._transfer(query, peer, tcp)

        response = self._response(query, dns.rcode.NOERROR)
        if qclass in (dns.rdataclass.IN, dns.rdataclass.ANY):
            self.directory.answer(qname, qtype, response)
        else:
            response.set_rcode(dns.rcode.REFUSED)
        wire = self._finish(response, query, tcp)
        if not query.had_tsig and self.cache_size:
            found = question_key(data, tcp)
            if found is not None:
                if len(self.cache) >= self.cache_size:
                    self.cache.clear()
                self.cache[found[0]] = wire
        return wire

    def _response(self, query: dns.message.Message, rcode: int) -> dns.message.Message:
        response = dns.message.make_response(query, our_payload=self.max_udp_payload)
        response.set_rcode(rcode)
        return response

    def _finish(self, response: dns.message.Message, query: dns.message.Message, tcp: bool) -> bytes:
        """Render ``response``; over UDP, truncate to the client's payload size and set TC."""
        if tcp:
            limit = TCP_MAX
        elif query.edns >= 0:
            limit = max(512, min(query.payload, self.max_udp_payload))
        else:
            limit = 512
        try:
            return response.to_wire(max_size=limit, prefer_truncation=True)
        except dns.exception.TooBig:
            # Even the question and the OPT do not fit: send the header and question with TC.
            response.answer, response.authority, response.additional = [], [], []
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=TCP_MAX)

    def _find_key(self, _message: dns.message.Message, name: dns.name.Name) -> dns.tsig.Key | None:
        return self.keyring.get(name)

    def _tsig_error(self, data: bytes, peer: Any, error: int, reason: str) -> bytes | None:
        """Answer NOTAUTH with an unsigned TSIG carrying ``error`` (RFC 8945 section 5.2)."""
        self.bad_input.warning("NOTAUTH to %s: %s", _peer(peer), reason)
        try:
            query = dns.message.from_wire(data, keyring=False)
            response = dns.message.make_response(query, our_payload=self.max_udp_payload)
        except Exception:  # noqa: BLE001 - the signed message is malformed as well
            return header_reply(data, dns.rcode.FORMERR)
        response.set_rcode(dns.rcode.NOTAUTH)
        now = int(time.time())
        other = struct.pack("!HI", now >> 32, now & 0xFFFFFFFF) if error == dns.rcode.BADTIME else b""
        tsig = query.tsig[0] if query.tsig else None
        if tsig is not None:
            # An unsigned TSIG (empty MAC) that carries only the error code.
            response.tsig = dns.message.Message._make_tsig(
                query.keyname, tsig.algorithm, now, tsig.fudge, b"", query.id, error, other
            )
        return response.to_wire(max_size=TCP_MAX)

    # Zone transfers --------------------------------------------------------------------

    def transfer_allowed(self, query: dns.message.Message, peer: Any) -> bool:
        """Allow a signed request with a known key, or a client in [server] axfr_allow."""
        if query.had_tsig:
            return True
        try:
            address = ipaddress.ip_address(_peer(peer))
        except ValueError:
            return False
        return any(address in network for network in self.axfr_allow)

    def _transfer(self, query: dns.message.Message, peer: Any, tcp: bool) -> Result:
        question = query.question[0]
        kind = RT.to_text(question.rdtype)
        zone = self.directory.zones.get(question.name)
        if not tcp and question.rdtype == RT.AXFR:
            self.bad_input.warning("REFUSED AXFR over UDP from %s for %s", _peer(peer), question.name)
            return self._finish(self._response(query, dns.rcode.REFUSED), query, tcp)
        if zone is None or question.rdclass != dns.rdataclass.IN:
            self.bad_input.warning("REFUSED %s of %s from %s: not a zone served here", kind, question.name, _peer(peer))
            return self._finish(self._response(query, dns.rcode.REFUSED), query, tcp)
        if not self.transfer_allowed(query, peer):
            self.bad_input.warning("REFUSED %s of %s from %s: not signed and not in axfr_allow", kind, zone.origin, _peer(peer))
            return self._finish(self._response(query, dns.rcode.REFUSED), query, tcp)
        if not tcp:
            # IXFR over UDP: the current SOA tells the client to retry over TCP (RFC 1995 section 2).
            response = self._response(query, dns.rcode.NOERROR)
            response.flags |= dns.flags.AA
            response.answer.append(zone.soa)
            return self._finish(response, query, tcp)
        log.info("%s of %s (serial %d) to %s", kind, zone.origin, zone.soa[0].serial, _peer(peer))
        return Transfer(self.transfer_messages(query, zone))

    def transfer_messages(self, query: dns.message.Message, zone: Zone) -> list[bytes]:
        """Render the zone as AXFR messages bracketed by the SOA, TSIG-signed as one sequence.

        A chunk of RRsets too big for one 64 KiB message is halved, and a
        single RRset too big is split into several RRsets of the same name
        and type: a transfer is a stream of records, which the client joins.
        """
        pending = zone.rrsets_in_order() + [zone.soa]
        # A stack of chunks still to send, the next one last.
        chunks = [
            pending[start : start + TRANSFER_RRSETS_PER_MESSAGE]
            for start in range(0, len(pending), TRANSFER_RRSETS_PER_MESSAGE)
        ]
        chunks.reverse()
        messages: list[bytes] = []
        tsig_context = None
        while chunks:
            chunk = chunks.pop()
            response = dns.message.make_response(query, our_payload=self.max_udp_payload)
            response.flags |= dns.flags.AA
            response.answer = chunk
            try:
                wire = response.to_wire(max_size=TCP_MAX, multi=True, tsig_ctx=tsig_context)
            except dns.exception.TooBig:
                chunks.extend(reversed(_split_chunk(chunk)))
                continue
            tsig_context = response.tsig_ctx
            messages.append(wire)
        return messages

    # Updates ---------------------------------------------------------------------------

    def _update(self, query: dns.message.Message, peer: Any, tcp: bool) -> Result:
        assert isinstance(query, dns.update.UpdateMessage)
        if len(query.zone) != 1 or query.zone[0].rdtype != RT.SOA:
            self.bad_input.warning("FORMERR to %s: UPDATE needs one zone of type SOA", _peer(peer))
            return self._finish(self._response(query, dns.rcode.FORMERR), query, tcp)
        origin = query.zone[0].name
        zone = self.directory.zones.get(origin)
        if zone is None or query.zone[0].rdclass != dns.rdataclass.IN:
            self.bad_input.warning("NOTAUTH to %s: UPDATE of %s, which is not a zone served here", _peer(peer), origin)
            return self._finish(self._response(query, dns.rcode.NOTAUTH), query, tcp)
        if not query.had_tsig:
            self.bad_input.warning("REFUSED to %s: unsigned UPDATE of %s", _peer(peer), origin)
            return self._finish(self._response(query, dns.rcode.REFUSED), query, tcp)
        return UpdateRequest(query, zone, peer)

    def update_reply(self, request: UpdateRequest, rcode: int, tcp: bool) -> bytes:
        return self._finish(self._response(request.message, rcode), request.message, tcp)


def _split_chunk(chunk: list[dns.rrset.RRset]) -> list[list[dns.rrset.RRset]]:
    """Halve a list of RRsets, or the records of a lone RRset."""
    if len(chunk) > 1:
        middle = len(chunk) // 2
        return [chunk[:middle], chunk[middle:]]
    (rrset,) = chunk
    records = list(rrset)
    if len(records) < 2:
        raise dns.exception.TooBig(f"one {rrset.rdtype.name} record at {rrset.name} exceeds a DNS message")
    middle = len(records) // 2
    halves = []
    for part in (records[:middle], records[middle:]):
        half = dns.rrset.RRset(rrset.name, rrset.rdclass, rrset.rdtype)
        for rdata in part:
            half.add(rdata, rrset.ttl)
        halves.append([half])
    return halves


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
