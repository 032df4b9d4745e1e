"""`mailstack demo --check`: send mail through the running world as a user would and wait for it.

The clients are the standard library's ``smtplib`` (submission on port 587 with
STARTTLS and AUTH) and ``imaplib`` (IMAP over implicit TLS on port 993), both
trusting only the demo CA. Each step is printed with the time since the check began.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import email.utils
import imaplib
import smtplib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Pause between two looks into a mailbox; the IMAP connection stays open.
POLL_INTERVAL = 0.2


class CheckFailed(Exception):
    """A step of the check did not succeed in time."""


@dataclass(frozen=True)
class Account:
    address: str
    password: str
    server: dict[str, Any]  # the server's entry in world.json

    @classmethod
    def find(cls, world: dict[str, Any], address: str) -> Account:
        for server in world["servers"].values():
            for account in server["accounts"]:
                if account["address"] == address:
                    return cls(address, account["password"], server)
        raise KeyError(address)


def tls_context(world: dict[str, Any]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=world["ca_file"])


def submit(world: dict[str, Any], sender: Account, recipient: str, subject: str, body: str) -> str:
    """Submit one message on the sender's server with STARTTLS and AUTH; return its Message-ID."""
    message = email.message.EmailMessage()
    message["From"] = sender.address
    message["To"] = recipient
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(localtime=True)
    message["Message-ID"] = email.utils.make_msgid(domain=sender.address.split("@")[1])
    message.set_content(body)
    server = sender.server
    with smtplib.SMTP(server["address"], server["ports"]["submission"], timeout=30) as client:
        client.starttls(context=tls_context(world))
        client.login(sender.address, sender.password)
        client.send_message(message)
    return message["Message-ID"]


def wait_for_message(
    world: dict[str, Any],
    owner: Account,
    matches: Callable[[email.message.EmailMessage], bool],
    timeout: float,
    mailbox: str = "INBOX",
) -> email.message.EmailMessage:
    """Return the first message in ``owner``'s ``mailbox`` for which ``matches`` is true.

    Raise CheckFailed when none has arrived within ``timeout`` seconds.
    """
    server = owner.server
    deadline = time.monotonic() + timeout
    seen: set[bytes] = set()
    with imaplib.IMAP4_SSL(
        server["address"], server["ports"]["imaps"], ssl_context=tls_context(world), timeout=30
    ) as client:
        client.login(owner.address, owner.password)
        client.select(mailbox, readonly=True)
        while True:
            status, data = client.uid("SEARCH", "ALL")
            if status != "OK":
                raise CheckFailed(f"UID SEARCH in {owner.address}'s {mailbox} failed: {data!r}")
            for uid in data[0].split():
                if uid in seen:
                    continue
                seen.add(uid)
                status, parts = client.uid("FETCH", uid.decode(), "(BODY.PEEK[])")
                raw = next((part[1] for part in parts if isinstance(part, tuple)), None)
                if status != "OK" or raw is None:
                    raise CheckFailed(f"UID FETCH {uid.decode()} in {owner.address}'s {mailbox} failed: {parts!r}")
                message = email.message_from_bytes(raw, policy=email.policy.default)
                if matches(message):
                    return message  # type: ignore[return-value]
            if time.monotonic() >= deadline:
                raise CheckFailed(f"nothing matching arrived in {owner.address}'s {mailbox} within {timeout:.0f} s")
            time.sleep(POLL_INTERVAL)
            client.noop()


def has_message_id(message_id: str) -> Callable[[email.message.EmailMessage], bool]:
    return lambda message: (message["Message-ID"] or "").strip() == message_id


def is_bounce_of(message_id: str) -> Callable[[email.message.EmailMessage], bool]:
    """Match a delivery status notification (RFC 3464) that quotes ``message_id``."""

    def matches(message: email.message.EmailMessage) -> bool:
        if message.get_content_type() != "multipart/report":
            return False
        return message_id.encode() in message.as_bytes()

    return matches


async def run_check(world: dict[str, Any], echo: Callable[[str], None], timeout: float = 60.0) -> bool:
    """Send alice to bob, bob to alice and alice to an unknown user; return True if all arrived."""
    started = time.monotonic()

    def step(text: str) -> None:
        echo(f"[{time.monotonic() - started:7.2f} s] {text}")

    alice = Account.find(world, "alice@here.test")
    bob = Account.find(world, "bob@there.test")
    unknown = "nobody@there.test"
    results = []

    async def deliver(sender: Account, recipient: Account, subject: str) -> bool:
        label = f"{sender.address} -> {recipient.address}"
        try:
            message_id = await asyncio.to_thread(submit, world, sender, recipient.address, subject, f"{subject}\n")
            step(f"{label}: accepted by {sender.server['hostname']} (Message-ID {message_id})")
            await asyncio.to_thread(wait_for_message, world, recipient, has_message_id(message_id), timeout)
        except (OSError, smtplib.SMTPException, imaplib.IMAP4.error, CheckFailed) as exc:
            step(f"{label}: FAILED: {exc}")
            return False
        step(f"{label}: arrived in {recipient.address}'s INBOX")
        return True

    async def bounce(sender: Account, recipient: str) -> bool:
        label = f"{sender.address} -> {recipient}"
        try:
            message_id = await asyncio.to_thread(submit, world, sender, recipient, "To nobody", "This should bounce.\n")
            step(f"{label}: accepted by {sender.server['hostname']} (Message-ID {message_id})")
            report = await asyncio.to_thread(wait_for_message, world, sender, is_bounce_of(message_id), timeout)
        except (OSError, smtplib.SMTPException, imaplib.IMAP4.error, CheckFailed) as exc:
            step(f"{label}: FAILED: {exc}")
            return False
        step(f"{label}: bounce arrived in {sender.address}'s INBOX ({report['Subject']})")
        return True

    step("world ready; sending")
    results.append(await deliver(alice, bob, "Hello from alice"))
    results.append(await deliver(bob, alice, "Re: Hello from alice"))
    results.append(await bounce(alice, unknown))
    passed = sum(results)
    verdict = "passed" if all(results) else "FAILED"
    step(f"check {verdict}: {passed} of {len(results)} arrived")
    return all(results)
