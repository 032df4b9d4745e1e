"""`mailstack bluebook ...`: run the Blue Book and manage its zones, records and TSIG keys."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import dns.exception
import dns.name
import dns.rdataset
import dns.rdatatype
import dns.zone

from mailstack import config as config_module
from mailstack import logs
from mailstack.bluebook import mailzone
from mailstack.bluebook.config import BlueBookConfig
from mailstack.bluebook.zonestore import IN, ZoneContent, ZoneStore, ZoneStoreError, parse_rdata, to_name
from mailstack.cli import json_option, print_rows, run_async

T = TypeVar("T")

CONFIG_ENV = "MAILSTACK_BLUEBOOK_CONFIG"

bluebook_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help=f"Blue Book configuration file (TOML). Default: ${CONFIG_ENV}, else built-in defaults.",
)


def load_config(path: Path | None) -> BlueBookConfig:
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    try:
        return config_module.load(BlueBookConfig, path)
    except config_module.ConfigError as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from None


def with_zone_store(config: BlueBookConfig, action: Callable[[ZoneStore], Awaitable[T]]) -> T:
    """Open the Blue Book store, run ``action`` and close it; store errors exit with status 1."""

    async def run() -> T:
        try:
            store = await ZoneStore.open(config.database_url)
        except ZoneStoreError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            return await action(store)
        except ZoneStoreError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await store.close()

    return run_async(run())


@click.group("bluebook")
def bluebook() -> None:
    """The Blue Book: authoritative DNS for the mail domains (MX, A/AAAA, SRV, SPF)."""


# serve -------------------------------------------------------------------------------


@bluebook.command("serve")
@bluebook_config_option
@click.pass_context
def serve(context: click.Context, config_path: Path | None) -> None:
    """Answer DNS queries, UPDATE and AXFR until SIGTERM or SIGINT."""
    from mailstack.bluebook import server

    config = load_config(config_path)
    obj = context.find_root().obj or {}
    logs.setup(obj.get("log_level") or config.log.level, obj.get("log_format") or config.log.format)
    sys.exit(server.run_forever(config))


# Mail domains -----------------------------------------------------------------------------


def mail_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options shared by `add` and `update`."""
    options = [
        click.option("--mx", "mx", multiple=True, help="Mail exchanger HOST or PREFERENCE:HOST; repeat for several."),
        click.option(
            "--address",
            "addresses",
            multiple=True,
            help="IPv4 or IPv6 address of the first MX host (which must be inside the zone); repeat for several.",
        ),
        click.option("--srv-target", default=None, help="Host that the SRV records name. Default: the first MX host."),
        click.option("--submission-port", type=click.IntRange(0, 65535), default=None, help="Port of _submission._tcp (587); 0 omits it."),
        click.option("--submissions-port", type=click.IntRange(0, 65535), default=None, help="Port of _submissions._tcp (465); 0 omits it."),
        click.option("--imap-port", type=click.IntRange(0, 65535), default=None, help="Port of _imap._tcp (143); 0 omits it."),
        click.option("--imaps-port", type=click.IntRange(0, 65535), default=None, help="Port of _imaps._tcp (993); 0 omits it."),
        click.option(
            "--port-offset",
            type=click.IntRange(0, 60000),
            default=None,
            help="Add this to every standard SRV port not given explicitly (for servers on offset ports).",
        ),
        click.option("--spf", default=None, help=f"SPF policy TXT at the apex. Default for new zones: {mailzone.DEFAULT_SPF!r}."),
        click.option("--no-spf", is_flag=True, help="Remove the SPF TXT record (or create none)."),
        click.option("--ns", "nameservers", multiple=True, help="Name server host for NS and SOA. Default: [zone] nameserver."),
        click.option(
            "--ns-address",
            "ns_addresses",
            multiple=True,
            help="Address of a name server inside the zone. Default: the Blue Book's [server] listen addresses.",
        ),
        click.option("--ttl", type=click.IntRange(0, 2**31 - 1), default=None, help="TTL of the records written, in seconds."),
    ]
    for decorate in reversed(options):
        function = decorate(function)
    return function


def build_spec(domain: str, values: dict[str, Any], *, creating: bool) -> mailzone.MailDomain:
    try:
        origin = to_name(domain)
        ports: dict[str, int] = {}
        offset = values.get("port_offset")
        for service, (_label, standard) in mailzone.SRV_SERVICES.items():
            given = values.get(f"{service}_port")
            if given is not None:
                ports[service] = given
            elif offset is not None:
                ports[service] = standard + offset
        if values.get("spf") is not None and values.get("no_spf"):
            raise ZoneStoreError("--spf and --no-spf contradict each other")
        return mailzone.MailDomain(
            domain=origin,
            mx=mailzone.parse_mx(list(values["mx"])) if values.get("mx") else None,
            addresses=list(values["addresses"]) if values.get("addresses") else None,
            srv_target=to_name(values["srv_target"]) if values.get("srv_target") else None,
            ports=ports,
            spf=values.get("spf"),
            no_spf=bool(values.get("no_spf")),
            nameservers=[to_name(ns) for ns in values["nameservers"]] if values.get("nameservers") else None,
            ns_addresses=list(values["ns_addresses"]) if values.get("ns_addresses") else None,
            ttl=values.get("ttl"),
        )
    except ZoneStoreError as exc:
        raise click.ClickException(str(exc)) from None


