"""Typed, validated, immutable configuration loaded from TOML and the environment.

A configuration is a frozen dataclass whose fields are sections; each section is
a frozen dataclass whose fields are options. Every option declares its default,
its help text and (where it has one) its unit in the field metadata, so that the
loader, ``mailstack config check`` and ``docs/configuration.md`` agree.

Values come from three places, later ones winning: the field default, the TOML
file, and environment variables named ``MAILSTACK_<SECTION>__<KEY>`` (for
example ``MAILSTACK_SUBMISSION__PORT=2587``). An unknown section or key, a wrong
type, an out-of-range number or a missing file raises :class:`ConfigError`,
which names the key and where its value came from.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

ENV_PREFIX = "MAILSTACK_"


class ConfigError(Exception):
    """An invalid configuration: the message names the key and its source."""


def option(
    default: Any,
    help: str,
    *,
    unit: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    secret: bool = False,
    must_exist: bool = False,
) -> Any:
    """Declare one option of a section with its default and documentation.

    ``must_exist`` applies to path options: a non-empty path must name an
    existing file when the configuration is loaded.
    """
    metadata = {
        "help": help,
        "unit": unit,
        "minimum": minimum,
        "maximum": maximum,
        "secret": secret,
        "must_exist": must_exist,
    }
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults so the section stays immutable")
    return dataclasses.field(default=default, metadata=metadata)


def port_option(default: int, help: str) -> Any:
    """Declare a TCP or UDP port option; 0 disables the listener."""
    return option(default, help, unit="port number, 0 disables", minimum=0, maximum=65535)


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _describe(annotation: Any) -> str:
    annotation, optional = _strip_optional(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    elif origin is tuple:
        (item, _ellipsis) = typing.get_args(annotation)
        text = f"list of {_describe(item)}"
    elif annotation is Path:
        text = "path"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    return text + (" (optional)" if optional else "")


def _convert(value: Any, annotation: Any, from_env: bool) -> Any:
    """Convert one raw value to ``annotation`` or raise ValueError with the reason."""
    annotation, optional = _strip_optional(annotation)
    if optional and (value is None or (from_env and value == "")):
        return None
    origin = typing.get_origin(annotation)

    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    if origin is tuple:
        (item, _ellipsis) = typing.get_args(annotation)
        if from_env and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        return tuple(_convert(v, item, from_env) for v in value)

    if annotation is bool:
        if from_env and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value

    if annotation is int:
        if from_env and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    if annotation is float:
        if from_env and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)

    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value

    if annotation is Path:
        if not isinstance(value, str):
            raise ValueError(f"expected a path string, got {value!r}")
        return Path(value).expanduser()

    raise TypeError(f"unsupported option type {annotation!r}")


def _check_limits(value: Any, meta: Mapping[str, Any]) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise ValueError(f"must be at least {meta['minimum']}, got {value}")
        if meta.get("maximum") is not None and value > meta["maximum"]:
            raise ValueError(f"must be at most {meta['maximum']}, got {value}")
    if meta.get("must_exist") and isinstance(value, Path) and str(value) not in ("", "."):
        if not value.is_file():
            raise ValueError(f"file not found: {value}")


def _resolve_paths(value: Any, base: Path) -> Any:
    if isinstance(value, Path) and not value.is_absolute() and str(value) not in ("", "."):
        return base / value
    return value


def load(
    root_type: type,
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    """Build ``root_type`` from defaults, the TOML file at ``path`` and the environment.

    Relative paths in the file are taken relative to the file's folder.
    ``overrides`` (section -> key -> value) is applied last, typed like TOML
    values; the CLI uses it for command-line options.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    source = "defaults"
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        source = str(path)
        base = path.resolve().parent
        try:
            with path.open("rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None

    sections = {f.name: f for f in dataclasses.fields(root_type)}
    for name, value in raw.items():
        if name not in sections:
            known = ", ".join(sorted(sections))
            raise ConfigError(f"{source}: unknown section [{name}]; known sections: {known}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table, got {type(value).__name__}")

    env_values: dict[str, dict[str, str]] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key[len(ENV_PREFIX):]:
            continue
        section_name, option_name = key[len(ENV_PREFIX):].lower().split("__", 1)
        if section_name not in sections:
            raise ConfigError(f"environment variable {key}: unknown section [{section_name}]")
        env_values.setdefault(section_name, {})[option_name] = value

    built_sections = {}
    for section_name, section_field in sections.items():
        section_type = section_field.type
        if isinstance(section_type, str):
            section_type = typing.get_type_hints(root_type)[section_name]
        hints = typing.get_type_hints(section_type, include_extras=False)
        options = {f.name: f for f in dataclasses.fields(section_type)}
        file_section = raw.get(section_name, {})
        env_section = env_values.get(section_name, {})
        override_section = dict((overrides or {}).get(section_name, {}))

        for key in file_section:
            if key not in options:
                known = ", ".join(sorted(options))
                raise ConfigError(
                    f"{source}: unknown key {key!r} in [{section_name}]; known keys: {known}"
                )
        for key in env_section:
            if key not in options:
                variable = f"{ENV_PREFIX}{section_name.upper()}__{key.upper()}"
                raise ConfigError(f"environment variable {variable}: unknown key {key!r} in [{section_name}]")

        values = {}
        for key, field in options.items():
            annotation = hints[key]
            value = field.default
            where = "default"
            try:
                if key in file_section:
                    where = f"{source}: [{section_name}] {key}"
                    value = _resolve_paths(_convert(file_section[key], annotation, False), base)
                if key in env_section:
                    where = f"environment variable {ENV_PREFIX}{section_name.upper()}__{key.upper()}"
                    value = _convert(env_section[key], annotation, True)
                if key in override_section:
                    where = f"command-line option for [{section_name}] {key}"
                    value = _convert(override_section[key], annotation, False)
                _check_limits(value, field.metadata)
            except ValueError as exc:
                raise ConfigError(f"{where}: invalid value: {exc}") from None
            values[key] = value
        try:
            built_sections[section_name] = section_type(**values)
        except ValueError as exc:
            raise ConfigError(f"{source}: [{section_name}] {exc}") from None
    config = root_type(**built_sections)
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return config


def describe_options(root_type: type) -> list[dict[str, Any]]:
    """List every option of ``root_type`` with its type, default, unit and help text."""
    rows = []
    root_hints = typing.get_type_hints(root_type)
    for section_field in dataclasses.fields(root_type):
        section_type = root_hints[section_field.name]
        hints = typing.get_type_hints(section_type)
        for field in dataclasses.fields(section_type):
            rows.append(
                {
                    "section": section_field.name,
                    "key": field.name,
                    "type": _describe(hints[field.name]),
                    "default": field.default,
                    "unit": field.metadata.get("unit"),
                    "help": field.metadata.get("help", ""),
                    "secret": field.metadata.get("secret", False),
                }
            )
    return rows


def to_dict(config: Any, *, mask_secrets: bool = True) -> dict[str, dict[str, Any]]:
    """Return the effective configuration as plain TOML-like values, secrets masked."""
    result: dict[str, dict[str, Any]] = {}
    for section_field in dataclasses.fields(config):
        section = getattr(config, section_field.name)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if isinstance(value, Path):
                # An unset file option is Path(""), which Python spells ".".
                value = "" if field.metadata.get("must_exist") and str(value) == "." else str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            if mask_secrets and field.metadata.get("secret") and value:
                value = "********"
            values[field.name] = value
        result[section_field.name] = values
    return result
