"""The Docker topology, checked without a Docker engine.

The compose file is loaded as YAML; every configuration it mounts must exist and
pass `mailstack config check` with the service's environment, and the addresses
and ports must agree between the services that talk to each other.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailstack import config as config_module
from mailstack.cli import main
from mailstack.settings import MailServerConfig

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra: pip install -e '.[test]'")

DOCKER_DIR = Path(__file__).resolve().parent.parent / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yml"
DOMAINS = ("here.test", "there.test")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _config_path(service: dict) -> Path:
    """Return the host path of the file the service's command passes with --config."""
    command = service["command"]
    arguments = command if isinstance(command, list) else shlex.split(command)
    if "--config" in arguments:
        inside = arguments[arguments.index("--config") + 1]
    else:
        inside = next(a for a in arguments if a.startswith("/etc/mailstack/"))
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if inside.startswith(target.rstrip("/") + "/"):
            assert source.startswith("."), f"config folder {source} should be a bind mount from docker/"
            return (DOCKER_DIR / source / inside[len(target) + 1:]).resolve()
    raise AssertionError(f"{inside} is not under any volume of the service")


def _address(service: dict) -> str:
    return service["networks"]["mail"]["ipv4_address"]


def _probes(service: dict) -> list[list[str]]:
    return [probe.split() for probe in service["environment"]["HEALTHCHECK_PROBE"].split(",")]


def _environment(service: dict) -> dict[str, str]:
    """The service's MAILSTACK_* variables, which override its config file."""
    environment = service.get("environment") or {}
    return {k: str(v) for k, v in environment.items() if k.startswith("MAILSTACK_")}


def _load_mail_config(service: dict) -> MailServerConfig:
    return config_module.load(MailServerConfig, _config_path(service), environ=_environment(service))


def _roles(service: dict) -> set[str]:
    command = service["command"]
    return set(command[command.index("--role") + 1].split(","))


def test_expected_services(services: dict) -> None:
    expected = {"bluebook", "bluebook-setup"}
    for domain in ("here", "there"):
        expected |= {f"{domain}-msa", f"{domain}-mta", f"{domain}-setup"}
    assert set(services) == expected


def test_one_image_built_from_dockerfile(services: dict) -> None:
    for name, service in services.items():
        assert service["image"] == "mailstack:latest", name
        assert service["build"]["dockerfile"] == "docker/Dockerfile", name
        context = (DOCKER_DIR / service["build"]["context"]).resolve()
        assert (context / service["build"]["dockerfile"]).is_file(), name


