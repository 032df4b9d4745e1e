#!/usr/bin/env python3
"""Measure MX queries per second of `mailstack bluebook serve` with dnsperf.

The script makes a temporary Blue Book with 100 mail domains, starts the
server on 127.0.3.50, runs dnsperf (installing the Debian package when it is
missing) for a fixed time with MX queries spread over the domains, prints the
results and stops the server. It runs twice by default: with the wire answer
cache (the normal setting) and with the cache off, so that every answer is
built with dnspython objects.

    .venv/bin/python benchmarks/bluebook_dnsperf.py [--seconds 10] [--clients 4] [--outstanding 100]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.3.50"
DOMAINS = 100


def ensure_dnsperf() -> str:
    path = shutil.which("dnsperf")
    if path:
        return path
    print("dnsperf is missing; installing the Debian package", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "dnsperf"], check=True, env=env)
    path = shutil.which("dnsperf")
    if not path:
        sys.exit("dnsperf could not be installed")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((HOST, 0))
        return udp.getsockname()[1]


def create_zones(config_path: Path) -> None:
    """Add the benchmark's mail domains through the store, as `bluebook add` does, in one process."""
    import asyncio

    from mailstack import config as config_module
    from mailstack.bluebook import mailzone
    from mailstack.bluebook.config import BlueBookConfig
    from mailstack.bluebook.zonestore import ZoneStore, to_name

    config = config_module.load(BlueBookConfig, config_path, environ={})

    async def create() -> None:
        store = await ZoneStore.open(config.database_url)
        try:
            for index in range(DOMAINS):
                spec = mailzone.MailDomain(
                    domain=to_name(f"d{index}.bench.test"),
                    mx=[(10, to_name(f"mx.d{index}.bench.test"))],
                    addresses=[f"127.0.1.{index + 1}"],
                )
                await store.create_zone(mailzone.build_zone(spec, config.zone, config.server.listen))
        finally:
            await store.close()

    asyncio.run(create())


def wait_until_answering(port: int, process: subprocess.Popen, limit: float = 20.0) -> None:
    import dns.exception
    import dns.message
    import dns.query

    deadline = time.monotonic() + limit
    while True:
        try:
            dns.query.udp(dns.message.make_query("d0.bench.test", "MX"), HOST, port=port, timeout=0.2)
            return
        except (dns.exception.Timeout, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit("the Blue Book did not start")


def run_once(dnsperf: str, folder: Path, cache_size: int, seconds: int, clients: int, outstanding: int) -> dict[str, float]:
    port = free_port()
    config = folder / f"bluebook-{cache_size}.toml"
    config.write_text(
        f'[server]\nlisten = ["{HOST}"]\nport = {port}\ndata_dir = "data"\nanswer_cache_size = {cache_size}\n'
        '[log]\nlevel = "WARNING"\n'
    )
    process = subprocess.Popen([sys.executable, "-m", "mailstack", "bluebook", "serve", "--config", str(config)])
    try:
        wait_until_answering(port, process)
        result = subprocess.run(
            [dnsperf, "-s", HOST, "-p", str(port), "-d", str(folder / "queries.txt"), "-l", str(seconds), "-c", str(clients), "-q", str(outstanding)],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    output = result.stdout
    numbers = {}
    for key, pattern in (
        ("sent", r"Queries sent:\s+(\d+)"),
        ("completed", r"Queries completed:\s+(\d+)"),
        ("lost", r"Queries lost:\s+(\d+)"),
        ("qps", r"Queries per second:\s+([\d.]+)"),
        ("latency_ms", r"Average Latency \(s\):\s+([\d.]+)"),
    ):
        match = re.search(pattern, output)
        if match is None:
            sys.exit(f"unexpected dnsperf output:\n{output}\n{result.stderr}")
        numbers[key] = float(match.group(1))
    numbers["latency_ms"] *= 1000
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="dnsperf run time per measurement")
    parser.add_argument("--clients", type=int, default=4, help="dnsperf client sockets")
    parser.add_argument("--outstanding", type=int, default=100, help="dnsperf -q: queries in flight at once")
    parser.add_argument("--skip-uncached", action="store_true", help="only measure with the answer cache")
    options = parser.parse_args()

    dnsperf = ensure_dnsperf()
    with tempfile.TemporaryDirectory(prefix="bluebook-bench-") as temporary:
        folder = Path(temporary)
        setup = folder / "setup.toml"
        setup.write_text(f'[server]\nlisten = ["{HOST}"]\ndata_dir = "data"\n')
        create_zones(setup)
        with (folder / "queries.txt").open("w") as queries:
            for index in range(DOMAINS):
                queries.write(f"d{index}.bench.test MX\n")

        runs = [("wire answer cache", 100_000)]
        if not options.skip_uncached:
            runs.append(("no cache (dnspython per query)", 0))
        print(
            f"{os.cpu_count()} CPUs, dnsperf -c {options.clients} -q {options.outstanding} -l {options.seconds}, "
            f"{DOMAINS} zones, MX queries"
        )
        for label, cache_size in runs:
            numbers = run_once(dnsperf, folder, cache_size, options.seconds, options.clients, options.outstanding)
            print(
                f"{label:32} {numbers['qps']:>10.0f} queries/s   completed {numbers['completed']:.0f}/"
                f"{numbers['sent']:.0f}, lost {numbers['lost']:.0f}, mean latency {numbers['latency_ms']:.2f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