def show_zone(content: ZoneContent, as_json: bool, verb: str) -> None:
    summary = mailzone.describe(content)
    if as_json:
        summary["records"] = records_as_rows(content)
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"zone {summary['domain']} {verb}, serial {summary['serial']}")
    print_records(content)


def records_as_rows(content: ZoneContent) -> list[dict[str, Any]]:
    rows = []
    for rrset in content.rrsets():
        for rdata in rrset:
            rows.append(
                {
                    "name": rrset.name.to_text(),
                    "ttl": rrset.ttl,
                    "type": dns.rdatatype.to_text(rrset.rdtype),
                    "data": rdata.to_text(),
                }
            )
    return rows


def print_records(content: ZoneContent) -> None:
    print_rows(records_as_rows(content), ["name", "ttl", "type", "data"], as_json=False)


@bluebook.command("add")
@click.argument("domain")
@mail_options
@bluebook_config_option
@json_option
def add(domain: str, config_path: Path | None, as_json: bool, **values: Any) -> None:
    """Register mail domain DOMAIN: SOA, NS, MX, the MX host's A/AAAA, SRV (RFC 6186, 8314) and SPF.

    Example: mailstack bluebook add here.test --mx mx.here.test --address 127.0.1.10
    """
    config = load_config(config_path)
    spec = build_spec(domain, values, creating=True)
    try:
        content = mailzone.build_zone(spec, config.zone, config.server.listen)
    except ZoneStoreError as exc:
        raise click.ClickException(str(exc)) from None
    with_zone_store(config, lambda store: store.create_zone(content))
    show_zone(content, as_json, "added")


@bluebook.command("update")
@click.argument("domain")
@mail_options
@bluebook_config_option
@json_option
def update_domain(domain: str, config_path: Path | None, as_json: bool, **values: Any) -> None:
    """Change the parts of mail domain DOMAIN that are given; the rest stays."""
    config = load_config(config_path)
    spec = build_spec(domain, values, creating=False)
    ttl = config.zone.ttl if spec.ttl is None else spec.ttl

    def change(content: ZoneContent) -> None:
        if spec.nameservers is not None:
            ns = dns.rdataset.Rdataset(IN, dns.rdatatype.NS, ttl=ttl)
            for host in spec.nameservers:
                ns.add(parse_rdata(dns.rdatatype.NS, host.to_text()), ttl)
            content.put(content.origin, ns)
            soa = content.soa
            soa_set = dns.rdataset.Rdataset(IN, dns.rdatatype.SOA, ttl=content.get(content.origin, dns.rdatatype.SOA).ttl)
            soa_set.add(soa.replace(mname=spec.nameservers[0]))
            content.put(content.origin, soa_set)
        if spec.ns_addresses is not None:
            for host in content.get(content.origin, dns.rdatatype.NS) or ():
                if host.target.is_subdomain(content.origin):
                    mailzone.put_addresses(content, host.target, mailzone.check_addresses(spec.ns_addresses), ttl)
        mailzone.apply_mail_parts(content, spec, ttl, creating=False)

    async def action(store: ZoneStore) -> tuple[bool, ZoneContent]:
        _result, changed, _serial = await store.modify_zone(spec.domain, change)
        return changed, await store.zone(spec.domain)

    changed, content = with_zone_store(config, action)
    show_zone(content, as_json, "updated" if changed else "unchanged")


@bluebook.command("list")
@bluebook_config_option
@json_option
def list_zones(config_path: Path | None, as_json: bool) -> None:
    """List the zones with their serials, mail exchangers and addresses."""
    config = load_config(config_path)

    async def action(store: ZoneStore) -> list[dict[str, Any]]:
        rows = []
        for summary in await store.list_zones():
            info = mailzone.describe(await store.zone(summary.name))
            info["records"] = summary.records
            info["updated"] = summary.updated.isoformat(timespec="seconds")
            rows.append(info)
        return rows

    rows = with_zone_store(config, action)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["mx"] = ", ".join(row["mx"])
        row["addresses"] = ", ".join(row["addresses"])
    print_rows(rows, ["domain", "serial", "mx", "addresses", "records"], as_json=False)


