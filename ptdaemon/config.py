"""Read config.toml into one frozen tree of msgspec Structs, checked once at start.

Relative paths are resolved against the config file's folder; secrets are wrapped.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import tomllib
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar, get_args, get_origin

import msgspec
from msgspec import Meta, Struct, field

from ptdaemon.errors import ConfigError
from ptdaemon.models import TARGET_TYPES, TemplateIn
from ptdaemon.redact import MASK

DEFAULT_LISTEN: Final = "127.0.0.1:8425"
UNIX_PREFIX: Final = "unix:"
# sun_path holds 108 bytes on Linux, one of them the final NUL.
UNIX_PATH_MAX_BYTES: Final = 107

NonEmpty = Annotated[str, Meta(min_length=1)]
Timeout = Annotated[float, Meta(ge=0.1, le=3600)]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_T = TypeVar("_T")


class Secret:
    """A secret string whose repr and str are `***`; `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


class _Section(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every table: immutable, and a typo in a key is an error."""


class DaemonConfig(_Section, frozen=True):
    state_dir: NonEmpty = "./ptdaemon-data"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    shutdown_grace_seconds: Annotated[float, Meta(gt=0)] = 30.0


class ApiConfig(_Section, frozen=True):
    listen: str = DEFAULT_LISTEN
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 1048576
    rate_per_second: Annotated[float, Meta(ge=0)] = 50.0
    rate_burst: Annotated[int, Meta(ge=1)] = 100
    metrics_public: bool = False

    def __post_init__(self) -> None:
        parse_listen(self.listen)

    def parse_listen(self) -> tuple[str, int] | str:
        """Give (host, port) for TCP, or the socket path for `unix:`."""
        return parse_listen(self.listen)


class DispatchConfig(_Section, frozen=True):
    concurrency: Annotated[int, Meta(ge=1)] = 100
    per_host_concurrency: Annotated[int, Meta(ge=1)] = 10
    timeout_seconds: Timeout = 30.0
    file_roots: list[NonEmpty] = field(default_factory=list)
    # How many of the soonest-due submissions the scheduler keeps in memory.
    heap_window: Annotated[int, Meta(ge=100)] = 10000


class LimitsConfig(_Section, frozen=True):
    templates_per_user: Annotated[int, Meta(ge=0)] = 1000
    unfinished_per_user: Annotated[int, Meta(ge=0)] = 1000000


class SmtpConfig(_Section, frozen=True):
    host: NonEmpty = "localhost"
    port: Annotated[int, Meta(ge=1, le=65535)] = 25
    tls: Literal["starttls", "implicit", "none"] = "none"
    ca_file: str = ""
    username: str = ""
    password_env: str = ""
    password_file: str = ""
    from_address: NonEmpty = field(default="ptdaemon@localhost", name="from")
    timeout_seconds: Timeout = 30.0

    def __post_init__(self) -> None:
        if self.password_env and self.password_file:
            raise ValueError(
                "password_env: set password_env or password_file, not both"
            )


class SecurityConfig(_Section, frozen=True):
    allow_networks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for index, text in enumerate(self.allow_networks):
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                msg = f"allow_networks[{index}]: not an IP network: {text!r}"
                raise ValueError(msg) from None

    def networks(self) -> list[IpNetwork]:
        """The allowed ranges, host bits cleared."""
        return [
            ipaddress.ip_network(text, strict=False) for text in self.allow_networks
        ]


class RetentionConfig(_Section, frozen=True):
    finished_days: Annotated[float, Meta(ge=0)] = 30.0


class ConfigFile(_Section, frozen=True):
    """The tables of config.toml exactly as written."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    templates: list[dict[str, Any]] = field(default_factory=list)


class Config(ConfigFile, frozen=True, kw_only=True):
    """The whole configuration, plus the values the load step derives.

    Build it with `load_config` or `default_config`. `templates` holds the
    raw [[templates]] tables, each already checked against TemplateIn.
    """

    config_path: Path | None = None
    base_dir: Path
    state_path: Path
    file_root_paths: list[Path]
    smtp_password: Secret | None = None
    smtp_ca_path: Path | None = None

    def resolve_path(self, text: str) -> Path:
        """Resolve a path from the config (or a template) against base_dir."""
        return _resolve(self.base_dir, text)

    def template_names(self) -> list[str]:
        return [str(table["name"]) for table in self.templates]

    def summary(self) -> dict[str, Any]:
        """The effective settings for the start-up log line, without secrets."""
        tables = {
            name: msgspec.to_builtins(getattr(self, name))
            for name in ConfigFile.__struct_fields__
            if name != "templates"
        }
        tables["templates"] = self.template_names()
        tables["config_path"] = str(self.config_path) if self.config_path else None
        tables["state_path"] = str(self.state_path)

        return tables

    def __repr__(self) -> str:
        # Template tables may hold tokens and signing secrets: show names only.
        parts = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            text = repr(self.template_names()) if name == "templates" else repr(value)
            parts.append(f"{name}={text}")
        return f"Config({', '.join(parts)})"

    __str__ = __repr__


def parse_listen(text: str) -> tuple[str, int] | str:
    """Read `HOST:PORT`, `[IPV6]:PORT` or `unix:PATH`; raise ValueError if bad."""
    if text.startswith(UNIX_PREFIX):
        return _parse_unix(text.removeprefix(UNIX_PREFIX))
    problem = f"listen: expected HOST:PORT, [IPV6]:PORT or unix:PATH, got {text!r}"
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not _is_ipv6(host):
            raise ValueError(problem)
    elif not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        raise ValueError(problem)
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(problem)

    return host, int(port)


def _parse_unix(path: str) -> str:
    if not path:
        raise ValueError("listen: the unix socket path is empty")
    if len(os.fsencode(path)) > UNIX_PATH_MAX_BYTES:
        size = UNIX_PATH_MAX_BYTES
        raise ValueError(f"listen: the unix socket path is over {size} bytes")
    return path


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def default_config() -> Config:
    """The built-in defaults, with paths relative to the working directory."""
    return load_config(None)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read, check and resolve a config file; None gives the defaults.

    Raises ConfigError with a one-line message that starts with the file
    name and names the key, never a secret's value.
    """
    if path is None:
        return _derive(ConfigFile(), label="<defaults>", config_path=None)
    label = os.fspath(path)
    tables = _read_toml(Path(path), label)
    try:
        file = msgspec.convert(tables, ConfigFile, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{label}: {_explain(str(exc), ConfigFile)}") from exc
    _check_templates(file.templates, label)

    return _derive(file, label=label, config_path=Path(os.path.abspath(path)))


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: {exc}") from exc


def _check_templates(tables: list[dict[str, Any]], label: str) -> None:
    seen: set[str] = set()
    for index, table in enumerate(tables):
        where = f"templates[{index}]"
        template = _convert(table, TemplateIn, label, where)
        _convert(
            template.target, TARGET_TYPES[template.method], label, f"{where}.target"
        )
        if template.name in seen:
            msg = f"{label}: {where}.name: duplicate template name {template.name!r}"
            raise ConfigError(msg)
        seen.add(template.name)


def _convert(value: Any, kind: type[_T], label: str, where: str) -> _T:
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{label}: {_explain(str(exc), kind, where)}") from exc


def _derive(file: ConfigFile, *, label: str, config_path: Path | None) -> Config:
    base_dir = Path.cwd() if config_path is None else config_path.parent
    values = {name: getattr(file, name) for name in ConfigFile.__struct_fields__}
    values["api"] = _resolve_listen(file.api, base_dir, label)
    ca_path = _resolve_ca_file(file.smtp, base_dir, label)

    return Config(
        **values,
        config_path=config_path,
        base_dir=base_dir,
        state_path=_resolve(base_dir, file.daemon.state_dir),
        file_root_paths=[_resolve(base_dir, r) for r in file.dispatch.file_roots],
        smtp_password=_read_password(file.smtp, base_dir, label),
        smtp_ca_path=ca_path,
    )


def _resolve(base_dir: Path, text: str) -> Path:
    # An absolute path replaces base_dir in the join.
    return base_dir / Path(text).expanduser()


def _resolve_listen(api: ApiConfig, base_dir: Path, label: str) -> ApiConfig:
    where = api.parse_listen()
    if not isinstance(where, str) or os.path.isabs(where):
        return api
    try:
        return msgspec.structs.replace(
            api, listen=UNIX_PREFIX + str(_resolve(base_dir, where))
        )
    except ValueError as exc:
        raise ConfigError(f"{label}: api.{exc}") from None


def _resolve_ca_file(smtp: SmtpConfig, base_dir: Path, label: str) -> Path | None:
    if not smtp.ca_file:
        return None
    path = _resolve(base_dir, smtp.ca_file)
    if not path.is_file():
        raise ConfigError(f"{label}: smtp.ca_file: no such file {path}")
    return path


def _read_password(smtp: SmtpConfig, base_dir: Path, label: str) -> Secret | None:
    """Read the SMTP password from the environment or a file, never logging it."""
    if smtp.password_env:
        value = os.environ.get(smtp.password_env)
        if value is None:
            name = smtp.password_env
            msg = f"{label}: smtp.password_env: environment variable {name} is not set"
            raise ConfigError(msg)
        return Secret(value)
    if not smtp.password_file:
        return None
    path = _resolve(base_dir, smtp.password_file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"{label}: smtp.password_file: cannot read {path}: {exc.strerror}"
        raise ConfigError(msg) from None
    except UnicodeDecodeError:
        # The exception carries the file's bytes: do not chain it.
        msg = f"{label}: smtp.password_file: {path} is not UTF-8 text"
        raise ConfigError(msg) from None
    if text.endswith("\r\n"):
        return Secret(text[:-2])

    return Secret(text.removesuffix("\n"))


# msgspec says "Expected `int`, got `str` - at `$.api.port`"; users read
# "api.port: expected int, got str".
_AT = re.compile(r"(?P<text>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`")
_MISSING = re.compile(r"Object missing required field `(?P<key>[^`]*)`")
# Checks in __post_init__ raise ValueError("<key>: <problem>").
_OWN = re.compile(r"(?P<key>[a-z_]+(?:\[\d+\])?): (?P<text>.+)", re.DOTALL)
_ENUM = re.compile(r"Invalid enum value (?P<value>.*)")


