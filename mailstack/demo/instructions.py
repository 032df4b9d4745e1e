"""The text `mailstack demo` prints once every server responds: passwords, CA and commands to paste."""

from __future__ import annotations

import shlex
from typing import Any


def _account(world: dict[str, Any], domain: str) -> tuple[dict[str, Any], dict[str, Any]]:
    server = world["servers"][domain]
    return server, server["accounts"][0]


def _shell_word(text: str) -> str:
    """Quote ``text`` for a POSIX shell, in double quotes when that needs no escapes (easier to read)."""
    if not any(character in text for character in '"$`\\!'):
        return f'"{text}"'
    return shlex.quote(text)


def render(world: dict[str, Any]) -> str:
    """Return the instructions for ``world`` (the content of world.json)."""
    ca = shlex.quote(world["ca_file"])
    bluebook = world["bluebook"]
    here, alice = _account(world, "here.test")
    there, bob = _account(world, "there.test")
    lines = [
        "",
        "mailstack demo is running. Stop it with Ctrl-C.",
        "",
        f"Data folder:  {world['data_dir']}  (world.json there has everything below)",
        f"CA to trust:  {world['ca_file']}",
    ]
    if world["port_offset"]:
        lines.append(
            f"Ports:        standard port + {world['port_offset']} (this process may not bind ports below 1024)"
        )
    lines += [
        "",
        f"Blue Book     {bluebook['address']} port {bluebook['port']} (DNS, UDP and TCP)",
    ]
    for server in (here, there):
        ports = server["ports"]
        lines.append(
            f"{server['domain']:<13} {server['address']} ({server['hostname']}): SMTP {ports['smtp']}, "
            f"submission {ports['submission']} (STARTTLS) and {ports['submissions']} (TLS), "
            f"IMAP {ports['imap']} (STARTTLS) and {ports['imaps']} (TLS)"
        )
    lines += ["", "Accounts"]
    for server, account in ((here, alice), (there, bob)):
        lines.append(f"  {account['address']:<18} password {account['password']}   (server {server['address']})")

    lines += [
        "",
        "Look up where there.test receives mail:",
        f"  dig @{bluebook['address']} -p {bluebook['port']} MX there.test +norecurse",
        "",
        "Send from alice to bob (submission with STARTTLS and AUTH):",
        "  " + " ".join(
            [
                "swaks",
                f"--server {here['address']}:{here['ports']['submission']}",
                "--tls --tls-verify",
                f"--tls-ca-path {ca}",
                f"--auth PLAIN --auth-user {alice['address']}",
                f"--auth-password {shlex.quote(alice['password'])}",
                f"--from {alice['address']} --to {bob['address']}",
            ]
        ),
        "",
        "List bob's INBOX and read message 1 (IMAP over TLS):",
        f"  curl --cacert {ca} --user {shlex.quote(bob['address'] + ':' + bob['password'])} "
        f"'imaps://{there['address']}:{there['ports']['imaps']}/INBOX?ALL'",
        f"  curl --cacert {ca} --user {shlex.quote(bob['address'] + ':' + bob['password'])} "
        f"'imaps://{there['address']}:{there['ports']['imaps']}/INBOX;UID=1'",
        "",
        "Read bob's INBOX from Python:",
        "  python3 -c " + _shell_word(
            "import imaplib, ssl; "
            f"c = imaplib.IMAP4_SSL({there['address']!r}, {there['ports']['imaps']}, "
            f"ssl_context=ssl.create_default_context(cafile={world['ca_file']!r})); "
            f"c.login({bob['address']!r}, {bob['password']!r}); "
            "print(c.select('INBOX')); print(c.fetch('1:*', '(BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])'))"
        ),
        "",
        "Thunderbird (import the CA first: Settings > Privacy & Security > Certificates >",
        "Manage Certificates > Authorities > Import, and tick 'Trust this CA to identify websites'):",
    ]
    for server, account in ((here, alice), (there, bob)):
        lines.append(
            f"  {account['address']}: IMAP {server['address']} port {server['ports']['imaps']} SSL/TLS, "
            f"SMTP {server['address']} port {server['ports']['submission']} STARTTLS, "
            f"normal password, user name {account['address']}"
        )
    user = alice["address"].replace("@", "%40")
    lines += [
        "",
        "mutt (as alice; put these lines in a muttrc and run mutt -F FILE):",
        f"  set certificate_file = {world['ca_file']}",
        f"  set folder = imaps://{user}@{here['address']}:{here['ports']['imaps']}/",
        "  set spoolfile = +INBOX",
        f"  set imap_pass = {shlex.quote(alice['password'])}",
        f"  set smtp_url = smtp://{user}@{here['address']}:{here['ports']['submission']}/",
        f"  set smtp_pass = {shlex.quote(alice['password'])}",
        "  set ssl_starttls = yes ssl_force_tls = yes",
        f"  set from = {alice['address']}",
        "",
    ]
    return "\n".join(lines)
