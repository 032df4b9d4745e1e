"""The IMAP server over real loopback sockets, driven by imaplib, aioimaplib and curl.

Every test starts a real IMAPServer on 127.0.6.x with a SQLite store in a
temporary folder and a certificate from the local CA. Blocking imaplib
clients run in threads, so the server's event loop keeps serving them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import imaplib
import re
import shutil
import socket
import ssl
import subprocess

import pytest

from mailstack import tls
from mailstack.imap import server as server_module
from mailstack.imap import session as session_module
from mailstack.imap.server import IMAPServer
from mailstack.settings import IMAPSection
from mailstack.store import Store
from mailstack.store.messages import FlagMode
from mailstack.store.models import Delivery, Flag

HOST = "127.0.6.1"
# Client source addresses for the per-address connection limit.
IDLE_CLIENT = "127.0.6.3"
OTHER_CLIENT = "127.0.6.4"
PASSWORD = "correct horse battery"
MESSAGE = (
    b"From: Alice <alice@here.test>\r\n"
    b"To: Bob <bob@here.test>\r\n"
    b"Subject: hello %d\r\n"
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <m%d@here.test>\r\n"
    b"\r\n"
    b"Hello Bob, this is message %d.\r\n"
)
MULTIPART = (
    b"From: alice@here.test\r\nTo: bob@here.test\r\nSubject: parts\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n"
    b"preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nfirst part\r\n"
    b"--XX\r\nContent-Type: text/html\r\n\r\n<p>second</p>\r\n--XX--\r\n"
)


def message(number: int) -> bytes:
    return MESSAGE % (number, number, number)


@dataclasses.dataclass
class Harness:
    store: Store
    server: IMAPServer
    port: int
    tls_port: int
    ca_file: str
    account_id: int
    loop: asyncio.AbstractEventLoop

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        return context

    def connect(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4(HOST, self.port, timeout=10)
        client.starttls(ssl_context=self.client_context())
        return client

    def login(self) -> imaplib.IMAP4:
        client = self.connect()
        client.login("bob@here.test", PASSWORD)
        return client

    def login_tls(self) -> imaplib.IMAP4_SSL:
        client = imaplib.IMAP4_SSL(HOST, self.tls_port, ssl_context=self.client_context(), timeout=10)
        client.login("bob@here.test", PASSWORD)
        return client

    async def mailbox_id(self, name: str) -> int:
        mailbox = await self.store.get_mailbox(self.account_id, name)
        return mailbox.id


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Build once per module: a store with the account (argon2 is slow) and the TLS files."""
    folder = tmp_path_factory.mktemp("imap-template")

    async def build():
        store = await Store.open(f"sqlite+aiosqlite:///{folder / 'mail.db'}")
        await store.add_domain("here.test")
        await store.create_account("bob@here.test", PASSWORD)
        await store.close()

    asyncio.run(build())
    tls.ensure_server_certificate(folder, "localhost", (HOST,))
    return folder


async def start_harness(tmp_path, template, **overrides) -> Harness:
    shutil.copy(template / "mail.db", tmp_path / "mail.db")
    shutil.copytree(template / "tls", tmp_path / "tls")
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}")
    account = await store.get_account("bob@here.test")
    files = tls.ensure_server_certificate(tmp_path, "localhost", (HOST,))
    settings = {"auth_failure_delay": 0.05, **overrides}
    config = IMAPSection(**settings)
    server = IMAPServer(store, config, tls.server_context(files))
    plain = await server.listen(HOST, 0, implicit_tls=False)
    implicit = await server.listen(HOST, 0, implicit_tls=True)
    return Harness(
        store,
        server,
        plain.sockets[0].getsockname()[1],
        implicit.sockets[0].getsockname()[1],
        str(files.ca_file),
        account.id,
        asyncio.get_running_loop(),
    )


@pytest.fixture
async def harness(tmp_path, template):
    running = await start_harness(tmp_path, template)
    yield running
    await running.server.close(2)
    await running.store.close()


def run(function, *args):
    """Run a blocking client function in a thread so the server keeps serving."""
    return asyncio.to_thread(function, *args)


async def fill(harness: Harness, count: int, name: str = "INBOX") -> None:
    mailbox_id = await harness.mailbox_id(name)
    for number in range(1, count + 1):
        await harness.store.append(mailbox_id, message(number))


# --- connection, TLS and login ------------------------------------------------------


async def test_greeting_announces_starttls_and_logindisabled(harness):
    def check():
        client = imaplib.IMAP4(HOST, harness.port, timeout=10)
        capabilities = client.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="LOGIN"):
            client.login("bob@here.test", PASSWORD)
        client.logout()
        return capabilities

    capabilities = await run(check)
    assert "STARTTLS" in capabilities
    assert "LOGINDISABLED" in capabilities
    assert "AUTH=PLAIN" not in capabilities


async def test_login_after_starttls(harness):
    def check():
        client = harness.connect()
        capabilities = client.capabilities
        typ, data = client.login("bob@here.test", PASSWORD)
        after = client.capability()
        client.logout()
        return capabilities, typ, after

    capabilities, typ, after = await run(check)
    assert "AUTH=PLAIN" in capabilities
    assert "STARTTLS" not in capabilities
    assert typ == "OK"
    assert b"UIDPLUS" in after[1][0]
    assert b"APPENDLIMIT=" in after[1][0]


async def test_implicit_tls_authenticate_plain(harness):
    def check():
        client = imaplib.IMAP4_SSL(HOST, harness.tls_port, ssl_context=harness.client_context(), timeout=10)
        typ, _ = client.authenticate("PLAIN", lambda _challenge: b"\0bob@here.test\0" + PASSWORD.encode())
        client.logout()
        return typ

    assert await run(check) == "OK"


async def test_wrong_password_authenticationfailed(harness):
    def check():
        client = harness.connect()
        with pytest.raises(imaplib.IMAP4.error) as caught:
            client.login("bob@here.test", "wrong")
        client.logout()
        return str(caught.value)

    assert "[AUTHENTICATIONFAILED]" in await run(check)


async def test_failed_logins_are_throttled(tmp_path, template):
    harness = await start_harness(tmp_path, template, auth_failure_limit=2, auth_failure_delay=0.01)
    try:
        def check():
            client = harness.connect()
            replies = []
            for password in ("bad1", "bad2", PASSWORD):
                try:
                    client.login("bob@here.test", password)
                    replies.append("OK")
                except imaplib.IMAP4.error as exc:
                    replies.append(str(exc))
            client.logout()
            return replies

        replies = await run(check)
    finally:
        await harness.server.close(1)
        await harness.store.close()
    assert "[AUTHENTICATIONFAILED]" in replies[0]
    assert "[AUTHENTICATIONFAILED]" in replies[1]
    # Even the right password is refused while the address is locked.
    assert "[UNAVAILABLE]" in replies[2]


