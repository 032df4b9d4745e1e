"""Protocol-level readiness probes: an SMTP or IMAP greeting, a DNS answer.

A listening socket is not enough to call a server ready, so each probe speaks
the protocol: it waits for the ``220`` greeting of SMTP, the ``* OK`` greeting
of IMAP (after the TLS handshake for implicit-TLS ports), or an authoritative
SOA answer from the Blue Book. The Docker healthchecks run this module:

    python -m mailstack.demo.probe smtp 127.0.0.1 25
    python -m mailstack.demo.probe imaps 127.0.0.1 993
    python -m mailstack.demo.probe dns 127.0.0.1 53 here.test
    python -m mailstack.demo.probe smtp 127.0.0.1 587, imaps 127.0.0.1 993
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

# A greeting line longer than this is not a mail server's.
MAX_LINE = 4096


class ProbeError(Exception):
    """The server's response broke the protocol or never came; the message shows what was received."""


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()
    if not line:
        raise ProbeError("connection closed before the greeting")
    if len(line) > MAX_LINE:
        raise ProbeError("greeting line too long")
    return line


async def _open(host: str, port: int, tls: ssl.SSLContext | None, server_hostname: str | None):
    return await asyncio.open_connection(
        host, port, ssl=tls, server_hostname=(server_hostname or host) if tls else None
    )


async def probe_smtp(host: str, port: int, *, tls: ssl.SSLContext | None = None, server_hostname: str | None = None) -> str:
    """Return the SMTP greeting of ``host:port`` after checking it is a 220 reply; send QUIT."""
    reader, writer = await _open(host, port, tls, server_hostname)
    try:
        while True:
            line = await _read_line(reader)
            if not line.startswith(b"220"):
                raise ProbeError(f"expected a 220 greeting, got {line[:80]!r}")
            if line[3:4] != b"-":
                break
        writer.write(b"QUIT\r\n")
        await writer.drain()
        # Wait for the 221 reply, so the server logs an orderly end of the session.
        await reader.readline()
        return line.decode(errors="replace").strip()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


async def probe_imap(host: str, port: int, *, tls: ssl.SSLContext | None = None, server_hostname: str | None = None) -> str:
    """Return the IMAP greeting of ``host:port`` after checking it is ``* OK``; send LOGOUT."""
    reader, writer = await _open(host, port, tls, server_hostname)
    try:
        greeting = await _read_line(reader)
        if not greeting.upper().startswith(b"* OK"):
            raise ProbeError(f"expected an IMAP '* OK' greeting, got {greeting[:80]!r}")
        writer.write(b"p1 LOGOUT\r\n")
        await writer.drain()
        # Read up to the tagged reply, so the server logs an orderly end of the session.
        while True:
            reply = await reader.readline()
            if not reply or reply.startswith(b"p1 "):
                break
        return greeting.decode(errors="replace").strip()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


async def probe_dns(host: str, port: int, zone: str, *, tcp: bool = False, timeout: float = 2.0) -> str:
    """Ask ``host:port`` for the SOA of ``zone``; return the SOA text if the answer is authoritative."""
    query = dns.message.make_query(zone, dns.rdatatype.SOA)
    if tcp:
        response = await dns.asyncquery.tcp(query, host, port=port, timeout=timeout)
    else:
        response = await dns.asyncquery.udp(query, host, port=port, timeout=timeout)
    if response.rcode() != dns.rcode.NOERROR:
        raise ProbeError(f"SOA {zone}: {dns.rcode.to_text(response.rcode())}")
    if not response.flags & dns.flags.AA:
        raise ProbeError(f"SOA {zone}: the response is not authoritative (AA flag not set)")
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.SOA:
            return rrset.to_text()
    raise ProbeError(f"SOA {zone}: no SOA record in the answer section")


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """Return a client context that trusts ``ca_file``, or one that checks nothing when it is None."""
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    context = ssl.create_default_context()
    # The healthcheck only checks that the server completes a TLS handshake and greets.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _main(arguments: list[str]) -> str:
    kind, host, port_text, *rest = arguments
    port = int(port_text)
    if kind == "smtp":
        return await probe_smtp(host, port)
    if kind == "smtps":
        return await probe_smtp(host, port, tls=client_context(None))
    if kind == "imap":
        return await probe_imap(host, port)
    if kind == "imaps":
        return await probe_imap(host, port, tls=client_context(None))
    if kind == "dns":
        if not rest:
            raise ProbeError("dns needs a zone name")
        return await probe_dns(host, port, rest[0])
    raise ProbeError(f"unknown probe {kind!r}; use smtp, smtps, imap, imaps or dns")


def _split_probes(arguments: list[str]) -> list[list[str]]:
    """Split ``smtp H 587 , imap H 143`` (commas may touch the words) into one list per probe."""
    probes: list[list[str]] = [[]]
    for word in " ".join(arguments).replace(",", " , ").split():
        if word == ",":
            probes.append([])
        else:
            probes[-1].append(word)
    return [probe for probe in probes if probe]


async def _run_all(probes: list[list[str]]) -> list[str]:
    return [await _main(probe) for probe in probes]


def main(arguments: list[str] | None = None) -> int:
    """Run the probes given on the command line; exit 0 when every server responded correctly.

    Several probes are separated by commas, for example ``smtp H 587, imap H 143``.
    """
    arguments = sys.argv[1:] if arguments is None else arguments
    probes = _split_probes(arguments)
    if not probes or any(len(probe) < 3 for probe in probes):
        print(
            "usage: python -m mailstack.demo.probe smtp|smtps|imap|imaps|dns HOST PORT [ZONE] [, PROBE ...]",
            file=sys.stderr,
        )
        return 2
    try:
        answers = asyncio.run(asyncio.wait_for(_run_all(probes), 10.0))
    except (OSError, ProbeError, asyncio.TimeoutError, ValueError, dns.exception.DNSException) as exc:
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for answer in answers:
        print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
