"""The `ptdaemon` command: run the daemon, or talk to a running one."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import msgspec

from ptdaemon import __version__
from ptdaemon.config import Config, load_config
from ptdaemon.errors import ConfigError, PtdaemonError

USAGE_STATUSES = frozenset({400, 413, 415, 422})
CLIENT_TIMEOUT_SECONDS = 30.0
STATUS_TIMEOUT_SECONDS = 5.0


class CliError(Exception):
    """A one-line failure message with its exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptdaemon", description="Durable delivery of filled-in forms."
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", metavar="PATH", help="config file")
        sub.add_argument("--json", action="store_true", help="print JSON")
        return sub

    command("serve", "run the daemon")
    command("check-config", "validate the config file and print a summary")
    submit = command("submit", "create a submission")
    submit.add_argument("template", help="template id or name")
    submit.add_argument(
        "--data", default="-", help="JSON object, @file, or - for stdin (default)"
    )
    submit.add_argument("--scheduled-at", help="RFC 3339 time with offset")
    submit.add_argument("--idempotency-key")
    show = command("show", "one submission and its attempts")
    show.add_argument("id")
    listing = command("list", "list submissions, newest first")
    listing.add_argument("--status")
    listing.add_argument("--template", help="template id or name")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--cursor")
    for name, text in (("retry", "retry a submission now"), ("cancel", "cancel one")):
        command(name, text).add_argument("id")
    users = command("users", "manage users and their tokens (admin)")
    actions = users.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        # Also accepted after the action; SUPPRESS keeps an earlier value.
        sub.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS)
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        return sub

    add = action("add", "create a user; prints its token once")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may manage users")
    action("list", "list users")
    for name, text in (
        ("revoke", "delete a user: its token stops working at once"),
        ("rotate-token", "give a user a new token; the old one stops working"),
    ):
        action(name, text).add_argument("user", help="name or id")
    command("status", "the daemon's health, queue and database size")
    backup = command("backup", "copy the database, also while the daemon runs")
    backup.add_argument("path", help="where to write the copy (must not exist)")
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
    except CliError as exc:
        print(f"ptdaemon: {exc}", file=sys.stderr)
        code = exc.code
    except ConfigError as exc:
        print(f"ptdaemon: {exc}", file=sys.stderr)
        code = 2
    except PtdaemonError as exc:
        print(f"ptdaemon: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _config(args: argparse.Namespace) -> Config:
    if args.config is not None:
        if not Path(args.config).is_file():
            raise CliError(f"config file not found: {args.config}", 2)
        return load_config(args.config)
    default = Path("config.toml")
    return load_config(default if default.is_file() else None)


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.command == "serve":
        return _serve(config)
    if args.command == "check-config":
        return _check_config(config, args)
    if args.command == "backup":
        return _backup(config, args)
    if args.command == "status":
        return asyncio.run(_status(config, args))
    return asyncio.run(_client_command(config, args))


def _serve(config: Config) -> int:
    from ptdaemon.daemon import serve
    from ptdaemon.logs import setup_logging

    setup_logging(level=config.daemon.log_level, fmt=config.daemon.log_format)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))


