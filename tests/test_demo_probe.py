"""The readiness probes and the Docker healthcheck command against scripted loopback peers."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import dns.asyncquery
import pytest

from mailstack.demo import probe

ADDRESS = "127.0.8.210"


async def scripted_server(greeting: bytes, replies: dict[bytes, bytes]):
    """Start a TCP server that sends ``greeting`` and answers each line that starts with a key of ``replies``."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        while line := await reader.readline():
            received.append(line)
            for prefix, reply in replies.items():
                if line.startswith(prefix):
                    writer.write(reply)
                    await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, ADDRESS, 0)
    return server, server.sockets[0].getsockname()[1], received


async def test_smtp_probe_reads_multiline_greeting() -> None:
    server, port, received = await scripted_server(b"220-mail.here.test\r\n220 ready\r\n", {b"QUIT": b"221 bye\r\n"})
    async with server:
        assert await probe.probe_smtp(ADDRESS, port) == "220 ready"
    assert received == [b"QUIT\r\n"]


async def test_smtp_probe_rejects_554() -> None:
    server, port, _ = await scripted_server(b"554 no service\r\n", {})
    async with server:
        with pytest.raises(probe.ProbeError, match="expected a 220 greeting"):
            await probe.probe_smtp(ADDRESS, port)


async def test_imap_probe_logs_out() -> None:
    server, port, received = await scripted_server(
        b"* OK [CAPABILITY IMAP4rev1] ready\r\n", {b"p1 LOGOUT": b"* BYE logging out\r\np1 OK LOGOUT done\r\n"}
    )
    async with server:
        assert (await probe.probe_imap(ADDRESS, port)).startswith("* OK")
    assert received == [b"p1 LOGOUT\r\n"]


async def test_imap_probe_rejects_bye() -> None:
    server, port, _ = await scripted_server(b"* BYE too busy\r\n", {})
    async with server:
        with pytest.raises(probe.ProbeError, match="expected an IMAP"):
            await probe.probe_imap(ADDRESS, port)


async def test_probe_closed_before_greeting() -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close_at_once, ADDRESS, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(probe.ProbeError, match="closed before the greeting"):
            await probe.probe_smtp(ADDRESS, port)


async def test_dns_probe_needs_authority(monkeypatch: pytest.MonkeyPatch) -> None:
    import dns.message
    import dns.rcode

    async def refused(query, where, port=53, timeout=None):
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.REFUSED)
        return response

    monkeypatch.setattr(dns.asyncquery, "udp", refused)
    with pytest.raises(probe.ProbeError, match="SOA here.test: REFUSED"):
        await probe.probe_dns(ADDRESS, 53, "here.test")


def test_healthcheck_command_exit_status() -> None:
    async def run() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        server, port, _ = await scripted_server(b"220 ready\r\n", {b"QUIT": b"221 bye\r\n"})
        async with server:
            healthy = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "mailstack.demo.probe", "smtp", ADDRESS, str(port)],
                capture_output=True, text=True, timeout=30,
            )
        # The server is closed now, so the same probe must fail.
        unhealthy = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "mailstack.demo.probe", "smtp", ADDRESS, str(port)],
            capture_output=True, text=True, timeout=30,
        )
        return healthy, unhealthy

    healthy, unhealthy = asyncio.run(run())
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout.strip() == "220 ready"
    assert unhealthy.returncode == 1
    assert unhealthy.stderr.startswith("unhealthy: ConnectionRefusedError")


def test_healthcheck_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "mailstack.demo.probe", "smtp"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_healthcheck_runs_several_probes() -> None:
    async def run() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        smtp, smtp_port, _ = await scripted_server(b"220 ready\r\n", {b"QUIT": b"221 bye\r\n"})
        imap, imap_port, _ = await scripted_server(b"* OK ready\r\n", {b"p1 LOGOUT": b"p1 OK bye\r\n"})
        async with smtp, imap:
            both = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "mailstack.demo.probe", "smtp", ADDRESS, f"{smtp_port},", "imap", ADDRESS, str(imap_port)],
                capture_output=True, text=True, timeout=30,
            )
            # The second probe asks the SMTP server for an IMAP greeting, so the whole check fails.
            wrong = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "mailstack.demo.probe", f"smtp {ADDRESS} {smtp_port}, imap {ADDRESS} {smtp_port}"],
                capture_output=True, text=True, timeout=30,
            )
        return both, wrong

    both, wrong = asyncio.run(run())
    assert both.returncode == 0, both.stderr
    assert both.stdout.splitlines() == ["220 ready", "* OK ready"]
    assert wrong.returncode == 1
    assert "expected an IMAP '* OK' greeting" in wrong.stderr