def _explain(message: str, root: type[Any], prefix: str = "") -> str:
    """Turn a msgspec validation message into "<dotted.key>: <problem>"."""
    found = _AT.fullmatch(message)
    assert found is not None  # the pattern matches any text
    text, inner = found["text"], found["path"] or ""
    path = prefix + inner
    if match := _UNKNOWN.fullmatch(text):
        return f"unknown key {_join(path, match['key'])}"
    if match := _MISSING.fullmatch(text):
        return f"{_join(path, match['key'])}: missing required key"
    if match := _OWN.fullmatch(text):
        return f"{_join(path, match['key'])}: {match['text']}"
    if match := _ENUM.fullmatch(text):
        text = f"invalid value {match['value']}{_choices(root, inner)}"
    else:
        text = _reword(text)

    return f"{path.lstrip('.')}: {text}" if path else text


def _join(path: str, key: str) -> str:
    return f"{path}.{key}".lstrip(".")


def _reword(text: str) -> str:
    text = text.replace("`object`", "table").replace("`", "")
    return text[:1].lower() + text[1:]


def _choices(root: type[Any], path: str) -> str:
    """List the allowed values of the Literal or enum field at path, if any."""
    kind: Any = root
    for key in path.lstrip(".").split("."):
        fields = msgspec.structs.fields(kind) if _is_struct(kind) else ()
        kind = next((f.type for f in fields if f.encode_name == key), None)
    values: list[str] = []
    for option in (kind, *get_args(kind)):
        if get_origin(option) is Literal:
            values += [str(value) for value in get_args(option)]
        elif isinstance(option, type) and issubclass(option, Enum):
            values += [str(member.value) for member in option]
    return f", expected one of {', '.join(values)}" if values else ""


def _is_struct(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Struct)
