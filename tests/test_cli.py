"""The `ptdaemon` command as a user runs it: a child process, exit codes, output."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

COMMAND_TIMEOUT_SECONDS = 30.0
START_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 10.0
SETTLE_TIMEOUT_SECONDS = 15.0
ID_LINE = re.compile(r"^id: (\S+)$", re.MULTILINE)


def free_port() -> int:
    """A loopback port that nothing listens on (bound once, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def write_config(root: Path, port: int, name: str = "config.toml") -> Path:
    path = root / name
    path.write_text(
        "[daemon]\n"
        'state_dir = "state"\n'
        "shutdown_grace_seconds = 5\n"
        "[api]\n"
        f'listen = "127.0.0.1:{port}"\n'
        "rate_per_second = 0\n"
        "[dispatch]\n"
        'file_roots = ["drop"]\n'
        "\n[[templates]]\n"
        'name = "drop"\n'
        'method = "FILE"\n'
        'target = {directory = "drop", filename = "{id}.json"}\n'
        'required_fields = ["name"]\n',
        encoding="utf-8",
    )
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PTDAEMON_TOKEN"}
    env.update(extra)
    return env


def ptdaemon(
    *args: str,
    cwd: Path,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m ptdaemon ARGS` to the end, with a bounded wait."""
    return subprocess.run(
        [sys.executable, "-m", "ptdaemon", *args],
        cwd=cwd,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        encoding="utf-8",
        env=env or cli_env(),
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )


def one_line(stderr: str) -> str:
    """The single message line a failing command must print, and nothing else."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO|WARNING|ERROR) ")


def one_message(stderr: str) -> str:
    """`serve` logs to stderr too: besides log lines, exactly one message line."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.strip().splitlines() if not LOG_LINE.match(ln)]
    assert len(lines) == 1, stderr
    return lines[0]


@dataclass
class Served:
    """A `ptdaemon serve` child process and the files around it."""

    root: Path
    config: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            reply = conn.getresponse()
            body = reply.read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        return reply.status == 200 and json.loads(body) == {"status": "ok"}

    def stop(self) -> int | None:
        """SIGTERM by pid, then wait; kill only after 10 s (then None)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_SECONDS)
            return None


def start_serve(root: Path) -> Served:
    port = free_port()
    config = write_config(root, port)
    log = root / "serve.log"
    with log.open("ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ptdaemon", "serve", "--config", str(config)],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=cli_env(),
        )
    served = Served(root, config, port, proc, log)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not served.healthy():
        if proc.poll() is not None or time.monotonic() > deadline:
            served.stop()
            raise AssertionError(f"daemon did not come up:\n{served.log_text()}")
        time.sleep(0.05)
    return served


@contextlib.contextmanager
def serving(root: Path) -> Iterator[Served]:
    """`ptdaemon serve` in `root` for the length of the block."""
    served = start_serve(root)
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(tmp_path_factory.mktemp("cli")) as served:
        yield served


@pytest.fixture
def own_daemon(tmp_path: Path) -> Iterator[Served]:
    with serving(tmp_path) as served:
        yield served


def client(
    served: Served,
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """A client command with `--config` after its name, run in the daemon's folder."""
    command, *rest = args
    return ptdaemon(
        command,
        "--config",
        str(served.config),
        *rest,
        cwd=served.root,
        stdin=stdin,
        env=env,
    )


def submitted_id(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    match = ID_LINE.search(result.stdout)
    assert match, result.stdout
    return str(uuid.UUID(match.group(1)))


def shown(served: Served, sub_id: str) -> dict[str, object]:
    result = client(served, "show", sub_id, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def wait_completed(served: Served, sub_id: str) -> dict[str, object]:
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    while (sub := shown(served, sub_id))["status"] != "completed":
        assert sub["status"] in ("pending", "processing"), sub
        assert time.monotonic() < deadline, sub
        time.sleep(0.05)
    return sub


@pytest.fixture(scope="module")
def completed_id(daemon: Served) -> str:
    sub_id = submitted_id(client(daemon, "submit", "drop", "--data", '{"name":"Ada"}'))
    wait_completed(daemon, sub_id)
    return sub_id


# -- check-config ------------------------------------------------------------


def test_check_config_prints_a_summary(tmp_path: Path):
    write_config(tmp_path, 8999)

    result = ptdaemon("check-config", "--config", "config.toml", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "listen: 127.0.0.1:8999" in lines
    assert any(line.startswith("templates:") and "drop" in line for line in lines)
    assert result.stderr == ""


def test_check_config_json_resolves_paths_against_the_config_folder(tmp_path: Path):
    (tmp_path / "etc").mkdir()
    config = write_config(tmp_path / "etc", 8998)

    result = ptdaemon(
        "check-config", "--config", "etc/config.toml", "--json", cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["listen"] == "127.0.0.1:8998"
    assert summary["templates"] == ["drop"]
    assert Path(summary["config"]).resolve() == config.resolve()
    assert Path(summary["state_dir"]).resolve() == (tmp_path / "etc/state").resolve()
    assert [Path(p).resolve() for p in summary["file_roots"]] == [
        (tmp_path / "etc/drop").resolve()
    ]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('[daemon]\nstat_dir = "x"\n', "daemon.stat_dir"),
        ('[dispatch]\nconcurrency = "many"\n', "dispatch.concurrency"),
        ('[api]\nmetrics_public = "yes"\n', "api.metrics_public"),
        ("[smtp]\nport = 70000\n", "smtp.port"),
        (
            '[[templates]]\nname = "x"\nmethod = "FILE"\n'
            'target = {directory = "d", bogus = 1}\n',
            "templates[0].target.bogus",
        ),
        (
            '[[templates]]\nname = "x"\nmethod = "FILE"\n'
            'target = {directory = "d"}\nmax_retries = "3"\n',
            "templates[0].max_retries",
        ),
        ("[daemon\n", "bad.toml"),
    ],
)
def test_check_config_names_the_bad_key_in_one_line(tmp_path: Path, text, names):
    (tmp_path / "bad.toml").write_text(text, encoding="utf-8")

    result = ptdaemon("check-config", "--config", "bad.toml", cwd=tmp_path)

    assert result.returncode == 2
    assert names in one_line(result.stderr)
    assert result.stdout == ""


def test_check_config_of_a_missing_file_names_the_path(tmp_path: Path):
    result = ptdaemon("check-config", "--config", "nowhere/config.toml", cwd=tmp_path)

    assert result.returncode == 2
    assert "nowhere/config.toml" in one_line(result.stderr)
    assert result.stdout == ""


def test_check_config_without_a_file_uses_the_defaults(tmp_path: Path):
    text = ptdaemon("check-config", cwd=tmp_path)
    as_json = ptdaemon("check-config", "--json", cwd=tmp_path)

    assert text.returncode == 0, text.stderr
    assert "listen: 127.0.0.1:8425" in text.stdout.splitlines()
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["config"] is None
    assert summary["listen"] == "127.0.0.1:8425"
    assert summary["templates"] == []
    assert summary["file_roots"] == []
    expected = (tmp_path / "ptdaemon-data").resolve()
    assert Path(summary["state_dir"]).resolve() == expected


def test_check_config_without_a_flag_reads_the_local_config_toml(tmp_path: Path):
    write_config(tmp_path, 8997)

    result = ptdaemon("check-config", "--json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["listen"] == "127.0.0.1:8997"


# -- client commands against a running daemon --------------------------------


def test_submit_prints_the_id_and_the_submission_completes(daemon: Served):
    result = client(daemon, "submit", "drop", "--data", '{"name":"Ada"}')

    sub_id = submitted_id(result)
    assert "status: pending" in result.stdout.splitlines()
    sub = wait_completed(daemon, sub_id)
    assert sub["data"] == {"name": "Ada"}
    written = daemon.root / "drop" / f"{sub_id}.json"
    assert json.loads(written.read_text(encoding="utf-8")) == {"name": "Ada"}


def test_submit_reads_data_from_a_file(daemon: Served):
    (daemon.root / "form.json").write_text('{"name": "Zoë Łódź"}', encoding="utf-8")

    sub_id = submitted_id(client(daemon, "submit", "drop", "--data", "@form.json"))

    assert wait_completed(daemon, sub_id)["data"] == {"name": "Zoë Łódź"}


def test_submit_reads_data_from_stdin(daemon: Served):
    result = client(daemon, "submit", "drop", "--data", "-", stdin='{"name": "Grace"}')

    assert wait_completed(daemon, submitted_id(result))["data"] == {"name": "Grace"}


def test_submit_json_prints_the_submission(daemon: Served):
    result = client(daemon, "submit", "drop", "--json", "--data", '{"name": "Lin"}')

    assert result.returncode == 0, result.stderr
    sub = json.loads(result.stdout)
    assert sub["data"] == {"name": "Lin"}
    assert str(uuid.UUID(sub["id"])) == sub["id"]


def test_show_prints_the_status_and_each_attempt(daemon: Served, completed_id: str):
    result = client(daemon, "show", completed_id)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"id: {completed_id}" in lines
    assert "status: completed" in lines
    assert any(line.startswith("attempt 1: success") for line in lines), lines


def test_show_json_has_the_attempts(daemon: Served, completed_id: str):
    sub = shown(daemon, completed_id)

    assert sub["id"] == completed_id
    assert sub["status"] == "completed"
    attempts = sub["attempts"]
    assert isinstance(attempts, list)
    assert len(attempts) == 1
    assert attempts[0]["number"] == 1
    assert attempts[0]["outcome"] == "success"


def test_list_includes_the_submission(daemon: Served, completed_id: str):
    result = client(daemon, "list")

    assert result.returncode == 0, result.stderr
    [line] = [ln for ln in result.stdout.splitlines() if completed_id in ln]
    assert "completed" in line


def test_list_json_includes_the_submission(daemon: Served, completed_id: str):
    result = client(daemon, "list", "--json", "--status", "completed")

    assert result.returncode == 0, result.stderr
    page = json.loads(result.stdout)
    assert completed_id in [item["id"] for item in page["items"]]
    assert all(item["status"] == "completed" for item in page["items"])


def test_list_finds_the_daemon_through_the_local_config_toml(
    daemon: Served, completed_id: str
):
    result = ptdaemon("list", cwd=daemon.root)

    assert result.returncode == 0, result.stderr
    assert completed_id in result.stdout


@pytest.mark.parametrize(("command", "verb"), [("cancel", "cancel"), ("retry", "retr")])
def test_cancel_or_retry_of_a_completed_submission_is_a_conflict(
    daemon: Served, completed_id: str, command: str, verb: str
):
    result = client(daemon, command, completed_id)

    assert result.returncode == 1
    message = one_line(result.stderr).lower()
    assert "completed" in message
    assert verb in message
    assert result.stdout == ""
    assert shown(daemon, completed_id)["status"] == "completed"


def test_submit_without_a_required_field_is_a_usage_error(daemon: Served):
    result = client(daemon, "submit", "drop", "--data", '{"nom": "Ada"}')

    assert result.returncode == 2
    assert "name" in one_line(result.stderr)
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ("{name: Ada}", "JSON"),
        ("", "JSON"),
        ('["Ada"]', "object"),
        ("@missing.json", "missing.json"),
    ],
)
def test_submit_with_bad_data_is_a_usage_error(daemon: Served, data: str, says: str):
    result = client(daemon, "submit", "drop", "--data", data)

    assert result.returncode == 2
    assert says in one_line(result.stderr)
    assert result.stdout == ""


def test_submit_to_an_unknown_template_is_a_usage_error(daemon: Served):
    result = client(daemon, "submit", "no-such-template", "--data", '{"name": "A"}')

    assert result.returncode == 2
    assert "no-such-template" in one_line(result.stderr)


@pytest.mark.parametrize("sub_id", [str(uuid.uuid4()), "not-a-uuid"])
def test_show_of_an_unknown_id_fails(daemon: Served, sub_id: str):
    result = client(daemon, "show", sub_id)

    assert result.returncode == 1
    assert one_line(result.stderr)
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args",
    [("list",), ("show", "{id}"), ("submit", "drop", "--data", '{"name": "A"}')],
)
def test_a_bad_token_fails_as_unauthorized(
    daemon: Served, completed_id: str, args: tuple[str, ...]
):
    argv = [arg.replace("{id}", completed_id) for arg in args]

    result = client(daemon, *argv, env=cli_env(PTDAEMON_TOKEN="bad"))

    assert result.returncode == 1
    assert "unauthorized" in one_line(result.stderr).lower()
    assert result.stdout == ""


def test_a_second_serve_on_the_same_state_dir_names_the_lock_holder(daemon: Served):
    proc = subprocess.Popen(
        [sys.executable, "-m", "ptdaemon", "serve", "--config", str(daemon.config)],
        cwd=daemon.root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        _, err = proc.communicate(timeout=START_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=STOP_TIMEOUT_SECONDS)
        pytest.fail("a second serve on a locked state dir kept running")

    assert proc.returncode != 0
    stderr = err.decode("utf-8", errors="replace")
    message = one_message(stderr)
    assert message.startswith("ptdaemon: ")
    assert f"pid {daemon.proc.pid}" in message
    assert daemon.healthy()


# -- start and stop ------------------------------------------------------------


def test_serve_exits_0_on_sigterm_and_then_clients_cannot_reach_it(
    own_daemon: Served,
):
    assert own_daemon.stop() == 0

    result = client(own_daemon, "list")

    assert result.returncode == 1
    assert "cannot reach the daemon" in one_line(result.stderr)
    assert "daemon stopped" in own_daemon.log_text()


def test_serve_on_a_port_in_use_fails_in_one_line(tmp_path: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, port)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ptdaemon", "serve", "--config", str(config)],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )
        try:
            _, err = proc.communicate(timeout=START_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=STOP_TIMEOUT_SECONDS)
            pytest.fail("serve kept running on a port that is in use")

    assert proc.returncode != 0
    stderr = err.decode("utf-8", errors="replace")
    message = one_message(stderr)
    assert message.startswith("ptdaemon: ")
    assert str(port) in message
