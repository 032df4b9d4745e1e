"""Fixtures and clients shared by the submission tests: a real store, real TLS, real sockets."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import shutil
import ssl
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import select

from mailstack import tls
from mailstack.settings import MailServerConfig, ServerSection, SubmissionSection
from mailstack.smtp import SMTPServer
from mailstack.store import Store
from mailstack.store.batch import SubmitBatcher
from mailstack.store.models import Mailbox, Message, MessageContent
from mailstack.submission.service import IMPLICIT_TLS_LISTENER, STARTTLS_LISTENER, build_server

HOST = "127.0.4.1"
HOSTNAME = "mail.here.test"
ALICE = ("alice@here.test", "alice-password")
BOB = ("bob@here.test", "bob-password")


@dataclasses.dataclass
class Env:
    store: Store
    tls_files: tls.TLSFiles
    ssl_context: ssl.SSLContext
    data_dir: Path
    alice_id: int
    bob_id: int

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.tls_files.ca_file))
        return context


async def _create_template(directory: Path) -> tuple[int, int]:
    store = await Store.open(f"sqlite+aiosqlite:///{directory / 'mail.db'}")
    try:
        await store.add_domain("here.test")
        alice = await store.create_account(*ALICE)
        bob = await store.create_account(*BOB)
        await store.add_alias("al@here.test", ALICE[0])
    finally:
        await store.close()
    tls.ensure_server_certificate(directory, HOSTNAME, (HOST,))
    return alice.id, bob.id


def build_template(directory: Path) -> Path:
    """Create a data folder with the test accounts once; argon2 hashing makes this slow."""
    ids = asyncio.run(_create_template(directory))
    (directory / "ids").write_text(f"{ids[0]} {ids[1]}")
    return directory


async def make_env(tmp_path: Path, template: Path) -> Env:
    """Copy the template's database and certificates into ``tmp_path`` and open them."""
    shutil.copy(template / "mail.db", tmp_path / "mail.db")
    shutil.copytree(template / "tls", tmp_path / "tls")
    alice_id, bob_id = (int(part) for part in (template / "ids").read_text().split())
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}")
    files = tls.ensure_server_certificate(tmp_path, HOSTNAME, (HOST,))
    return Env(store, files, tls.server_context(files), tmp_path, alice_id, bob_id)


@dataclasses.dataclass
class Running:
    server: SMTPServer
    port: int
    tls_port: int
    batcher: SubmitBatcher | None

    async def close(self) -> None:
        await self.server.close(2.0)
        if self.batcher is not None:
            await self.batcher.close()


async def start_submission(env: Env, *, group_commit: bool = True, **section_overrides) -> Running:
    """Start the submission server as the service does, on free ports of HOST."""
    section = SubmissionSection(**{"auth_failure_delay": 0.0, **section_overrides})
    config = MailServerConfig(server=ServerSection(hostname=HOSTNAME, data_dir=env.data_dir), submission=section)
    context = SimpleNamespace(config=config, store=env.store, ssl_context=env.ssl_context, shared={})
    batcher = SubmitBatcher(env.store) if group_commit else None
    server = build_server(context, batcher)
    [(_, port)] = await server.listen(HOST, 0, STARTTLS_LISTENER)
    [(_, tls_port)] = await server.listen(HOST, 0, IMPLICIT_TLS_LISTENER)
    return Running(server, port, tls_port, batcher)


async def inbox_messages(store: Store, account_id: int, mailbox: str = "INBOX") -> list[bytes]:
    async with store.read() as session:
        rows = await session.execute(
            select(MessageContent.data)
            .join(Message, Message.content_sha256 == MessageContent.sha256)
            .join(Mailbox, Mailbox.id == Message.mailbox_id)
            .where(Mailbox.account_id == account_id, Mailbox.name == mailbox)
            .order_by(Message.uid)
        )
        return [row[0] for row in rows]


async def count_messages(store: Store) -> int:
    async with store.read() as session:
        return len(list(await session.scalars(select(Message.id))))


class RawClient:
    """A line-level SMTP client on a stream, for dialogues that real clients refuse to send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, ssl_context: ssl.SSLContext | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection(HOST, port, ssl=ssl_context)
        client = cls(reader, writer)
        greeting = await client.reply()
        assert greeting[0] == 220, greeting
        return client

    async def reply(self, timeout: float = 10.0) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError(f"connection closed; lines so far: {lines}")
            text = line.decode("utf-8").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str) -> tuple[int, list[str]]:
        await self.send(line.encode("utf-8") + b"\r\n")
        return await self.reply()

    async def starttls(self, context: ssl.SSLContext) -> None:
        code, _ = await self.command("STARTTLS")
        assert code == 220
        await self.writer.start_tls(context, server_hostname=HOST)

    async def login(self, username: str, password: str) -> tuple[int, list[str]]:
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        return await self.command(f"AUTH PLAIN {token}")

    async def at_eof(self, timeout: float = 10.0) -> bool:
        data = await asyncio.wait_for(self.reader.read(), timeout)
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def authenticated_client(env: Env, running: Running, account: tuple[str, str] = ALICE) -> RawClient:
    client = await RawClient.connect(running.tls_port, ssl_context=env.client_context())
    assert (await client.command("EHLO client.test"))[0] == 250
    code, lines = await client.login(*account)
    assert code == 235, lines
    return client