def test_dockerfile_slim_nonroot_healthcheck() -> None:
    text = (DOCKER_DIR / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.\d+-slim", base.group(1))
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users, "the image must switch to a non-root user"
    assert users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*mailstack\.demo\.probe", text, re.MULTILINE | re.DOTALL)


def test_dockerignore_keeps_needed_files() -> None:
    text = (DOCKER_DIR / "Dockerfile.dockerignore").read_text()
    copied = re.findall(r"^COPY\s+(\S+)", (DOCKER_DIR / "Dockerfile").read_text(), re.MULTILINE)
    for source in copied:
        assert f"!{source}" in text or f"!{source}/**" in text, source
        assert (DOCKER_DIR.parent / source).exists(), source


@pytest.mark.parametrize("name", ["setup-account.sh", "register-domain.sh"])
def test_scripts_are_valid_sh(name: str) -> None:
    script = DOCKER_DIR / name
    assert os.access(script, os.X_OK)
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_configs_exist_and_pass_check(services: dict) -> None:
    checked = set()
    for name, service in services.items():
        if "command" not in service or name == "bluebook-setup":
            continue
        path = _config_path(service)
        assert path.is_file(), f"{name}: {path} is missing"
        arguments = ["config", "check", str(path)]
        if name == "bluebook":
            arguments.insert(2, "--bluebook")
        # The command runs in-process; only the service's own MAILSTACK_* variables are set.
        environment: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MAILSTACK_")}
        environment.update(_environment(service))
        result = CliRunner().invoke(main, arguments, env=environment)
        assert result.exit_code == 0, f"{name}: {result.output}"
        assert f"# {path}: valid" in result.output
        checked.add(path.name)
    assert checked == {"bluebook.toml", "here.toml", "there.toml"}


def _registrations(services: dict) -> dict[str, tuple[str, str, str, str, str]]:
    """Return domain -> (config, MX host, MTA address, MSA host, MSA address) from bluebook-setup."""
    command = services["bluebook-setup"]["command"][0]
    found = {}
    for match in re.finditer(r"mailstack-register-domain((?:\s+\S+){6})", command):
        config, domain, mx, mta_address, msa_host, msa_address = match.group(1).split()
        found[domain] = (config, mx, mta_address, msa_host, msa_address)
    return found


def test_bluebook_setup_config_exists(services: dict) -> None:
    registered = _registrations(services)
    assert set(registered) == set(DOMAINS)
    assert {entry[0] for entry in registered.values()} == {"/etc/mailstack/bluebook.toml"}
    assert (DOCKER_DIR / "config" / "bluebook.toml").is_file()


def test_addresses_unique_in_subnet(compose: dict, services: dict) -> None:
    subnet = ipaddress.ip_network(compose["networks"]["mail"]["ipam"]["config"][0]["subnet"])
    addresses = [_address(s) for s in services.values() if "networks" in s]
    assert len(addresses) == len(set(addresses))
    for address in addresses:
        assert ipaddress.ip_address(address) in subnet


def test_msa_and_mta_share_store(services: dict) -> None:
    for domain in ("here", "there"):
        msa, mta, setup = services[f"{domain}-msa"], services[f"{domain}-mta"], services[f"{domain}-setup"]
        assert _roles(msa) == {"submission", "imap"}
        assert _roles(mta) == {"transfer"}
        assert _config_path(msa) == _config_path(mta) == _config_path(setup)
        config = _load_mail_config(msa)
        data_volumes = {
            service_name: next(v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == str(config.server.data_dir))
            for service_name, service in ((f"{domain}-msa", msa), (f"{domain}-mta", mta), (f"{domain}-setup", setup))
        }
        assert set(data_volumes.values()) == {f"{domain}-data"}, data_volumes
        assert config.database_url.startswith(f"sqlite+aiosqlite:///{config.server.data_dir}/")


def test_mail_servers_listen_on_their_address(services: dict) -> None:
    for domain in ("here", "there"):
        for role in ("msa", "mta"):
            service = services[f"{domain}-{role}"]
            listen = _load_mail_config(service).server.listen
            assert listen == ("0.0.0.0",) or _address(service) in listen


def test_mta_finds_peers_through_bluebook(services: dict) -> None:
    bluebook_config = config_module.load(_bluebook_type(), _config_path(services["bluebook"]))
    bluebook_address = _address(services["bluebook"])
    assert bluebook_address in bluebook_config.server.listen
    smtp_ports = {}
    for domain in ("here", "there"):
        config = _load_mail_config(services[f"{domain}-mta"])
        assert config.transfer.nameservers == (bluebook_address,)
        assert config.transfer.dns_port == bluebook_config.server.port
        smtp_ports[domain] = (config.transfer.port, config.transfer.peer_port)
    # Each MTA relays to the port the other one listens on.
    assert smtp_ports["here"][1] == smtp_ports["there"][0]
    assert smtp_ports["there"][1] == smtp_ports["here"][0]


def test_bluebook_points_at_containers(services: dict) -> None:
    registered = _registrations(services)
    for domain in DOMAINS:
        _, mx, mta_address, msa_host, msa_address = registered[domain]
        short = domain.split(".")[0]
        assert mta_address == _address(services[f"{short}-mta"])
        assert msa_address == _address(services[f"{short}-msa"])
        assert mx == _load_mail_config(services[f"{short}-mta"]).server.hostname
        assert msa_host.endswith("." + domain)


def test_healthchecks_probe_configured_ports(services: dict) -> None:
    bluebook = services["bluebook"]
    [(kind, host, port, zone)] = _probes(bluebook)
    bluebook_config = config_module.load(_bluebook_type(), _config_path(bluebook))
    assert kind == "dns"
    assert host in bluebook_config.server.listen
    assert int(port) == bluebook_config.server.port
    assert zone in DOMAINS
    for domain in ("here", "there"):
        msa = _load_mail_config(services[f"{domain}-msa"])
        probed = {(kind, int(port)) for kind, _, port in _probes(services[f"{domain}-msa"])}
        assert probed == {
            ("smtp", msa.submission.port),
            ("smtps", msa.submission.tls_port),
            ("imap", msa.imap.port),
            ("imaps", msa.imap.tls_port),
        }
        mta = _load_mail_config(services[f"{domain}-mta"])
        [(kind, _, port)] = _probes(services[f"{domain}-mta"])
        assert (kind, int(port)) == ("smtp", mta.transfer.port)


def test_published_ports_match_listeners(services: dict) -> None:
    host_ports = []
    for name, service in services.items():
        for mapping in service.get("ports", []):
            host_address, host_port, container = mapping.split(":")
            assert host_address == "127.0.0.1", f"{name} publishes {mapping} beyond loopback"
            host_ports.append((host_port, container.split("/")[1] if "/" in container else "tcp"))
            container_port = int(container.split("/")[0])
            if name == "bluebook":
                assert container_port == config_module.load(_bluebook_type(), _config_path(service)).server.port
                continue
            config = _load_mail_config(service)
            listening = {
                "submission": {config.submission.port, config.submission.tls_port},
                "imap": {config.imap.port, config.imap.tls_port},
                "transfer": {config.transfer.port},
            }
            served = set().union(*(listening[role] for role in _roles(service)))
            assert container_port in served, f"{name} publishes {container_port}, which it does not serve"
    assert len(host_ports) == len(set(host_ports)), "two services publish the same host port"


def test_setup_runs_before_servers(services: dict) -> None:
    for domain in ("here", "there"):
        for role in ("msa", "mta"):
            depends = services[f"{domain}-{role}"]["depends_on"]
            assert depends[f"{domain}-setup"]["condition"] == "service_completed_successfully"
        assert services[f"{domain}-mta"]["depends_on"]["bluebook"]["condition"] == "service_healthy"
    assert services["bluebook"]["depends_on"]["bluebook-setup"]["condition"] == "service_completed_successfully"


def _bluebook_type() -> type:
    module = pytest.importorskip("mailstack.bluebook.config", reason="the Blue Book package is not on main yet")
    return module.BlueBookConfig
