"""IMAP benchmark: a 10,000-message mailbox served by `mailstack serve --role imap`.

The script fills a fresh SQLite store with messages of 2 to 6 KiB (bulk
inserted, not through IMAP), starts the server as a child process on
127.0.6.10, and times each operation from a raw TLS client that sends one
command and reads until its tagged reply, so client-side parsing costs
almost nothing. Each operation runs ``--repeat`` times; the report gives the
median and the fastest run. APPEND is timed one message at a time, each
waiting for its tagged OK (which the server sends only after the commit).

Run: ``.venv/bin/python benchmarks/imap.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import os
import random
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert, update

from mailstack import tls
from mailstack.store import Store
from mailstack.store.models import Mailbox, Message, MessageContent

HOST = "127.0.6.10"
PASSWORD = "benchmark password"
WORDS = "the quick brown fox jumps over a lazy dog while mail servers relay messages".split()


def make_message(number: int, rng: random.Random) -> bytes:
    lines = [
        f"From: Sender {number % 97} <sender{number % 97}@there.test>",
        "To: Bob <bob@here.test>",
        f"Subject: benchmark message {number}",
        f"Date: Fri, 04 Dec 2026 10:{number % 60:02d}:00 +0000",
        f"Message-ID: <bench{number}@there.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
    ]
    size = rng.randint(2048, 6144)
    body = []
    length = 0
    while length < size:
        line = " ".join(rng.choice(WORDS) for _ in range(12))
        body.append(line)
        length += len(line) + 2
    return ("\r\n".join(lines + body) + "\r\n").encode()


async def populate(url: str, count: int) -> None:
    store = await Store.open(url)
    await store.add_domain("here.test")
    account = await store.create_account("bob@here.test", PASSWORD)
    inbox = await store.get_mailbox(account.id, "INBOX")
    rng = random.Random(7)
    now = dt.datetime.now(dt.timezone.utc)
    batch = 1000
    async with store.write() as session:
        for start in range(0, count, batch):
            contents = []
            messages = []
            for number in range(start + 1, min(start + batch, count) + 1):
                data = make_message(number, rng)
                digest = hashlib.sha256(data).hexdigest()
                contents.append({"sha256": digest, "size": len(data), "data": data, "created": now})
                messages.append(
                    {
                        "mailbox_id": inbox.id,
                        "uid": number,
                        "modseq": 1 + number,
                        "flags": 0,
                        "keywords": "",
                        "internal_date": now - dt.timedelta(minutes=count - number),
                        "size": len(data),
                        "content_sha256": digest,
                        "queue_id": None,
                    }
                )
            await session.execute(insert(MessageContent), contents)
            await session.execute(insert(Message), messages)
        await session.execute(
            update(Mailbox).where(Mailbox.id == inbox.id).values(uidnext=count + 1, highestmodseq=count + 1)
        )
    await store.close()


def commit_cost(folder: Path, count: int = 200) -> float:
    """Return the mean time in ms of one durable SQLite commit in ``folder`` (WAL, synchronous=FULL)."""
    connection = sqlite3.connect(folder / "commit-probe.db", isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("CREATE TABLE probe (data BLOB)")
    start = time.perf_counter()
    for _ in range(count):
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("INSERT INTO probe VALUES (?)", (b"x" * 4096,))
        connection.execute("COMMIT")
    elapsed = time.perf_counter() - start
    connection.close()
    return elapsed / count * 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Client:
    """A minimal IMAP client: send one command, read until its tagged reply."""

    def __init__(self, port: int, cafile: Path) -> None:
        context = ssl.create_default_context(cafile=str(cafile))
        raw = socket.create_connection((HOST, port), timeout=60)
        self.sock = context.wrap_socket(raw, server_hostname=HOST)
        self.buffer = bytearray()
        self.counter = 0
        self._read_until(b"\r\n")

    def _read_until(self, marker: bytes) -> None:
        while marker not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk

    def command(self, text: bytes, literal: bytes | None = None, *, literal_plus: bool = False) -> bytes:
        """Send a command (with one literal if given, LITERAL+ or synchronising); return the whole reply."""
        self.counter += 1
        tag = b"b%d" % self.counter
        if literal is None:
            self.sock.sendall(tag + b" " + text + b"\r\n")
        elif literal_plus:
            self.sock.sendall(tag + b" " + text + b" {%d+}\r\n" % len(literal) + literal + b"\r\n")
        else:
            self.sock.sendall(tag + b" " + text + b" {%d}\r\n" % len(literal))
            self._read_until(b"\r\n")
            line_end = self.buffer.index(b"\r\n")
            if not self.buffer.startswith(b"+"):
                raise RuntimeError(bytes(self.buffer[:line_end]).decode())
            del self.buffer[: line_end + 2]
            self.sock.sendall(literal + b"\r\n")
        marker = b"\r\n" + tag + b" "
        scanned = 0
        while True:
            # Search only the new bytes (plus a marker's length), so a large reply costs linear time.
            if self.buffer.startswith(tag + b" "):
                index = 0
            else:
                index = self.buffer.find(marker, max(scanned - len(marker), 0))
                index = -1 if index < 0 else index + 2
            if index >= 0:
                end = self.buffer.find(b"\r\n", index)
                if end >= 0:
                    reply = bytes(self.buffer[: end + 2])
                    del self.buffer[: end + 2]
                    status = reply[index + len(tag) + 1 : index + len(tag) + 3]
                    if status != b"OK":
                        raise RuntimeError(reply[index:].decode(errors="replace"))
                    return reply
            scanned = len(self.buffer)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def timed(function, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return times


def report(name: str, times: list[float], dovecot: float | None, unit: str = "ms") -> None:
    median = statistics.median(times)
    best = min(times)
    target = f"  (Dovecot 2.3: {dovecot:g} {unit}, target <= {dovecot * 1.5:g} {unit})" if dovecot else ""
    print(f"{name:42} median {median:8.1f} {unit}   best {best:8.1f} {unit}{target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--appends", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", metavar="FILE", help="run the server under cProfile and write its stats to FILE")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mailstack-imap-bench-") as folder:
        data_dir = Path(folder)
        url = f"sqlite+aiosqlite:///{data_dir / 'mailstack.db'}"
        started = time.perf_counter()
        asyncio.run(populate(url, args.messages))
        print(f"populated {args.messages} messages in {time.perf_counter() - started:.1f} s")

        port = free_port()
        config = data_dir / "bench.toml"
        config.write_text(
            f'[server]\nname = "bench"\nhostname = "localhost"\nlisten = ["{HOST}"]\n'
            f'data_dir = "{data_dir}"\ndomains = ["here.test"]\n'
            f"[imap]\nport = 0\ntls_port = {port}\n[log]\nlevel = \"WARNING\"\n"
        )
        profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
        server = subprocess.Popen(
            [sys.executable, *profile, "-m", "mailstack", "serve", "--config", str(config), "--role", "imap"],
            stdout=subprocess.DEVNULL,
            stderr=sys.stderr,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection((HOST, port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the IMAP server did not start")
                    time.sleep(0.1)
            cafile = tls.ensure_server_certificate(data_dir, "localhost", (HOST,)).ca_file
            assert cafile is not None
            run(port, cafile, args)
            print(f"{'durable SQLite commit (WAL, FULL)':42} {commit_cost(data_dir):8.2f} ms each, measured in the same folder")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    return 0


def run(port: int, cafile: Path, args) -> None:
    client = Client(port, cafile)
    client.command(b'LOGIN bob@here.test "' + PASSWORD.encode() + b'"')
    count = args.messages
    bodies = min(1000, count)
    print(f"machine: {os.cpu_count()} cores; mailbox of {count} messages; {args.repeat} runs each\n")

    cold = timed(lambda: client.command(b"SELECT INBOX"), 1)
    report("SELECT (first after start)", cold, 32)
    report("SELECT (again)", timed(lambda: client.command(b"SELECT INBOX"), args.repeat), 32)

    def fetch_flags():
        reply = client.command(b"UID FETCH 1:* (FLAGS)")
        assert reply.count(b" FETCH (") == count, "not every message was returned"

    report(f"UID FETCH 1:* (FLAGS) of {count}", timed(fetch_flags, args.repeat), 51)

    def fetch_bodies():
        reply = client.command(b"FETCH 1:%d (BODY.PEEK[])" % bodies)
        assert reply.count(b" FETCH (") == bodies

    report(f"FETCH 1:{bodies} (BODY.PEEK[])", timed(fetch_bodies, args.repeat), 71)

    def fetch_bodies_seen():
        client.command(b"FETCH 1:%d (BODY[])" % bodies)

    def reset_seen():
        client.command(b"STORE 1:* -FLAGS.SILENT (\\Seen)")

    times = []
    for _ in range(args.repeat):
        reset_seen()
        times += timed(fetch_bodies_seen, 1)
    report(f"FETCH 1:{bodies} (BODY[]), sets \\Seen", times, 71)

    times = []
    for _ in range(args.repeat):
        reset_seen()
        times += timed(lambda: client.command(b"STORE 1:* +FLAGS (\\Seen)"), 1)
    report(f"STORE 1:* +FLAGS (\\Seen) on {count}", times, 221)

    client.command(b"STORE 1:%d -FLAGS.SILENT (\\Seen)" % (count // 2))
    report(f"SEARCH UNSEEN ({count // 2:,} of them)", timed(lambda: client.command(b"SEARCH UNSEEN"), args.repeat), 5)
    client.command(b"STORE 1:* +FLAGS.SILENT (\\Seen)")
    client.command(b"STORE 1:10 -FLAGS.SILENT (\\Seen)")
    report("SEARCH UNSEEN (10 of them)", timed(lambda: client.command(b"SEARCH UNSEEN"), args.repeat), 5)

    client.command(b"SELECT Drafts")
    rng = random.Random(11)
    bodies = [make_message(count + number, rng) for number in range(args.appends)]
    start = time.perf_counter()
    for body in bodies:
        client.command(b"APPEND INBOX", body)
    elapsed = time.perf_counter() - start
    rate = args.appends / elapsed
    print(f"{'APPEND one at a time':42} {rate:8.0f} msg/s   ({args.appends} messages in {elapsed:.2f} s; Dovecot 2.3: 440 msg/s)")
    bodies = [make_message(count + args.appends + number, rng) for number in range(args.appends)]
    start = time.perf_counter()
    for body in bodies:
        client.command(b"APPEND INBOX", body, literal_plus=True)
    elapsed = time.perf_counter() - start
    rate = args.appends / elapsed
    print(f"{'APPEND one at a time, LITERAL+':42} {rate:8.0f} msg/s   ({args.appends} messages in {elapsed:.2f} s)")
    client.command(b"LOGOUT")
    client.close()


if __name__ == "__main__":
    sys.exit(main())