@bluebook.command("show")
@click.argument("domain")
@bluebook_config_option
@json_option
def show(domain: str, config_path: Path | None, as_json: bool) -> None:
    """Print every record of zone DOMAIN."""
    config = load_config(config_path)
    content = with_zone_store(config, lambda store: store.zone(domain))
    summary = mailzone.describe(content)
    if as_json:
        summary["records"] = records_as_rows(content)
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"zone {summary['domain']}, serial {summary['serial']}")
    print_records(content)


@bluebook.command("remove")
@click.argument("domain")
@bluebook_config_option
def remove(domain: str, config_path: Path | None) -> None:
    """Delete zone DOMAIN with all its records."""
    config = load_config(config_path)
    with_zone_store(config, lambda store: store.delete_zone(domain))
    click.echo(f"zone {to_name(domain).to_text(omit_final_dot=True)} removed")


# Single records -------------------------------------------------------------------------


@bluebook.group("record")
def record() -> None:
    """Add or remove any record. Names are absolute, with or without the final dot."""


@record.command("add")
@click.argument("name")
@click.argument("rdtype", metavar="TYPE")
@click.argument("data", nargs=-1, required=True)
@click.option("--ttl", type=click.IntRange(0, 2**31 - 1), default=None, help="TTL in seconds. Default: [zone] ttl.")
@bluebook_config_option
def record_add(name: str, rdtype: str, data: tuple[str, ...], ttl: int | None, config_path: Path | None) -> None:
    """Add one record: NAME TYPE DATA, for example `_dmarc.here.test TXT "v=DMARC1; p=reject"`.

    DATA is in zone file syntax; names in it are absolute. The RRset's TTL
    becomes the one given.
    """
    config = load_config(config_path)
    ttl = config.zone.ttl if ttl is None else ttl
    try:
        owner = to_name(name)
        rdata = parse_rdata(rdtype.upper(), " ".join(data))
    except ZoneStoreError as exc:
        raise click.ClickException(str(exc)) from None

    def change(content: ZoneContent) -> None:
        if rdata.rdtype == dns.rdatatype.SOA:
            raise ZoneStoreError("replace the SOA with `bluebook import --replace`; its serial is managed here")
        types = content.types_at(owner)
        if rdata.rdtype == dns.rdatatype.CNAME and any(t != dns.rdatatype.CNAME for t in types):
            raise ZoneStoreError(f"{owner} has other records, so it cannot have a CNAME")
        if rdata.rdtype != dns.rdatatype.CNAME and dns.rdatatype.CNAME in types:
            raise ZoneStoreError(f"{owner} has a CNAME record, so it cannot have other records")
        rdataset = dns.rdataset.Rdataset(IN, rdata.rdtype, ttl=ttl)
        if rdata.rdtype != dns.rdatatype.CNAME:
            for existing in content.get(owner, rdata.rdtype) or ():
                rdataset.add(existing)
        rdataset.add(rdata)
        content.put(owner, rdataset)

    async def action(store: ZoneStore) -> tuple[str, bool, int]:
        origin = await store.find_zone(owner)
        _result, changed, serial = await store.modify_zone(origin, change)
        return origin.to_text(omit_final_dot=True), changed, serial

    zone, changed, serial = with_zone_store(config, action)
    state = "added" if changed else "already present"
    click.echo(f"{owner} {ttl} {dns.rdatatype.to_text(rdata.rdtype)} {rdata.to_text()} {state} in zone {zone} (serial {serial})")


@record.command("remove")
@click.argument("name")
@click.argument("rdtype", metavar="[TYPE]", required=False)
@click.argument("data", nargs=-1)
@bluebook_config_option
def record_remove(name: str, rdtype: str | None, data: tuple[str, ...], config_path: Path | None) -> None:
    """Remove the records at NAME: all of them, those of TYPE, or the one with DATA.

    The apex keeps its SOA and at least one NS record.
    """
    config = load_config(config_path)
    try:
        owner = to_name(name)
        target_type = dns.rdatatype.RdataType.make(rdtype.upper()) if rdtype else None
        rdata = parse_rdata(target_type, " ".join(data)) if data and target_type is not None else None
    except (ZoneStoreError, dns.rdatatype.UnknownRdatatype) as exc:
        raise click.ClickException(str(exc)) from None

    def change(content: ZoneContent) -> int:
        types = [target_type] if target_type is not None else content.types_at(owner)
        removed = 0
        for current_type in types:
            if owner == content.origin and current_type == dns.rdatatype.SOA:
                if target_type is not None:
                    raise ZoneStoreError("the SOA record cannot be removed; remove the whole zone instead")
                continue
            current = content.get(owner, current_type)
            if current is None:
                continue
            remaining = dns.rdataset.Rdataset(IN, current_type, ttl=current.ttl)
            for existing in current:
                if rdata is not None and existing != rdata:
                    remaining.add(existing)
            if owner == content.origin and current_type == dns.rdatatype.NS and not remaining:
                if target_type is not None:
                    raise ZoneStoreError("the apex must keep at least one NS record")
                continue
            removed += len(current) - len(remaining)
            content.put(owner, remaining)
        if removed == 0:
            raise ZoneStoreError(f"no matching record at {owner}")
        return removed

    async def action(store: ZoneStore) -> tuple[int, int]:
        origin = await store.find_zone(owner)
        removed, _changed, serial = await store.modify_zone(origin, change)
        return removed, serial

    removed, serial = with_zone_store(config, action)
    click.echo(f"{removed} record(s) removed at {owner} (serial {serial})")


