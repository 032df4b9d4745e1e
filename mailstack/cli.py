"""The `mailstack` command line."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from mailstack import config as config_module
from mailstack import logs
from mailstack.settings import ROLES, MailServerConfig
from mailstack.store.addresses import AddressError

T = TypeVar("T")

CONFIG_ENV = "MAILSTACK_CONFIG"


# Helpers shared by every command group ---------------------------------------


def run_async(coroutine: Awaitable[T]) -> T:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, as_json: bool, title: str | None = None) -> None:
    """Print ``rows`` as a table, or as a JSON list for scripts."""
    if as_json:
        click.echo(json.dumps(list(rows), indent=2, default=str))
        return
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    Console().print(table)


def load_server_config(path: Path | None) -> MailServerConfig:
    """Load a mail server configuration or exit with the reason."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    try:
        return config_module.load(MailServerConfig, path)
    except config_module.ConfigError as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from None


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help=f"Mail server configuration file (TOML). Default: ${CONFIG_ENV}, else built-in defaults.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


async def with_store(config: MailServerConfig, action: Callable[[Any], Awaitable[T]], *, upgrade: bool = False) -> T:
    """Open the server's store, run ``action(store)`` and close it; store errors exit 1."""
    from mailstack.store import SchemaError, Store, StoreError

    try:
        store = await Store.open(config.database_url, busy_timeout=config.store.busy_timeout, upgrade=upgrade)
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        if upgrade:
            await store.ensure_domains(server_config_domains(config))
        return await action(store)
    except (StoreError, AddressError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        await store.close()


def server_config_domains(config: MailServerConfig) -> tuple[str, ...]:
    return config.server.domains


def read_password(prompt: str, from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt(prompt, hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.ClickException("the password is empty")
    return password


# The root group ---------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default=None,
    help="Lowest level logged. Default: the config file's [log] level, else INFO.",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None, help="Log line format.")
@click.version_option(package_name="mailstack")
@click.pass_context
def main(context: click.Context, log_level: str | None, log_format: str | None) -> None:
    """mailstack: SMTP submission and transfer, IMAP and an authoritative DNS directory."""
    context.ensure_object(dict)
    context.obj["log_level"] = log_level
    context.obj["log_format"] = log_format
    logs.setup(log_level or "WARNING", log_format or "text")


def apply_logging(context: click.Context, config: MailServerConfig) -> None:
    """Set up logging from the command line, falling back to the config's [log] section."""
    logs.setup(context.obj.get("log_level") or config.log.level, context.obj.get("log_format") or config.log.format)


# config -----------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Check configuration files and print option documentation."""


@config_group.command("check")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--bluebook", is_flag=True, help="Check a Blue Book configuration instead of a mail server's.")
@json_option
def config_check(path: Path, bluebook: bool, as_json: bool) -> None:
    """Validate PATH and print the effective configuration, secrets masked."""
    root = _bluebook_config_type() if bluebook else MailServerConfig
    try:
        loaded = config_module.load(root, path)
    except config_module.ConfigError as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from None
    effective = config_module.to_dict(loaded)
    if as_json:
        click.echo(json.dumps(effective, indent=2))
        return
    click.echo(f"# {path}: valid")
    for section, values in effective.items():
        click.echo(f"\n[{section}]")
        for key, value in values.items():
            click.echo(f"{key} = {json.dumps(value)}")


def _bluebook_config_type() -> type:
    try:
        module = importlib.import_module("mailstack.bluebook.config")
    except ModuleNotFoundError:
        raise click.ClickException("the Blue Book is not available in this build") from None
    return module.BlueBookConfig


@config_group.command("docs")
def config_docs() -> None:
    """Print every option as Markdown (the source of docs/configuration.md)."""
    click.echo(render_option_docs(), nl=False)


def render_option_docs() -> str:
    lines = [
        "# Configuration",
        "",
        "Each process reads one TOML file given with `--config FILE`. Every option has a",
        "default that works on one machine, so an empty file is a valid configuration.",
        "An environment variable `MAILSTACK_<SECTION>__<KEY>` overrides the file, for",
        "example `MAILSTACK_SUBMISSION__PORT=2587`; lists are comma-separated there.",
        "Relative paths in a file are relative to that file's folder. An unknown key, a",
        "wrong type, a number out of range or a missing file stops the process before it",
        "binds anything, with a message naming the key and where the value came from.",
        "`mailstack config check FILE` validates a file and prints the effective values.",
        "",
        "This page is generated by `mailstack config docs`.",
    ]
    roots: list[tuple[str, str, type]] = [("Mail server", "mailstack serve --config FILE", MailServerConfig)]
    try:
        roots.append(("Blue Book", "mailstack bluebook serve --config FILE", _bluebook_config_type()))
    except click.ClickException:
        pass
    for title, command, root in roots:
        lines += ["", f"## {title} (`{command}`)"]
        section = None
        for row in config_module.describe_options(root):
            if row["section"] != section:
                section = row["section"]
                lines += ["", f"### [{section}]", "", "| key | type | default | unit | meaning |", "| --- | --- | --- | --- | --- |"]
            default = row["default"]
            if isinstance(default, Path):
                default = str(default)
            elif isinstance(default, tuple):
                default = [str(v) for v in default]
            shown = "(empty)" if default in ("", ".", []) else f"`{json.dumps(default)}`"
            help_text = row["help"].replace("|", "\\|")
            lines.append(f"| `{row['key']}` | {row['type']} | {shown} | {row['unit'] or ''} | {help_text} |")
    return "\n".join(lines) + "\n"


# db -------------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """Manage the database schema."""


@db_group.command("upgrade")
@config_option
def db_upgrade(config_path: Path | None) -> None:
    """Apply every pending schema migration."""
    from mailstack.store import SchemaError, migrate
    from mailstack.store.engine import create_engine

    server_config = load_server_config(config_path)

    async def action() -> tuple[str | None, str]:
        engine = create_engine(server_config.database_url, busy_timeout=server_config.store.busy_timeout)
        try:
            return await migrate.upgrade(engine)
        finally:
            await engine.dispose()

    try:
        before, after = run_async(action())
    except SchemaError as exc:
        raise click.ClickException(str(exc)) from None
    if before == after:
        click.echo(f"database already at revision {after}")
    else:
        click.echo(f"database upgraded from {before or 'empty'} to {after}")


# domain ---------------------------------------------------------------------------


@main.group("domain")
def domain_group() -> None:
    """Add, list and remove the mail domains this server receives for."""


@domain_group.command("add")
@click.argument("name")
@config_option
def domain_add(name: str, config_path: Path | None) -> None:
    """Add domain NAME."""
    server_config = load_server_config(config_path)
    domain = run_async(with_store(server_config, lambda store: store.add_domain(name), upgrade=True))
    click.echo(f"domain {domain.name} added")


@domain_group.command("list")
@config_option
@json_option
def domain_list(config_path: Path | None, as_json: bool) -> None:
    """List the domains with their account counts."""
    server_config = load_server_config(config_path)
    rows = run_async(with_store(server_config, lambda store: store.list_domains(), upgrade=True))
    print_rows(
        [{"domain": d.name, "accounts": count, "created": d.created.isoformat(timespec="seconds")} for d, count in rows],
        ["domain", "accounts", "created"],
        as_json=as_json,
    )


@domain_group.command("remove")
@click.argument("name")
@config_option
def domain_remove(name: str, config_path: Path | None) -> None:
    """Remove domain NAME, which must have no accounts left."""
    server_config = load_server_config(config_path)
    run_async(with_store(server_config, lambda store: store.remove_domain(name), upgrade=True))
    click.echo(f"domain {name} removed")


# user -----------------------------------------------------------------------------


@main.group("user")
def user_group() -> None:
    """Manage accounts. Passwords are read from a prompt or standard input, never from arguments."""


@user_group.command("add")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@config_option
def user_add(address: str, password_stdin: bool, config_path: Path | None) -> None:
    """Create account ADDRESS with INBOX, Outbox, Sent, Drafts, Trash and Junk."""
    server_config = load_server_config(config_path)
    password = read_password(f"Password for {address}", password_stdin)
    account = run_async(with_store(server_config, lambda store: store.create_account(address, password), upgrade=True))
    click.echo(f"account {account.address} created")


@user_group.command("list")
@click.option("--domain", default=None, help="Only accounts of this domain.")
@config_option
@json_option
def user_list(domain: str | None, config_path: Path | None, as_json: bool) -> None:
    """List accounts."""
    server_config = load_server_config(config_path)
    accounts = run_async(with_store(server_config, lambda store: store.list_accounts(domain), upgrade=True))
    print_rows(
        [{"address": a.address, "created": a.created.isoformat(timespec="seconds")} for a in accounts],
        ["address", "created"],
        as_json=as_json,
    )


@user_group.command("passwd")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, help="Read the new password from the first line of standard input.")
@config_option
def user_passwd(address: str, password_stdin: bool, config_path: Path | None) -> None:
    """Set a new password for ADDRESS."""
    server_config = load_server_config(config_path)
    password = read_password(f"New password for {address}", password_stdin)
    run_async(with_store(server_config, lambda store: store.change_password(address, password), upgrade=True))
    click.echo(f"password of {address} changed")


@user_group.command("remove")
@click.argument("address")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_option
def user_remove(address: str, yes: bool, config_path: Path | None) -> None:
    """Remove ADDRESS with all its mailboxes and messages."""
    server_config = load_server_config(config_path)
    if not yes:
        click.confirm(f"Remove {address} and all its mail?", abort=True)
    run_async(with_store(server_config, lambda store: store.remove_account(address), upgrade=True))
    click.echo(f"account {address} removed")


@user_group.command("alias")
@click.argument("alias")
@click.argument("address")
@config_option
def user_alias(alias: str, address: str, config_path: Path | None) -> None:
    """Deliver mail for ALIAS to account ADDRESS and let ADDRESS send as ALIAS."""
    server_config = load_server_config(config_path)
    run_async(with_store(server_config, lambda store: store.add_alias(alias, address), upgrade=True))
    click.echo(f"alias {alias} -> {address} added")


# tls ----------------------------------------------------------------------------------


@main.group("tls")
def tls_group() -> None:
    """Show the certificates the server's TLS listeners use."""


@tls_group.command("show")
@config_option
@json_option
def tls_show(config_path: Path | None, as_json: bool) -> None:
    """Print the CA file to trust and the certificate fingerprints (creating the local CA if needed)."""
    from mailstack import tls

    server_config = load_server_config(config_path)
    files = tls.resolve_files(server_config)
    info = {
        "certificate": str(files.cert_file),
        "certificate_sha256": tls.fingerprint(files.cert_file),
        "key": str(files.key_file),
        "ca_file": str(files.ca_file) if files.ca_file else None,
        "ca_sha256": tls.fingerprint(files.ca_file) if files.ca_file else None,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        click.echo(f"{key:20} {value if value is not None else '(configured certificate, no local CA)'}")
    if files.ca_file:
        click.echo(f"\nClients trust this server with: --cacert {files.ca_file}")


# serve --------------------------------------------------------------------------------


@main.command("serve")
@config_option
@click.option(
    "--role",
    "role_list",
    default=None,
    help=f"Comma-separated roles to run, from {', '.join(ROLES)}. Default: [server] roles of the config.",
)
@click.pass_context
def serve(context: click.Context, config_path: Path | None, role_list: str | None) -> None:
    """Run the mail server's services until SIGTERM or SIGINT."""
    from mailstack import serve as serve_module

    server_config = load_server_config(config_path)
    apply_logging(context, server_config)
    if role_list is None:
        roles = server_config.server.roles
    else:
        roles = tuple(r.strip() for r in role_list.split(",") if r.strip())
        unknown = [r for r in roles if r not in ROLES]
        if unknown or not roles:
            raise click.BadParameter(f"unknown role(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROLES)}", param_hint="--role")
    available = serve_module.available_roles()
    if not available:
        raise click.ClickException("no service roles are available in this build yet")
    sys.exit(serve_module.run_forever(server_config, roles))


def _register_optional_commands() -> None:
    """Add the command groups that live with their services."""
    for module_name, attribute in (
        ("mailstack.bluebook.cli", "bluebook"),
        ("mailstack.transfer.cli", "queue"),
        ("mailstack.demo", "demo"),
    ):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        main.add_command(getattr(module, attribute))


_register_optional_commands()