# --- raw socket checks ------------------------------------------------------------------


class RawClient:
    """A line-level IMAP client over a plain or TLS socket, for hostile input."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def until_tagged(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def closed(self) -> bool:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (ConnectionError, OSError):
            return True


def raw_connect(harness: Harness, *, login: bool = False) -> RawClient:
    sock = socket.create_connection((HOST, harness.tls_port), timeout=10)
    wrapped = harness.client_context().wrap_socket(sock, server_hostname=HOST)
    client = RawClient(wrapped)
    assert client.line().startswith(b"* OK")
    if login:
        client.send(b"a LOGIN bob@here.test \"" + PASSWORD.encode() + b"\"\r\n")
        assert client.until_tagged(b"a")[-1].startswith(b"a OK")
    return client


async def test_literal_over_preauth_limit_rejected_unread(harness):
    def check():
        client = raw_connect(harness)
        client.send(b"a LOGIN {100000}\r\n")
        reply = client.until_tagged(b"a")
        client.send(b"b NOOP\r\n")
        after = client.until_tagged(b"b")
        return reply, after

    reply, after = await run(check)
    assert reply[-1].startswith(b"a BAD")
    assert after[-1].startswith(b"b OK")


async def test_append_over_limit_toobig(tmp_path, template):
    harness = await start_harness(tmp_path, template, append_limit=2048)
    try:
        def check():
            client = raw_connect(harness, login=True)
            client.send(b"a APPEND INBOX {5000}\r\n")
            reply = client.until_tagged(b"a")
            # A LITERAL+ literal up to twice the limit is skipped and the session goes on.
            client.send(b"b APPEND INBOX {3000+}\r\n" + b"x" * 3000 + b"\r\n")
            skipped = client.until_tagged(b"b")
            client.send(b"c NOOP\r\n")
            after = client.until_tagged(b"c")
            return reply, skipped, after

        reply, skipped, after = await run(check)
    finally:
        await harness.server.close(1)
        await harness.store.close()
    assert reply[-1].startswith(b"a NO [TOOBIG]")
    assert skipped[-1].startswith(b"b NO [TOOBIG]")
    assert after[-1].startswith(b"c OK")


async def test_long_line_bad_then_recovers(harness):
    def check():
        client = raw_connect(harness)
        client.send(b"a NOOP " + b"x" * 70000 + b"\r\n")
        reply = client.line()
        client.send(b"b NOOP\r\n")
        after = client.until_tagged(b"b")
        return reply, after

    reply, after = await run(check)
    assert b"BAD" in reply
    assert after[-1] == b"b OK NOOP completed"


async def test_bad_command_budget_then_bye(tmp_path, template):
    harness = await start_harness(tmp_path, template, max_bad_commands=3)
    try:
        def check():
            client = raw_connect(harness)
            lines = []
            for number in range(3):
                client.send(b"x%d FROBNICATE\r\n" % number)
                lines.append(client.line())
            lines.append(client.line())
            return lines, client.closed()

        lines, closed = await run(check)
    finally:
        await harness.server.close(1)
        await harness.store.close()
    assert lines[0].startswith(b"x0 BAD")
    assert lines[3].startswith(b"* BYE")
    assert closed


async def test_autologout_before_login(tmp_path, template):
    harness = await start_harness(tmp_path, template, login_timeout=1)
    try:
        def check():
            client = raw_connect(harness)
            return client.line(), client.closed()

        line, closed = await run(check)
    finally:
        await harness.server.close(1)
        await harness.store.close()
    assert line.startswith(b"* BYE")
    assert b"autologout" in line
    assert closed


async def test_plaintext_after_starttls_discarded(harness):
    def check():
        sock = socket.create_connection((HOST, harness.port), timeout=10)
        client = RawClient(sock)
        client.line()
        # An injected command behind STARTTLS must not run after the handshake.
        client.send(b"a STARTTLS\r\nb CAPABILITY\r\n")
        reply = client.line()
        wrapped = harness.client_context().wrap_socket(sock, server_hostname=HOST)
        secure = RawClient(wrapped)
        secure.send(b"c NOOP\r\n")
        return reply, secure.until_tagged(b"c")

    reply, lines = await run(check)
    assert reply.startswith(b"a OK")
    assert lines == [b"c OK NOOP completed"]


async def test_connection_limit_per_address(tmp_path, template):
    harness = await start_harness(tmp_path, template, max_connections_per_address=1)
    try:
        def check():
            first = raw_connect(harness)
            second = RawClient(socket.create_connection((HOST, harness.port), timeout=10))
            line = second.line()
            first.send(b"a LOGOUT\r\n")
            first.until_tagged(b"a")
            return line

        line = await run(check)
    finally:
        await harness.server.close(1)
        await harness.store.close()
    assert line.startswith(b"* BYE [UNAVAILABLE]")


async def test_tls_port_counts_connections_before_handshake(tmp_path, template, monkeypatch):
    """Raw TCP connections that never send a ClientHello count against the per-address limit."""
    monkeypatch.setattr(server_module, "TLS_HANDSHAKE_TIMEOUT", 1.0)
    harness = await start_harness(tmp_path, template, max_connections_per_address=3)
    try:
        def check():
            idle = [
                socket.create_connection((HOST, harness.tls_port), timeout=5, source_address=(IDLE_CLIENT, 0))
                for _ in range(6)
            ]
            # Over the limit: closed at once, without a handshake. A socket the server
            # keeps open times out here instead.
            extras_closed = [sock.recv(1) == b"" for sock in idle[3:]]
            sock = socket.create_connection((HOST, harness.tls_port), timeout=5, source_address=(OTHER_CLIENT, 0))
            other = RawClient(harness.client_context().wrap_socket(sock, server_hostname=HOST))
            greeting = other.line()
            other.send(b"a LOGIN bob@here.test \"" + PASSWORD.encode() + b"\"\r\n")
            login = other.until_tagged(b"a")
            # Within the limit: held only until the handshake timeout.
            counted_closed = [sock.recv(1) == b"" for sock in idle[:3]]
            for sock in idle:
                sock.close()
            other.sock.close()
            return extras_closed, greeting, login, counted_closed

        extras_closed, greeting, login, counted_closed = await run(check)
    finally:
        await harness.server.close(1)
        await harness.store.close()
    assert extras_closed == [True, True, True]
    assert greeting.startswith(b"* OK")
    assert login[-1].startswith(b"a OK")
    assert counted_closed == [True, True, True]


async def test_serverbug_keeps_session(harness, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("simulated store failure")

    monkeypatch.setattr(harness.store, "mailbox_status", broken)

    def check():
        client = raw_connect(harness, login=True)
        client.send(b"a STATUS INBOX (MESSAGES)\r\n")
        reply = client.until_tagged(b"a")
        client.send(b"b NOOP\r\n")
        return reply, client.until_tagged(b"b")

    reply, after = await run(check)
    assert re.match(rb"a NO \[SERVERBUG\] internal server error, id [0-9a-f]{8}", reply[-1])
    assert after[-1].startswith(b"b OK")


# --- mailboxes ---------------------------------------------------------------------------


async def test_list_shows_special_use(harness):
    def check():
        client = harness.login()
        typ, lines = client.list()
        typ2, lsub = client.lsub('""', "%")
        typ3, root = client.list('""', '""')
        client.logout()
        return lines, lsub, root

    lines, lsub, root = await run(check)
    text = b"\n".join(lines)
    assert b'(\\HasNoChildren) "/" INBOX' in text
    assert b'(\\HasNoChildren \\Sent) "/" Sent' in text
    assert b'(\\HasNoChildren \\Trash) "/" Trash' in text
    assert b"Outbox" in text
    assert len(lsub) == 6
    assert root == [b'(\\Noselect) "/" ""']


async def test_create_rename_delete_subscribe(harness):
    def check():
        client = harness.login()
        results = {}
        results["create"] = client.create("Projects/2026")
        results["exists"] = client.create("Projects/2026")
        results["percent"] = client.list('""', "%")[1]
        results["children"] = client.list('""', "Projects/*")[1]
        results["parent"] = client.list('""', "Projects")[1]
        results["rename"] = client.rename("Projects/2026", "Projects/Done")
        results["unsubscribe"] = client.unsubscribe("Projects/Done")
        results["lsub"] = client.lsub('""', "Projects/*")[1]
        results["subscribe"] = client.subscribe("Projects/Done")
        results["lsub_again"] = client.lsub('""', "Projects/*")[1]
        results["subscribe_missing"] = client.subscribe("Nowhere")
        client.unsubscribe("Projects/Done")
        results["delete_parent"] = client.delete("Projects")
        results["delete"] = client.delete("Projects/Done")
        results["delete_missing"] = client.delete("Nowhere")
        results["delete_inbox"] = client.delete("INBOX")
        results["delete_trash"] = client.delete("Trash")
        results["rename_deep"] = client.rename("Projects", "Archive/2025/Projects")
        results["deep"] = client.list('""', "Archive/*")[1]
        results["unicode"] = client.create("&AMQ-rger")
        results["unicode_list"] = client.list('""', "&AMQ-rger")[1]
        client.logout()
        return results

    results = await run(check)
    assert results["create"][0] == "OK"
    assert results["exists"][0] == "NO"
    assert b"[ALREADYEXISTS]" in results["exists"][1][0]
    assert results["children"] == [b'(\\HasNoChildren) "/" Projects/2026']
    assert results["parent"] == [b'(\\HasChildren) "/" Projects']
    assert results["rename"][0] == "OK"
    assert results["lsub"] == [None]
    assert results["subscribe"][0] == "OK"
    assert results["lsub_again"] == [b'() "/" Projects/Done']
    assert b"[NONEXISTENT]" in results["subscribe_missing"][1][0]
    assert results["delete_parent"][0] == "NO"
    assert results["delete"][0] == "OK"
    assert b'(\\HasChildren) "/" Projects' in results["percent"]
    assert not any(b"Projects/" in line for line in results["percent"])
    assert results["rename_deep"][0] == "OK"
    assert results["deep"] == [
        b'(\\HasChildren) "/" Archive/2025',
        b'(\\HasNoChildren) "/" Archive/2025/Projects',
    ]
    assert b"[NONEXISTENT]" in results["delete_missing"][1][0]
    assert b"[CANNOT]" in results["delete_inbox"][1][0]
    assert b"[CANNOT]" in results["delete_trash"][1][0]
    assert results["unicode"][0] == "OK"
    assert results["unicode_list"] == [b'(\\HasNoChildren) "/" &AMQ-rger']
    assert await harness.store.get_mailbox(harness.account_id, "Ärger") is not None


async def test_rename_inbox_moves_messages(harness):
    await fill(harness, 3)

    def check():
        client = harness.login()
        typ, _ = client.rename("INBOX", "Old")
        status_inbox = client.status("INBOX", "(MESSAGES)")[1]
        status_old = client.status("Old", "(MESSAGES)")[1]
        client.logout()
        return typ, status_inbox, status_old

    typ, status_inbox, status_old = await run(check)
    assert typ == "OK"
    assert status_inbox == [b'INBOX (MESSAGES 0)']
    assert status_old == [b'Old (MESSAGES 3)']


async def test_status_items(harness):
    await fill(harness, 2)

    def check():
        client = harness.login()
        typ, data = client.status("INBOX", "(MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)")
        missing = client.status("Nowhere", "(MESSAGES)")
        client.logout()
        return data, missing

    data, missing = await run(check)
    assert re.match(rb"INBOX \(MESSAGES 2 RECENT 0 UIDNEXT 3 UIDVALIDITY \d+ UNSEEN 2\)", data[0])
    assert missing[0] == "NO"


async def test_namespace_id_enable_noop_check(harness):
    def check():
        client = harness.login()
        namespace = client.namespace()
        enable = client._simple_command("ENABLE", "CONDSTORE")
        enabled = client.untagged_responses.pop("ENABLED", None)
        client.select("INBOX")
        identity = client.xatom("ID", '("name" "test-client")')
        identity_data = client.untagged_responses.pop("ID", None)
        noop = client.noop()
        check_reply = client.check()
        unselect = client.unselect()
        client.logout()
        return namespace, identity, identity_data, enable, enabled, noop, check_reply, unselect

    namespace, identity, identity_data, enable, enabled, noop, check_reply, unselect = await run(check)
    assert namespace == ("OK", [b'(("" "/")) NIL NIL'])
    assert identity[0] == "OK"
    assert identity_data[0].startswith(b'("name" "mailstack"')
    assert enable[0] == "OK"
    assert enabled == [b""] or enabled == [None]
    assert noop[0] == "OK"
    assert check_reply[0] == "OK"
    assert unselect[0] == "OK"


# --- messages ------------------------------------------------------------------------------


async def test_select_examine_responses(harness):
    await fill(harness, 3)

    def check():
        client = harness.login()
        typ, count = client.select("INBOX")
        responses = dict(client.untagged_responses)
        client.select("INBOX", readonly=True)
        readonly_store = client.store("1", "+FLAGS", "\\Seen")
        client.logout()
        return typ, count, responses, readonly_store

    typ, count, responses, readonly_store = await run(check)
    assert typ == "OK"
    assert count == [b"3"]
    assert b"\\*" in responses["OK"][0] or any(b"PERMANENTFLAGS" in line for line in responses["OK"])
    assert responses["UIDNEXT"] == [b"4"]
    assert readonly_store[0] == "NO"
    assert b"[READ-ONLY]" in readonly_store[1][0]


async def test_append_fetch_roundtrip(harness):
    def check():
        client = harness.login()
        typ, data = client.append("INBOX", "(\\Flagged $Work)", imaplib.Time2Internaldate(1_700_000_000), MULTIPART)
        client.select("INBOX")
        fetched = client.fetch("1", "(FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[] BODY.PEEK[HEADER.FIELDS (Subject)])")
        parts = client.fetch("1", "(BODY.PEEK[1] BODY.PEEK[2.MIME] BODY.PEEK[TEXT]<0.8> BODYSTRUCTURE ENVELOPE)")
        flags_after_peek = client.fetch("1", "(FLAGS)")
        body = client.fetch("1", "(BODY[1])")
        rfc822 = client.fetch("1", "(RFC822.HEADER RFC822.TEXT)")
        client.logout()
        return typ, data, fetched, parts, flags_after_peek, body, rfc822

    typ, data, fetched, parts, flags_after_peek, body, rfc822 = await run(check)
    assert typ == "OK"
    assert re.match(rb"\[APPENDUID \d+ 1\]", data[0])
    envelope = fetched[1][0][0]
    assert b"FLAGS (\\Flagged $Work)" in envelope
    assert b'INTERNALDATE "14-Nov-2023' in envelope
    assert b"RFC822.SIZE %d" % len(MULTIPART) in envelope
    assert fetched[1][0][1] == MULTIPART
    assert fetched[1][1][1] == b"Subject: parts\r\n\r\n"
    assert parts[1][0][1] == b"first part"
    assert parts[1][1][1] == b"Content-Type: text/html\r\n\r\n"
    assert parts[1][2][1] == b"preamble"
    tail = parts[1][-1]
    assert b'BODYSTRUCTURE (("TEXT" "PLAIN"' in tail.upper()
    assert b'"MIXED"' in tail.upper()
    assert b'ENVELOPE (NIL "parts" ((NIL NIL "alice" "here.test"))' in tail
    assert b"\\Seen" not in flags_after_peek[1][0]
    # BODY[1] without PEEK sets \Seen, and the response carries the new flags.
    assert body[1][1] == b" FLAGS (\\Seen \\Flagged $Work))"
    assert rfc822[1][0][1].endswith(b"\r\n\r\n")


async def test_append_to_outbox_cannot(harness):
    def check():
        client = harness.login()
        reply = client.append("Outbox", None, None, message(1))
        missing = client.append("Nowhere", None, None, message(1))
        client.logout()
        return reply, missing

    reply, missing = await run(check)
    assert reply[0] == "NO"
    assert b"[CANNOT]" in reply[1][0]
    assert b"[TRYCREATE]" in missing[1][0]


async def test_store_search_expunge(harness):
    await fill(harness, 5)

    def check():
        client = harness.login()
        client.select("INBOX")
        results = {}
        results["store"] = client.store("2:3", "+FLAGS", "(\\Seen)")
        results["silent"] = client.store("4", "+FLAGS.SILENT", "(\\Flagged $Later)")
        results["flags"] = client.untagged_responses.pop("FLAGS", None)
        results["recent"] = client.store("1", "+FLAGS", "(\\Recent)")
        results["unseen"] = client.search(None, "UNSEEN")
        results["seen"] = client.uid("SEARCH", None, "SEEN")
        results["or"] = client.search(None, "OR", "FLAGGED", "1")
        results["keyword"] = client.search(None, "KEYWORD", "$later")
        results["subject"] = client.search(None, "SUBJECT", "hello 3")
        results["body"] = client.search("UTF-8", "BODY", "message 5")
        results["not"] = client.search(None, "NOT", "1:3")
        results["larger"] = client.search(None, "LARGER", "10", "SMALLER", "100000")
        results["sent"] = client.search(None, "SENTON", "4-Dec-2026")
        results["since"] = client.search(None, "SINCE", "1-Jan-2000", "BEFORE", "1-Jan-2100")
        results["charset"] = client.search("KOI8-R", "ALL")
        results["delete"] = client.store("1:2", "+FLAGS", "(\\Deleted)")
        results["expunge"] = client.expunge()
        results["after"] = client.search(None, "ALL")
        results["uid_after"] = client.uid("SEARCH", None, "ALL")
        client.logout()
        return results

    results = await run(check)
    assert results["store"][1] == [b"2 (FLAGS (\\Seen))", b"3 (FLAGS (\\Seen))"]
    assert results["silent"][1] == [None]
    assert results["flags"] is not None
    assert b"$Later" in results["flags"][-1]
    assert results["recent"][0] == "NO"
    assert results["unseen"][1] == [b"1 4 5"]
    assert results["seen"][1] == [b"2 3"]
    assert results["or"][1] == [b"1 4"]
    assert results["keyword"][1] == [b"4"]
    assert results["subject"][1] == [b"3"]
    assert results["body"][1] == [b"5"]
    assert results["not"][1] == [b"4 5"]
    assert results["larger"][1] == [b"1 2 3 4 5"]
    assert results["sent"][1] == [b"1 2 3 4 5"]
    assert results["since"][1] == [b"1 2 3 4 5"]
    assert results["charset"][0] == "NO"
    assert b"[BADCHARSET" in results["charset"][1][0]
    assert results["expunge"][1] == [b"2", b"1"]
    assert results["after"][1] == [b"1 2 3"]
    assert results["uid_after"][1] == [b"3 4 5"]


async def test_search_key_count_bounded(harness):
    await fill(harness, 100)
    # 50 ranges per set, the most that still becomes SQL: the heaviest keys for the query.
    odd_numbers = ",".join(str(number) for number in range(1, 100, 2)).encode()

    def check():
        client = raw_connect(harness, login=True)
        client.send(b"s SELECT INBOX\r\n")
        client.until_tagged(b"s")
        replies = {}
        commands = {
            b"a": b"SEARCH" + b" UNSEEN" * 1000,
            b"b": b"SEARCH" + b" UNSEEN" * 257,
            b"c": b"SEARCH" + b" NOT (UNSEEN" + b" UNSEEN" * 255 + b")",
            b"d": b"SEARCH" + b" UNSEEN" * 256,
            b"e": b"SEARCH" + b" " + b" ".join([odd_numbers] * 256),
            b"f": b"SEARCH" + b" OR (UNSEEN" + b" UNSEEN" * 127 + b") (SEEN" + b" SEEN" * 126 + b")",
        }
        for tag, command in commands.items():
            client.send(tag + b" " + command + b"\r\n")
            replies[tag] = client.until_tagged(tag)
        return replies

    replies = await run(check)
    assert replies[b"a"][-1].startswith(b"a BAD")
    assert b"256" in replies[b"a"][-1]
    assert replies[b"b"][-1].startswith(b"b BAD")
    assert replies[b"c"][-1].startswith(b"c BAD")
    assert replies[b"d"][-1].startswith(b"d OK")
    assert replies[b"d"][0] == b"* SEARCH " + b" ".join(b"%d" % number for number in range(1, 101))
    assert replies[b"e"][-1].startswith(b"e OK")
    assert replies[b"e"][0] == b"* SEARCH " + odd_numbers.replace(b",", b" ")
    assert replies[b"f"][-1].startswith(b"f OK")


async def test_store_append_flag_checks(harness, monkeypatch):
    monkeypatch.setattr(session_module, "MAX_KEYWORDS", 5)
    await fill(harness, 1)
    small = b"Subject: x\r\n\r\nbody\r\n"

    def append(client: RawClient, tag: bytes, flags: bytes) -> list[bytes]:
        client.send(tag + b" APPEND INBOX (" + flags + b") {%d+}\r\n" % len(small) + small + b"\r\n")
        return client.until_tagged(tag)

    def check():
        client = raw_connect(harness, login=True)
        client.send(b"s SELECT INBOX\r\n")
        client.until_tagged(b"s")
        client.send(b"t STORE 1 FLAGS (\\Seen \\Flagged)\r\n")
        client.until_tagged(b"t")
        replies = {}
        for tag, command in (
            (b"a", b"STORE 1 FLAGS (\\Bogus)"),
            (b"b", b"STORE 1 +FLAGS (\\Answered \\Bogus)"),
            (b"c", b"FETCH 1 FLAGS"),
            (b"d", b"STORE 1 +FLAGS (k" + b"x" * 256 + b")"),
            (b"e", b"STORE 1 +FLAGS.SILENT (k1 k2 k3 k4 K5)"),
            (b"f", b"STORE 1 +FLAGS (k6)"),
            (b"g", b"STORE 1 +FLAGS (K1 k2)"),
            (b"h", b"FETCH 1 FLAGS"),
        ):
            client.send(tag + b" " + command + b"\r\n")
            replies[tag] = client.until_tagged(tag)
        replies[b"i"] = append(client, b"i", b"\\Bogus")
        replies[b"j"] = append(client, b"j", b"\\Recent")
        replies[b"k"] = append(client, b"k", b"k6")
        replies[b"l"] = append(client, b"l", b"\\Seen k3")
        return replies

    replies = await run(check)
    assert replies[b"a"][-1].startswith(b"a BAD")
    assert replies[b"b"][-1].startswith(b"b BAD")
    assert replies[b"c"][0] == b"* 1 FETCH (FLAGS (\\Seen \\Flagged))"
    assert replies[b"d"][-1].startswith(b"d NO [LIMIT]")
    assert replies[b"e"][-1].startswith(b"e OK")
    assert replies[b"f"][-1].startswith(b"f NO [LIMIT]")
    assert replies[b"g"][-1].startswith(b"g OK")
    assert replies[b"h"][0] == b"* 1 FETCH (FLAGS (\\Seen \\Flagged k1 k2 k3 k4 K5))"
    assert replies[b"i"][-1].startswith(b"i BAD")
    assert replies[b"j"][-1].startswith(b"j NO [CANNOT]")
    assert replies[b"k"][-1].startswith(b"k NO [LIMIT]")
    assert replies[b"l"][-1].startswith(b"l OK [APPENDUID")


async def test_sequence_number_above_count_is_bad(harness):
    await fill(harness, 2)

    def check():
        client = harness.login()
        client.select("INBOX")
        try:
            client.fetch("3", "(FLAGS)")
            reply = "OK"
        except imaplib.IMAP4.error as exc:
            reply = str(exc)
        reversed_range = client.fetch("2:1", "(UID)")
        star = client.fetch("*:1", "(UID)")
        uid_beyond = client.uid("FETCH", "100:*", "(FLAGS)")
        client.logout()
        return reply, reversed_range, star, uid_beyond

    reply, reversed_range, star, uid_beyond = await run(check)
    assert "BAD" in reply or "invalid" in reply
    assert reversed_range[1] == [b"1 (UID 1)", b"2 (UID 2)"]
    assert star[1] == [b"1 (UID 1)", b"2 (UID 2)"]
    # "100:*" contains the highest UID, 2, whatever the order (RFC 3501 section 6.4.8).
    assert uid_beyond[1] == [b"2 (UID 2 FLAGS ())"]


async def test_copy_and_move_to_trash(harness):
    await fill(harness, 4)

    def check():
        client = harness.login()
        client.select("INBOX")
        copy = client.copy("1:2", "Sent")
        move = client.uid("MOVE", "3", "Trash")
        expunges = client.untagged_responses.pop("EXPUNGE", None)
        copyuid = client.untagged_responses.pop("OK", None)
        missing = client.copy("1", "Nowhere")
        outbox = client.copy("1", "Outbox")
        remaining = client.uid("SEARCH", None, "ALL")
        trash = client.status("Trash", "(MESSAGES)")
        sent = client.status("Sent", "(MESSAGES)")
        client.logout()
        return copy, move, expunges, copyuid, missing, outbox, remaining, trash, sent

    copy, move, expunges, copyuid, missing, outbox, remaining, trash, sent = await run(check)
    assert re.match(rb"\[COPYUID \d+ 1:2 1:2\]", copy[1][0])
    assert move[0] == "OK"
    assert expunges == [b"3"]
    assert any(b"COPYUID" in line for line in copyuid)
    assert b"[TRYCREATE]" in missing[1][0]
    assert b"[CANNOT]" in outbox[1][0]
    assert remaining[1] == [b"1 2 4"]
    assert trash[1] == [b"Trash (MESSAGES 1)"]
    assert sent[1] == [b"Sent (MESSAGES 2)"]


async def test_close_expunges_unselect_does_not(harness):
    await fill(harness, 3)

    def check():
        client = harness.login()
        client.select("INBOX")
        client.store("1", "+FLAGS", "(\\Deleted)")
        client.unselect()
        after_unselect = client.status("INBOX", "(MESSAGES)")
        client.select("INBOX")
        client.close()
        after_close = client.status("INBOX", "(MESSAGES)")
        client.select("INBOX")
        client.store("1", "+FLAGS", "(\\Deleted)")
        uid_expunge = client.uid("EXPUNGE", "3")
        after_uid_expunge = client.status("INBOX", "(MESSAGES)")
        client.logout()
        return after_unselect, after_close, uid_expunge, after_uid_expunge

    after_unselect, after_close, uid_expunge, after_uid_expunge = await run(check)
    assert after_unselect[1] == [b"INBOX (MESSAGES 3)"]
    assert after_close[1] == [b"INBOX (MESSAGES 2)"]
    # UID EXPUNGE 3 leaves UID 2, which is \Deleted but not in the set.
    assert uid_expunge[0] == "OK"
    assert after_uid_expunge[1] == [b"INBOX (MESSAGES 2)"]


async def test_expunge_from_outbox_cancels_delivery(harness):
    queue_id = await harness.store.submit(
        message(1),
        account_id=harness.account_id,
        envelope_sender="bob@here.test",
        local_account_ids=[],
        remote_recipients=["carol@there.test"],
    )

    def check():
        client = harness.login()
        client.select("Outbox")
        fetched = client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (Subject)])")
        client.store("1", "+FLAGS", "(\\Deleted)")
        expunged = client.expunge()
        client.logout()
        return fetched, expunged

    fetched, expunged = await run(check)
    assert fetched[1][0][1] == b"Subject: hello 1\r\n\r\n"
    assert expunged[1] == [b"1"]
    from sqlalchemy import select

    async with harness.store.read() as session:
        states = list(await session.scalars(select(Delivery.state).where(Delivery.queue_id == queue_id)))
    # The only delivery was cancelled, so the message left the queue.
    assert states == []
    assert await harness.store.list_queue() == []


# --- several sessions and IDLE ----------------------------------------------------------


async def test_two_sessions_see_each_other(harness):
    await fill(harness, 3)

    def check():
        first = harness.login()
        second = harness.login()
        first.select("INBOX")
        second.select("INBOX")
        first.store("1", "+FLAGS", "(\\Flagged)")
        first.store("2", "+FLAGS", "(\\Deleted)")
        first.expunge()
        first.append("INBOX", None, None, message(9))
        # A FETCH must not carry EXPUNGE: the flag change arrives, the expunge waits.
        second.untagged_responses.pop("EXISTS", None)
        fetch = second.fetch("1:3", "(UID)")
        pending_expunge = second.untagged_responses.pop("EXPUNGE", None)
        exists = second.untagged_responses.pop("EXISTS", None)
        noop = second.noop()
        expunge_after_noop = second.untagged_responses.pop("EXPUNGE", None)
        flags_seen = second.untagged_responses.pop("FETCH", None)
        first.logout()
        second.logout()
        return fetch, pending_expunge, exists, noop, expunge_after_noop, flags_seen

    fetch, pending_expunge, exists, noop, expunge_after_noop, flags_seen = await run(check)
    assert pending_expunge is None
    assert exists == [b"4"]
    assert expunge_after_noop == [b"2"]
    # The flag change made by the first session arrives with the FETCH as an untagged FETCH FLAGS.
    assert b"1 (UID 1 FLAGS (\\Flagged))" in fetch[1]
    assert flags_seen is None


async def test_idle_sees_delivery_quickly(harness):
    await fill(harness, 1)
    loop = asyncio.get_running_loop()

    def idle_client(ready: asyncio.Event, arrived: list):
        client = harness.login()
        client.select("INBOX")
        tag = client._new_tag()
        client.send(tag + b" IDLE\r\n")
        assert client.readline().startswith(b"+")
        loop.call_soon_threadsafe(ready.set)
        line = client.readline()
        arrived.append((loop.time(), line))
        client.send(b"DONE\r\n")
        done = client.readline()
        client.logout()
        return done

    ready = asyncio.Event()
    arrived: list = []
    task = asyncio.ensure_future(run(idle_client, ready, arrived))
    await asyncio.wait_for(ready.wait(), 10)
    await harness.store.deliver_local(message(2), [harness.account_id])
    # deliver_local returns right after its commit: the latency is counted from there.
    committed_at = loop.time()
    done = await asyncio.wait_for(task, 10)
    arrival, line = arrived[0]
    assert line == b"* 2 EXISTS\r\n"
    assert arrival - committed_at < 0.1
    assert done.endswith(b"OK IDLE terminated\r\n")


async def test_idle_sees_other_process_change(harness, tmp_path):
    await fill(harness, 1)
    loop = asyncio.get_running_loop()
    sessions = 3
    ready = [asyncio.Event() for _ in range(sessions)]
    arrived: list = []

    def idle_client(index: int):
        client = harness.login()
        client.select("INBOX")
        tag = client._new_tag()
        client.send(tag + b" IDLE\r\n")
        client.readline()
        loop.call_soon_threadsafe(ready[index].set)
        arrived.append((loop.time(), client.readline()))
        client.send(b"DONE\r\n")
        client.readline()
        client.logout()

    tasks = [asyncio.ensure_future(run(idle_client, index)) for index in range(sessions)]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in ready)), 10)
    # A second Store on the same file stands for another process: its commits call no listener here.
    other = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}")
    try:
        inbox = await other.get_mailbox(harness.account_id, "INBOX")
        await other.store_flags(inbox.id, [1], FlagMode.ADD, int(Flag.SEEN))
        committed_at = loop.time()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        await other.close()
    assert len(arrived) == sessions
    for arrival, line in arrived:
        assert line.startswith(b"* 1 FETCH (UID 1 FLAGS (\\Seen))")
        assert arrival - committed_at < 1.0


# --- aioimaplib and curl -----------------------------------------------------------------------


async def test_aioimaplib_session(harness):
    aioimaplib = pytest.importorskip("aioimaplib")
    await fill(harness, 2)
    client = aioimaplib.IMAP4_SSL(host=HOST, port=harness.tls_port, ssl_context=harness.client_context(), timeout=10)
    await client.wait_hello_from_server()
    login = await client.login("bob@here.test", PASSWORD)
    assert login.result == "OK"
    select = await client.select("INBOX")
    assert select.result == "OK"
    fetch = await client.uid("fetch", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert fetch.result == "OK"
    assert any(b"Subject: hello 2" in line for line in fetch.lines if isinstance(line, (bytes, bytearray)))
    idle = await client.idle_start(timeout=5)
    await harness.store.deliver_local(message(3), [harness.account_id])
    pushed = await asyncio.wait_for(client.wait_server_push(), 5)
    client.idle_done()
    await asyncio.wait_for(idle, 5)
    assert any(b"3 EXISTS" in bytes(line) for line in pushed)
    move = await client.uid("move", "1", "Trash")
    assert move.result == "OK"
    logout = await client.logout()
    assert logout.result == "OK"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_lists_and_fetches(harness):
    await fill(harness, 2)
    base = f"imaps://{HOST}:{harness.tls_port}"
    common = ["curl", "--silent", "--show-error", "--cacert", harness.ca_file, "--user", f"bob@here.test:{PASSWORD}"]
    listing = await asyncio.to_thread(subprocess.run, common + [base + "/"], capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert b"INBOX" in listing.stdout
    fetched = await asyncio.to_thread(
        subprocess.run, common + [base + "/INBOX;UID=2"], capture_output=True, timeout=30
    )
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == message(2)
    starttls = await asyncio.to_thread(
        subprocess.run,
        common + ["--ssl-reqd", f"imap://{HOST}:{harness.port}/INBOX;UID=1"],
        capture_output=True,
        timeout=30,
    )
    assert starttls.returncode == 0, starttls.stderr
    assert starttls.stdout == message(1)


# --- protocol corners over a raw connection -------------------------------------------------


async def test_authenticate_continuation_and_cancel(harness):
    import base64

    def check():
        client = raw_connect(harness)
        client.send(b"a AUTHENTICATE PLAIN\r\n")
        challenge = client.line()
        client.send(b"*\r\n")
        cancelled = client.until_tagged(b"a")
        client.send(b"b AUTHENTICATE PLAIN\r\n")
        client.line()
        client.send(base64.b64encode(b"\0bob@here.test\0" + PASSWORD.encode()) + b"\r\n")
        accepted = client.until_tagged(b"b")
        # SASL-IR: the initial response on the command line, on a second connection.
        other = raw_connect(harness)
        other.send(b"d AUTHENTICATE PLAIN " + base64.b64encode(b"\0bob@here.test\0" + PASSWORD.encode()) + b"\r\n")
        initial_response = other.until_tagged(b"d")
        client.send(b"c AUTHENTICATE PLAIN\r\n")
        again = client.until_tagged(b"c")
        return challenge, cancelled, accepted, again, initial_response

    challenge, cancelled, accepted, again, initial_response = await run(check)
    assert initial_response[-1].startswith(b"d OK")
    assert challenge == b"+ "
    assert cancelled[-1].startswith(b"a BAD")
    assert accepted[-1].startswith(b"b OK [CAPABILITY IMAP4rev1")
    assert again[-1].startswith(b"c BAD")


async def test_authenticate_rejected_before_continuation(harness):
    """AUTHENTICATE that cannot succeed gets its NO at once, so no credentials are sent."""

    def check():
        sock = socket.create_connection((HOST, harness.port), timeout=5)
        plain = RawClient(sock)
        plain.line()
        plain.send(b"a1 AUTHENTICATE PLAIN\r\n")
        before_tls = plain.line()
        plain.send(b"a2 AUTHENTICATE CRAM-MD5\r\n")
        unknown_before_tls = plain.line()
        plain.send(b"a3 NOOP\r\n")
        after = plain.until_tagged(b"a3")
        secure = raw_connect(harness)
        secure.send(b"b1 AUTHENTICATE CRAM-MD5\r\n")
        unknown_mechanism = secure.line()
        secure.send(b"b2 NOOP\r\n")
        return before_tls, unknown_before_tls, after, unknown_mechanism, secure.until_tagged(b"b2")

    before_tls, unknown_before_tls, after, unknown_mechanism, secure_after = await run(check)
    assert before_tls.startswith(b"a1 NO [PRIVACYREQUIRED]")
    assert unknown_before_tls.startswith(b"a2 NO [PRIVACYREQUIRED]")
    assert after == [b"a3 OK NOOP completed"]
    assert unknown_mechanism.startswith(b"b1 NO [CANNOT]")
    assert secure_after == [b"b2 OK NOOP completed"]


async def test_commands_checked_against_state(harness):
    def check():
        client = raw_connect(harness)
        replies = {}
        for tag, command in ((b"a", b"SELECT INBOX"), (b"b", b"FETCH 1 FLAGS"), (b"c", b"ID NIL")):
            client.send(tag + b" " + command + b"\r\n")
            replies[tag] = client.until_tagged(tag)
        client.send(b"d LOGIN bob@here.test \"" + PASSWORD.encode() + b"\"\r\n")
        client.until_tagged(b"d")
        for tag, command in ((b"e", b"FETCH 1 FLAGS"), (b"f", b"STARTTLS"), (b"g", b"LOGIN x y")):
            client.send(tag + b" " + command + b"\r\n")
            replies[tag] = client.until_tagged(tag)
        return replies

    replies = await run(check)
    assert replies[b"a"][-1].startswith(b"a BAD")
    assert replies[b"b"][-1].startswith(b"b BAD")
    assert replies[b"c"][0].startswith(b'* ID ("name" "mailstack"')
    assert replies[b"c"][-1].startswith(b"c OK")
    assert replies[b"e"][-1].startswith(b"e BAD")
    assert replies[b"f"][-1].startswith(b"f BAD")
    assert replies[b"g"][-1].startswith(b"g BAD")


async def test_new_keyword_announced_to_other_session(harness):
    await fill(harness, 1)

    def check():
        first = raw_connect(harness, login=True)
        second = raw_connect(harness, login=True)
        for client in (first, second):
            client.send(b"s SELECT INBOX\r\n")
            client.until_tagged(b"s")
        first.send(b"a STORE 1 +FLAGS ($Important)\r\n")
        first_lines = first.until_tagged(b"a")
        second.send(b"b NOOP\r\n")
        second_lines = second.until_tagged(b"b")
        return first_lines, second_lines

    first_lines, second_lines = await run(check)
    assert b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Important)" in first_lines
    assert b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Important)" in second_lines
    assert b"* 1 FETCH (UID 1 FLAGS ($Important))" in second_lines


async def test_shutdown_lets_running_command_finish(harness):
    await fill(harness, 1)
    started = asyncio.Event()
    release = asyncio.Event()
    original = harness.store.mailbox_status

    async def slow_status(mailbox_id):
        started.set()
        await release.wait()
        return await original(mailbox_id)

    harness.store.mailbox_status = slow_status

    def client_side():
        client = raw_connect(harness, login=True)
        client.send(b"a STATUS INBOX (MESSAGES)\r\n")
        lines = client.until_tagged(b"a")
        bye = client.line()
        return lines, bye

    task = asyncio.ensure_future(run(client_side))
    await asyncio.wait_for(started.wait(), 10)
    closing = asyncio.ensure_future(harness.server.close(5))
    await asyncio.sleep(0)
    release.set()
    await asyncio.wait_for(closing, 10)
    lines, bye = await asyncio.wait_for(task, 10)
    assert lines == [b"* STATUS INBOX (MESSAGES 1)", b"a OK STATUS completed"]
    assert bye.startswith(b"* BYE")


async def test_hostile_input_gets_bad_not_crash(harness):
    await fill(harness, 1)
    hostile = [
        b"a1 FETCH 1 " + b"(" * 500 + b"FLAGS" + b")" * 500,
        b"a2 SEARCH " + b"NOT " * 200 + b"ALL",
        b"a3 SELECT \x00INBOX",
        b"a4 LOGIN \xff\xfe \"x\"",
        b"a5 FETCH 1 (BODY[1.2.3.4.5.6.7.8.9.HEADER.FIELDS ()])",
        b"a6 STORE 1 +FLAGS (\\Bogus",
        b"a7 APPEND INBOX {99999999999999999999}",
        b"a8 UID FETCH 0:* FLAGS",
        b"\xc3\xa9 NOOP",
    ]

    def check():
        client = raw_connect(harness, login=True)
        client.send(b"s SELECT INBOX\r\n")
        client.until_tagged(b"s")
        replies = []
        for line in hostile:
            client.send(line + b"\r\n")
            replies.append(client.line())
            while replies[-1].startswith(b"* ") and not replies[-1].startswith(b"* BAD"):
                replies[-1] = client.line()
        client.send(b"z NOOP\r\n")
        return replies, client.until_tagged(b"z")

    replies, after = await run(check)
    for line, reply in zip(hostile, replies):
        assert b" BAD " in reply or b" NO " in reply, (line, reply)
    assert after[-1] == b"z OK NOOP completed"


async def test_fetch_and_search_in_size_bounded_batches(harness, monkeypatch):
    from mailstack.imap import search as search_module
    from mailstack.imap import session as session_module

    # Limits below one message: every message is read in a batch of its own.
    monkeypatch.setattr(session_module, "FETCH_BATCH_BYTES", 10)
    monkeypatch.setattr(search_module, "CONTENT_BATCH_BYTES", 10)
    await fill(harness, 5)

    def check():
        client = harness.login()
        client.select("INBOX")
        fetched = client.fetch("1:5", "(BODY.PEEK[])")
        found = client.search(None, "TEXT", "message 4")
        client.logout()
        return fetched, found

    fetched, found = await run(check)
    bodies = [item[1] for item in fetched[1] if isinstance(item, tuple)]
    assert bodies == [message(number) for number in range(1, 6)]
    assert found[1] == [b"4"]


async def test_other_process_change_at_next_command(harness, tmp_path, monkeypatch):
    from mailstack.imap import session as session_module

    # With no wait between reads, the next command after the commit must report it.
    monkeypatch.setattr(session_module, "RECHECK_INTERVAL", 0.0)
    await fill(harness, 2)
    other = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}")
    try:
        def select_only():
            client = raw_connect(harness, login=True)
            client.send(b"s SELECT INBOX\r\n")
            client.until_tagged(b"s")
            return client

        client = await run(select_only)
        inbox = await other.get_mailbox(harness.account_id, "INBOX")
        await other.store_flags(inbox.id, [2], FlagMode.ADD, int(Flag.FLAGGED))
        await other.append(inbox.id, message(3))

        def noop():
            client.send(b"n NOOP\r\n")
            return client.until_tagged(b"n")

        lines = await run(noop)
    finally:
        await other.close()
    assert lines == [b"* 3 EXISTS", b"* 2 FETCH (UID 2 FLAGS (\\Flagged))", b"n OK NOOP completed"]


async def test_chained_literals_capped_per_command(harness):
    def check():
        client = raw_connect(harness)
        chunk = b"x" * 6000
        # Each literal is under the 8 KiB allowed before login, but together they are not.
        client.send(b"a ID (\"k1\" {6000}\r\n")
        replies = [client.line()]
        client.send(chunk + b" \"k2\" {6000}\r\n")
        replies.append(client.line())
        client.send(chunk + b" \"k3\" {6000}\r\n")
        replies.append(client.line())
        client.send(b"b NOOP\r\n")
        return replies, client.until_tagged(b"b")

    replies, after = await run(check)
    assert replies[0].startswith(b"+")
    assert replies[1].startswith(b"+")
    assert replies[2].startswith(b"a BAD")
    assert after[-1] == b"b OK NOOP completed"


async def test_rename_by_other_session_ends_selected(harness, monkeypatch):
    from mailstack.imap import session as session_module

    monkeypatch.setattr(session_module, "RECHECK_INTERVAL", 0.0)
    await harness.store.create_mailbox(harness.account_id, "Projects")

    def check():
        first = raw_connect(harness, login=True)
        second = raw_connect(harness, login=True)
        first.send(b"s SELECT Projects\r\n")
        first.until_tagged(b"s")
        second.send(b"r RENAME Projects Done\r\n")
        renamed = second.until_tagged(b"r")
        first.send(b"n NOOP\r\n")
        return renamed, first.line(), first.closed()

    renamed, line, closed = await run(check)
    assert renamed[-1].startswith(b"r OK")
    assert line == b"* BYE the selected mailbox was renamed by another session"
    assert closed