# Zone files ------------------------------------------------------------------------------


@bluebook.command("export")
@click.argument("domain")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write to this file instead of standard output.")
@bluebook_config_option
def export(domain: str, output: Path | None, config_path: Path | None) -> None:
    """Write zone DOMAIN as an RFC 1035 zone file."""
    config = load_config(config_path)
    content = with_zone_store(config, lambda store: store.zone(domain))
    lines = [f"$ORIGIN {content.origin}"]
    for rrset in content.rrsets():
        lines.append(rrset.to_text())
    text = "\n".join(lines) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"zone {content.origin.to_text(omit_final_dot=True)} written to {output}", err=True)


@bluebook.command("import")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--origin", default=None, help="Zone name when the file has no $ORIGIN.")
@click.option("--replace", is_flag=True, help="Replace every record of an existing zone of that name.")
@bluebook_config_option
def import_zone(path: Path, origin: str | None, replace: bool, config_path: Path | None) -> None:
    """Load an RFC 1035 zone file as a new zone (or over an existing one with --replace)."""
    config = load_config(config_path)
    try:
        zone = dns.zone.from_file(
            str(path), origin=to_name(origin) if origin else None, relativize=False, check_origin=True
        )
    except (dns.exception.DNSException, ZoneStoreError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{path}: invalid zone file: {exc}") from None
    content = ZoneContent(zone.origin)
    for owner, node in zone.nodes.items():
        for rdataset in node.rdatasets:
            if rdataset.rdclass != IN:
                raise click.ClickException(f"{path}: {owner} has class {rdataset.rdclass.name}; only IN is served")
            content.put(owner, rdataset)

    async def action(store: ZoneStore) -> tuple[str, int]:
        existing = {summary.name for summary in await store.list_zones()}
        if content.origin.canonicalize().to_text() in existing:
            if not replace:
                raise ZoneStoreError(f"zone {content.origin} already exists; give --replace to overwrite it")
            return "replaced", await store.replace_zone(content)
        return "imported", await store.create_zone(content)

    verb, serial = with_zone_store(config, action)
    count = sum(len(rdataset) for rdataset in content.rdatasets.values())
    click.echo(f"zone {content.origin.to_text(omit_final_dot=True)} {verb}: {count} records, serial {serial}")


# TSIG keys -------------------------------------------------------------------------------


@bluebook.group("key")
def key() -> None:
    """TSIG keys for DNS UPDATE (nsupdate -y) and zone transfers."""


@key.command("add")
@click.argument("name")
@click.option(
    "--algorithm",
    type=click.Choice(["hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1"]),
    default="hmac-sha256",
    show_default=True,
    help="HMAC algorithm of the key.",
)
@bluebook_config_option
@json_option
def key_add(name: str, algorithm: str, config_path: Path | None, as_json: bool) -> None:
    """Create TSIG key NAME with a random secret and print it (the only time it is shown in full)."""
    config = load_config(config_path)
    info = with_zone_store(config, lambda store: store.add_key(name, algorithm))
    if as_json:
        click.echo(json.dumps({"name": info.name, "algorithm": info.algorithm, "secret": info.secret}, indent=2))
        return
    click.echo(f"key {info.name} ({info.algorithm}) added; the server accepts it within a second.")
    click.echo(f"nsupdate -y {info.algorithm}:{info.name}:{info.secret}")


@key.command("list")
@bluebook_config_option
@json_option
def key_list(config_path: Path | None, as_json: bool) -> None:
    """List the TSIG keys in the database (secrets are not shown)."""
    config = load_config(config_path)
    keys = with_zone_store(config, lambda store: store.list_keys())
    rows = [
        {"name": k.name, "algorithm": k.algorithm, "created": k.created.isoformat(timespec="seconds") if k.created else None}
        for k in keys
    ]
    print_rows(rows, ["name", "algorithm", "created"], as_json=as_json)


@key.command("remove")
@click.argument("name")
@bluebook_config_option
def key_remove(name: str, config_path: Path | None) -> None:
    """Delete TSIG key NAME; the server stops accepting it within a second."""
    config = load_config(config_path)
    with_zone_store(config, lambda store: store.remove_key(name))
    click.echo(f"key {name} removed")
