"""Benchmark of the submission server with Postfix's load generator smtp-source.

Starts `mailstack serve --role submission` on 127.0.4.50 with a fresh SQLite
store, lets smtp-source deliver a bounded number of messages at 1, 10 and 50
parallel sessions with 1 KB and 100 KB bodies, and checks after each run that
every message answered with 250 is in the database. Prints a Markdown table.

smtp-source speaks neither STARTTLS nor AUTH, so the benchmark listener
trusts 127.0.0.0/8 (the submission.trusted_networks option): the sender is
still checked against the store and each message is still one durable
transaction (SQLite WAL, synchronous=FULL) before its 250.

smtp-source comes with Debian's postfix package. When it is missing and the
script runs as root, it installs the package with the daemon kept from
starting (a policy-rc.d that exits 101 and debconf "No configuration"), so
Postfix never listens.

Usage: python benchmarks/submission.py [--messages 2000] [--sessions 1,10,50] [--sizes 1024,102400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.4.50"
PORT = 10587
NOOP_PORT = 10588
SENDER = "alice@bench.test"
RECIPIENT = "bob@bench.test"
POLICY_RC = Path("/usr/sbin/policy-rc.d")
# Each smtp-source run is killed after this many seconds (subprocess.run timeout).
RUN_TIMEOUT = 300


def ensure_smtp_source() -> str:
    found = shutil.which("smtp-source") or (Path("/usr/sbin/smtp-source").exists() and "/usr/sbin/smtp-source")
    if found:
        return str(found)
    if os.geteuid() != 0:
        sys.exit("smtp-source not found; install Debian's postfix package (without starting it) or run as root")
    created_policy = False
    if not POLICY_RC.exists():
        POLICY_RC.write_text("#!/bin/sh\n# Keep package installs from starting daemons.\nexit 101\n")
        POLICY_RC.chmod(0o755)
        created_policy = True
    try:
        subprocess.run(
            ["debconf-set-selections"], input=b"postfix postfix/main_mailer_type select No configuration\n", check=True
        )
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=environment, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"],
            check=True, env=environment, stdout=subprocess.DEVNULL,
        )
    finally:
        if created_policy:
            POLICY_RC.unlink()
    # Never leave a Postfix master running.
    subprocess.run(["postfix", "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return "/usr/sbin/smtp-source"


async def prepare_store(data_dir: Path) -> None:
    from mailstack.store import Store

    store = await Store.open(f"sqlite+aiosqlite:///{data_dir / 'mailstack.db'}")
    try:
        await store.add_domain("bench.test")
        await store.create_account(SENDER, "bench-password-1")
        await store.create_account(RECIPIENT, "bench-password-2")
    finally:
        await store.close()


def write_config(data_dir: Path) -> Path:
    path = data_dir / "bench.toml"
    path.write_text(
        f"""
[server]
name = "bench"
hostname = "mail.bench.test"
domains = ["bench.test"]
listen = ["{HOST}"]
data_dir = "{data_dir}"
roles = ["submission"]

[submission]
port = {PORT}
tls_port = 0
trusted_networks = ["127.0.0.0/8"]
max_connections = 1000
max_connections_per_address = 1000

[log]
level = "WARNING"
"""
    )
    return path


def wait_for_port(process: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"mailstack serve exited with status {process.returncode}")
        try:
            with socket.create_connection((HOST, PORT), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit("mailstack serve did not open its port within 30 s")


def count_messages(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return connection.execute("SELECT count(*) FROM messages").fetchone()[0]


class NoopHandler:
    """aiosmtpd handler that accepts every message and stores nothing: the protocol's own cost."""

    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 OK"


def start_noop_server():
    import logging

    from aiosmtpd.controller import Controller

    logging.getLogger("mail.log").setLevel(logging.WARNING)
    controller = Controller(NoopHandler(), hostname=HOST, port=NOOP_PORT)
    controller.start()
    return controller


def run_one(smtp_source: str, database: Path | None, sessions: int, size: int, messages: int, reuse: bool,
            port: int = PORT) -> float:
    before = count_messages(database) if database else 0
    command = [smtp_source, "-s", str(sessions), "-m", str(messages), "-l", str(size),
               "-f", SENDER, "-t", RECIPIENT, "-S", "bench", f"{HOST}:{port}"]
    if reuse:
        command.insert(1, "-d")
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, timeout=RUN_TIMEOUT, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"smtp-source failed ({result.returncode}): {result.stderr.decode(errors='replace')[-500:]}")
    stored = count_messages(database) - before if database else messages
    if stored != messages:
        sys.exit(f"{messages} messages sent but {stored} stored")
    return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per run (default 2000)")
    parser.add_argument("--sessions", default="1,10,50", help="parallel sessions, comma-separated")
    parser.add_argument("--sizes", default="1024,102400", help="body sizes in bytes, comma-separated")
    parser.add_argument("--reuse", action="store_true", help="smtp-source -d: many messages per connection")
    parser.add_argument("--baseline", action="store_true", help="also measure a no-op aiosmtpd handler in this process")
    args = parser.parse_args()
    smtp_source = ensure_smtp_source()

    with tempfile.TemporaryDirectory(prefix="mailstack-bench-") as folder:
        data_dir = Path(folder)
        asyncio.run(prepare_store(data_dir))
        config = write_config(data_dir)
        process = subprocess.Popen(
            [sys.executable, "-m", "mailstack", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(process, time.monotonic() + 30)
            database = data_dir / "mailstack.db"
            noop = start_noop_server() if args.baseline else None
            print(f"| body | sessions | messages | mailstack msg/s | no-op aiosmtpd msg/s |"
                  f"{' (one connection per session)' if args.reuse else ''}")
            print("| --- | --- | --- | --- | --- |")
            for size in (int(s) for s in args.sizes.split(",")):
                for sessions in (int(s) for s in args.sessions.split(",")):
                    # 100 KB runs move 100 times the data; keep them bounded in time too.
                    count = args.messages if size <= 10_000 else max(args.messages // 2, sessions)
                    rate = run_one(smtp_source, database, sessions, size, count, args.reuse)
                    baseline = "-"
                    if noop is not None:
                        baseline = f"{run_one(smtp_source, None, sessions, size, count, args.reuse, NOOP_PORT):.0f}"
                    print(f"| {size // 1024} KB | {sessions} | {count} | {rate:.0f} | {baseline} |", flush=True)
            if noop is not None:
                noop.stop()
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