def _check_config(config: Config, args: argparse.Namespace) -> int:
    from ptdaemon.daemon import check_templates

    check_templates(config)
    summary = {
        "config": str(config.config_path) if config.config_path else None,
        "state_dir": str(config.state_path),
        "listen": config.api.listen,
        "file_roots": [str(p) for p in config.file_root_paths],
        "templates": config.template_names(),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 0


def _backup(config: Config, args: argparse.Namespace) -> int:
    from ptdaemon.backup import backup_database
    from ptdaemon.daemon import DB_NAME

    destination = Path(args.path)
    if destination.exists():
        raise CliError(f"{destination} already exists; choose a new path", 2)
    if not destination.parent.is_dir():
        raise CliError(f"no such directory: {destination.parent}", 2)
    try:
        result = backup_database(config.state_path / DB_NAME, destination)
    except OSError as exc:
        raise CliError(f"cannot write {destination}: {exc.strerror or exc}") from exc
    if args.json:
        print(json.dumps(msgspec.to_builtins(result), indent=2))
    else:
        print(
            f"backup written: {result.path} ({result.bytes} bytes,"
            f" {result.submissions} submissions, {result.attempts} attempts)"
        )
    return 0


async def _status(config: Config, args: argparse.Namespace) -> int:
    from ptdaemon.backup import database_size, read_queue
    from ptdaemon.daemon import DB_NAME, StateLock

    pid = StateLock(config.state_path).holder()
    health = "not running" if pid is None else await _health(config)
    database = config.state_path / DB_NAME
    report: dict[str, Any] = {
        "health": health,
        "pid": pid,
        "listen": config.api.listen,
        "queue": None,
        "database": None,
    }
    if database.is_file():
        report["queue"] = msgspec.to_builtins(read_queue(database))
        report["database"] = msgspec.to_builtins(database_size(database))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
    return 0 if health == "ready" else 1


async def _health(config: Config) -> str:
    """What /readyz says: ready, not ready (with its code), or unreachable."""
    client = Client(config)
    try:
        status, payload = await client.probe("/readyz", STATUS_TIMEOUT_SECONDS)
    except CliError:
        return "unreachable"
    finally:
        await client.close()
    if status == 200:
        return "ready"
    code = payload.get("error", {}).get("code") if isinstance(payload, dict) else None
    return f"not ready ({code or status})"


def _print_status(report: dict[str, Any]) -> None:
    pid = f", pid {report['pid']}" if report["pid"] is not None else ""
    print(f"daemon: {report['health']}{pid}")
    print(f"listen: {report['listen']}")
    queue = report["queue"]
    if queue is not None:
        oldest = queue["oldest_due_age_seconds"]
        waited = "" if oldest is None else f", oldest due {oldest:.1f} s ago"
        print(f"queue: {queue['depth']} due, {queue['processing']} in flight{waited}")
    database = report["database"]
    if database is not None:
        print(
            f"database: {database['path']}, {database['bytes']} bytes"
            f" (WAL {database['wal_bytes']}, free {database['free_bytes']})"
        )


# -- the client side ---------------------------------------------------------


class Client:
    """A small JSON client for the control API of a running daemon."""

    def __init__(self, config: Config) -> None:
        self.config = config
        listen = config.api.parse_listen()
        if isinstance(listen, str):
            self.base = "http://localhost"
            self.connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=listen)
        else:
            host, port = listen
            host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
            if ":" in host:
                host = f"[{host}]"
            self.base = f"http://{host}:{port}"
            self.connector = aiohttp.TCPConnector()

    async def probe(self, path: str, timeout_seconds: float) -> tuple[int, Any]:
        """GET an open route (no token); raise CliError if nothing answers."""
        timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        async with aiohttp.ClientSession(
            connector=self.connector, connector_owner=False, timeout=timeout
        ) as session:
            try:
                async with session.get(self.base + path) as response:
                    return response.status, await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise CliError(f"no answer from {path}: {type(exc).__name__}") from exc

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {_token(self.config)}"}
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(
            connector=self.connector, connector_owner=False, timeout=timeout
        ) as session:
            try:
                async with session.request(
                    method, self.base + path, json=body, headers=headers
                ) as response:
                    payload = await response.json(content_type=None)
                    status = response.status
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise CliError(
                    f"cannot reach the daemon at {self.config.api.listen}: "
                    f"{type(exc).__name__}"
                ) from exc
        if status >= 400:
            error = (
                (payload or {}).get("error", {}) if isinstance(payload, dict) else {}
            )
            message = error.get("message", f"HTTP {status}")
            raise CliError(
                f"{message} ({error.get('code', status)})",
                2 if status in USAGE_STATUSES else 1,
            )
        return payload

    async def close(self) -> None:
        await self.connector.close()


def _token(config: Config) -> str:
    env = os.environ.get("PTDAEMON_TOKEN")
    if env:
        return env.strip()
    path = config.state_path / "admin.token"
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CliError(
            f"cannot read the admin token at {path} ({exc.strerror});"
            " set PTDAEMON_TOKEN"
        ) from exc


async def _client_command(config: Config, args: argparse.Namespace) -> int:
    client = Client(config)
    try:
        handler = {
            "submit": _submit,
            "show": _show,
            "list": _list,
            "retry": _retry,
            "cancel": _cancel,
            "users": _users,
        }[args.command]
        await handler(client, args)
    finally:
        await client.close()
    return 0


def _read_data(text: str) -> Any:
    if text == "-":
        raw = sys.stdin.read()
    elif text.startswith("@"):
        try:
            raw = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot read {text[1:]}: {exc.strerror}", 2) from exc
    else:
        raw = text
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CliError(f"--data is not valid JSON: {exc}", 2) from exc
    if not isinstance(data, dict):
        raise CliError("--data must be a JSON object", 2)
    return data


