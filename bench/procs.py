"""Child processes of the bench, and what /proc says about them.

Every process the bench starts goes through `Children.start`, and
`Children.stop_all` ends each of them by its own PID (SIGTERM, then SIGKILL),
also on error or Ctrl-C. Figures cover a process and all its descendants.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

TICKS = os.sysconf("SC_CLK_TCK")


class Children:
    """The processes this bench started, to be stopped by PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[Any]:
        stderr: IO[Any] | int = subprocess.DEVNULL
        if log is not None:
            stderr = log.open("ab")
        proc = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            # Own process group: a Ctrl-C at the terminal reaches the bench
            # only, which then stops each child itself.
            start_new_session=True,
        )
        if log is not None and not isinstance(stderr, int):
            stderr.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        """SIGTERM to the process and its descendants, by PID; SIGKILL if needed."""
        pids = descendants(proc.pid)
        _signal(pids, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal([*pids, *descendants(proc.pid)], signal.SIGKILL)
            proc.wait(5)
        # Children that outlived their parent (a prefork pool's workers).
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids[1:]):
            if time.monotonic() > deadline:
                _signal(pids[1:], signal.SIGKILL)
                break
            time.sleep(0.05)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def kill(self, proc: subprocess.Popen[Any]) -> None:
        """SIGKILL the process alone, as a crash would."""
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5)


def _signal(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def descendants(pid: int) -> list[int]:
    """The process and all its descendants, parents first."""
    found = [pid]
    index = 0
    while index < len(found):
        current = found[index]
        index += 1
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                found.extend(int(child) for child in task.read_text().split())
    return found


def _tree(roots: Iterable[int]) -> list[int]:
    return [pid for root in roots for pid in descendants(root)]


def cpu_seconds(roots: Iterable[int]) -> float:
    """User plus system CPU of the trees, reaped children included."""
    total = 0
    for pid in _tree(roots):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            # utime, stime, cutime, cstime: fields 14-17 of proc(5).
            total += sum(int(value) for value in fields[11:15])
    return total / TICKS


def _status_sum(roots: Iterable[int], keys: tuple[str, ...], tasks: bool) -> int:
    total = 0
    for pid in _tree(roots):
        files = (
            list(Path(f"/proc/{pid}/task").glob("*/status"))
            if tasks
            else [Path(f"/proc/{pid}/status")]
        )
        for status in files:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for line in status.read_text().splitlines():
                    name, _, value = line.partition(":")
                    if name in keys:
                        total += int(value.split()[0])
    return total


def rss_mb(roots: Iterable[int]) -> float:
    return _status_sum(roots, ("VmRSS",), tasks=False) / 1024


def peak_rss_mb(roots: Iterable[int]) -> float:
    """Sum of each live process's own peak RSS (VmHWM)."""
    return _status_sum(roots, ("VmHWM",), tasks=False) / 1024


def wakeups(roots: Iterable[int]) -> int:
    """Context switches, voluntary and not, of every thread of the trees."""
    keys = ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
    return _status_sum(roots, keys, tasks=True)


@dataclass
class Usage:
    cpu: float
    switches: int


def usage(roots: Iterable[int]) -> Usage:
    roots = list(roots)
    return Usage(cpu_seconds(roots), wakeups(roots))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()
