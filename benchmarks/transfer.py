"""Transfer benchmark: inbound SMTP acceptance and queue relay throughput.

Starts two mail servers' transfer roles in this process on 127.0.5.40 and
127.0.5.41 (port 25), each with its own SQLite store in a temporary folder,
then measures:

1. inbound: CLIENTS concurrent aiosmtplib clients each send MESSAGES_PER_CLIENT
   messages to "there" over one session per client (MAIL, RCPT, DATA, 250 after
   the commit). Reports messages per second and the latency of one transaction.
2. relay: RELAY_MESSAGES messages queued at once in "here" (one remote
   recipient each) are relayed by the queue runner to "there". Reports the time
   from queuing to the last recipient recorded as delivered.

MX lookups go to a static table instead of DNS, because the resolver caches
every answer after the first lookup. The run is bounded by the counts below and
a 300 s timeout, and it stops by itself.

Run: .venv/bin/python benchmarks/transfer.py [--clients N] [--messages N] [--relay N] [--tls-policy P]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiosmtplib

from mailstack import config as config_module
from mailstack.serve import start_services
from mailstack.settings import MailServerConfig
from mailstack.transfer.resolver import MailHost

HERE = "127.0.5.40"
THERE = "127.0.5.41"
# About 4 KiB: headers and 52 lines of 76 characters.
BODY = b"Subject: benchmark\r\nFrom: alice@here.test\r\nTo: bob@there.test\r\n\r\n" + (b"x" * 76 + b"\r\n") * 52


class StaticResolver:
    """Resolve every domain to one host, in place of DNS in the benchmark."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(self, domain: str) -> list[MailHost]:
        return [MailHost(f"mx.{domain}", 10, (self.address,))]


def load_config(folder: Path, name: str, host: str, domain: str, tls_policy: str) -> MailServerConfig:
    path = folder / f"{name}.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [server]
            name = "{name}"
            hostname = "mx.{domain}"
            domains = ["{domain}"]
            listen = ["{host}"]
            data_dir = "{folder / name}"

            [transfer]
            port = 25
            scan_interval = 0.5
            max_connections_per_address = 1000
            tls_policy = "{tls_policy}"
            """
        )
    )
    return config_module.load(MailServerConfig, path)


async def inbound(clients: int, per_client: int) -> dict[str, float]:
    latencies: list[float] = []

    async def client() -> None:
        smtp = aiosmtplib.SMTP(hostname=THERE, port=25, start_tls=False, local_hostname="bench.here.test")
        await smtp.connect()
        for _ in range(per_client):
            started = time.perf_counter()
            await smtp.sendmail("alice@here.test", ["bob@there.test"], BODY)
            latencies.append(time.perf_counter() - started)
        await smtp.quit()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "messages": len(latencies),
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(len(latencies) * 0.95) - 1] * 1000,
    }


async def relay(here, there, count: int) -> dict[str, float]:
    alice = await here.store.get_account("alice@here.test")
    bob = await there.store.get_account("bob@there.test")
    inbox = await there.store.get_mailbox(bob.id, "INBOX")
    before = (await there.store.mailbox_status(inbox.id)).messages
    runner = here.shared["queue_runner"]
    runner.resolver = StaticResolver(THERE)

    queue_done = asyncio.Event()

    def check(_ids) -> None:
        queue_done.set()

    remove = here.store.add_mailbox_listener(check)
    started = time.perf_counter()
    for _ in range(count):
        await here.store.submit(
            BODY,
            account_id=alice.id,
            envelope_sender="alice@here.test",
            local_account_ids=[],
            remote_recipients=["bob@there.test"],
        )
    queued = time.perf_counter() - started
    while await here.store.list_queue():
        queue_done.clear()
        await asyncio.wait_for(queue_done.wait(), 60)
    elapsed = time.perf_counter() - started
    remove()
    after = (await there.store.mailbox_status(inbox.id)).messages
    return {
        "messages": count,
        "delivered": after - before,
        "queue_seconds": queued,
        "seconds": elapsed,
        "per_second": count / elapsed,
    }


async def main(arguments: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="mailstack-bench-") as temporary:
        folder = Path(temporary)
        async with contextlib.AsyncExitStack() as stack:
            there = await start_services(load_config(folder, "there", THERE, "there.test", arguments.tls_policy), ("transfer",), stack)
            here = await start_services(load_config(folder, "here", HERE, "here.test", arguments.tls_policy), ("transfer",), stack)
            await there.store.create_account("bob@there.test", "benchmark")
            await here.store.create_account("alice@here.test", "benchmark")

            result = await inbound(arguments.clients, arguments.messages)
            print(
                f"inbound: {result['messages']} messages from {arguments.clients} clients in "
                f"{result['seconds']:.2f} s = {result['per_second']:.0f} msg/s; "
                f"latency p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms"
            )
            result = await relay(here, there, arguments.relay)
            print(
                f"relay: {result['messages']} messages queued in {result['queue_seconds']:.2f} s, "
                f"all relayed and recorded after {result['seconds']:.2f} s = {result['per_second']:.0f} msg/s "
                f"({result['delivered']} arrived)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10, help="concurrent inbound clients")
    parser.add_argument("--messages", type=int, default=50, help="messages per inbound client")
    parser.add_argument("--relay", type=int, default=300, help="messages relayed through the queue")
    parser.add_argument(
        "--tls-policy", default="opportunistic", choices=["none", "opportunistic"], help="outbound STARTTLS policy"
    )
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}")
    try:
        import uvloop
    except ImportError:
        asyncio.run(asyncio.wait_for(main(args), 300))
    else:
        # The event loop that `mailstack serve` uses.
        uvloop.run(asyncio.wait_for(main(args), 300))