async def _template_id(client: Client, name_or_id: str) -> str:
    templates = (await client.call("GET", "/v1/templates"))["items"]
    wanted = unicodedata.normalize("NFC", name_or_id)
    for template in templates:
        if wanted in (template["id"], template["name"]):
            return str(template["id"])
    raise CliError(f"no template named {name_or_id!r}", 2)


async def _submit(client: Client, args: argparse.Namespace) -> None:
    data = _read_data(args.data)
    body: dict[str, Any] = {
        "form_template_id": await _template_id(client, args.template),
        "data": data,
    }
    if args.scheduled_at:
        body["scheduled_at"] = args.scheduled_at
    if args.idempotency_key is not None:
        body["idempotency_key"] = args.idempotency_key
    sub = await client.call("POST", "/v1/submissions", body)
    _print_submission(sub, args.json)


async def _show(client: Client, args: argparse.Namespace) -> None:
    sub = await client.call("GET", f"/v1/submissions/{args.id}")
    attempts = (await client.call("GET", f"/v1/submissions/{args.id}/attempts"))[
        "items"
    ]
    if args.json:
        print(json.dumps({**sub, "attempts": attempts}, indent=2, ensure_ascii=False))
        return
    _print_submission(sub, False)
    for attempt in attempts:
        print(
            f"attempt {attempt['number']}: {attempt['outcome']}"
            f" at {attempt['started_at']} in {attempt['duration_ms']} ms"
            + (f", status {attempt['status']}" if attempt["status"] else "")
            + (
                f", {attempt['error_category']}: {attempt['error_message']}"
                if attempt["error_category"]
                else ""
            )
        )


async def _list(client: Client, args: argparse.Namespace) -> None:
    query = [f"limit={args.limit}"]
    if args.status:
        query.append(f"status={args.status}")
    if args.template:
        query.append(f"form_template_id={await _template_id(client, args.template)}")
    if args.cursor:
        query.append(f"cursor={args.cursor}")
    page = await client.call("GET", "/v1/submissions?" + "&".join(query))
    if args.json:
        print(json.dumps(page, indent=2, ensure_ascii=False))
        return
    for sub in page["items"]:
        print(f"{sub['id']}  {sub['status']:<10}  {sub['created_at']}")
    if page["next_cursor"]:
        print(f"next cursor: {page['next_cursor']}", file=sys.stderr)


async def _retry(client: Client, args: argparse.Namespace) -> None:
    _print_submission(
        await client.call("POST", f"/v1/submissions/{args.id}/retry"), args.json
    )


async def _cancel(client: Client, args: argparse.Namespace) -> None:
    _print_submission(
        await client.call("POST", f"/v1/submissions/{args.id}/cancel"), args.json
    )


async def _users(client: Client, args: argparse.Namespace) -> None:
    if args.action == "add":
        body = {"name": args.name, "admin": args.admin}
        _print_user(await client.call("POST", "/v1/users", body), args.json)
        return
    users = (await client.call("GET", "/v1/users"))["items"]
    if args.action == "list":
        if args.json:
            print(json.dumps({"items": users}, indent=2, ensure_ascii=False))
            return
        for user in users:
            role = "admin" if user["admin"] else "user"
            print(f"{user['id']}  {role:<5}  {user['created_at']}  {user['name']}")
        return
    wanted = unicodedata.normalize("NFC", args.user)
    found = [u for u in users if wanted in (u["id"], u["name"])]
    if not found:
        raise CliError(f"no user named {args.user!r}", 2)
    user_id = found[0]["id"]
    if args.action == "revoke":
        await client.call("DELETE", f"/v1/users/{user_id}")
        print(f"revoked {found[0]['name']} ({user_id})", file=sys.stderr)
        return
    _print_user(await client.call("POST", f"/v1/users/{user_id}/token"), args.json)


def _print_user(user: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(user, indent=2, ensure_ascii=False))
        return
    for key in ("id", "name", "admin", "created_at", "token"):
        print(f"{key}: {user[key]}")
    print("the token is shown this once; keep it safe", file=sys.stderr)


def _print_submission(sub: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(sub, indent=2, ensure_ascii=False))
        return
    for key in (
        "id",
        "status",
        "form_template_id",
        "retry_count",
        "next_retry_at",
        "error_category",
        "error_message",
        "created_at",
    ):
        print(f"{key}: {sub[key]}")
