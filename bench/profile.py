"""Where ptdaemon's time goes: a burst of single creates under py-spy.

    .venv/bin/python -m bench.profile [--forms 20000] [--out DIR]

Runs `ptdaemon serve` under `py-spy record` (all threads, active samples
only), sends a burst through it to the receiver, stops the daemon with
SIGTERM, and prints the functions with the most samples: by their own time
and including what they call. The collapsed stacks stay in DIR for a flame
graph.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import TICKS, Children, descendants
from bench.run import Receiver, forms
from bench.systems import Env, Ptdaemon


def frame_name(frame: str) -> str:
    """`function (path:line)` -> `function (file)`, without the line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if "ptdaemon" in parts else Path(path).name
    return f"{name} ({short})"


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process, by thread id."""
    found = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        fields = stat.read_text().rsplit(")", 1)[1].split()
        found[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    return found


# py-spy counts a thread blocked in these C calls as active: the SQLite
# connection threads waiting for work (queue get) and the loop's executor
# thread waiting for a job. Lines of the pinned aiosqlite and of Python 3.11.
WAITS = ("aiosqlite/core.py:59)", "concurrent/futures/thread.py:81)")


def summarise(collapsed: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or stack.endswith(WAITS):
            continue
        count = int(count_text)
        thread, *raw = stack.split(";")
        frames = [frame_name(frame) for frame in raw]
        if not frames:
            continue
        threads[thread.split(": ", 1)[-1]] += count
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    lines = [f"{total} samples (all threads, active, waits left out)", ""]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in threads.most_common()]
    lines += ["", "own time:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    lines += ["", "including callees:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]

    return "\n".join(lines)


async def commit_figures(daemon: Ptdaemon) -> str:
    """Group commits so far, from the daemon's /metrics."""
    assert daemon.session is not None
    async with daemon.session.get(
        daemon.base + "/metrics", headers=daemon.headers
    ) as r:
        text = await r.text()
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(
            (
                "ptdaemon_store_commit_batch_size_",
                "ptdaemon_store_commit_duration_seconds_",
            )
        ):
            found[name.removeprefix("ptdaemon_store_commit_")] = float(value)
    count = found.get("batch_size_count", 0.0)
    if not count:
        return "group commits: none reported"
    ops = found.get("batch_size_sum", 0.0)
    seconds = found.get("duration_seconds_sum", 0.0)
    return (
        f"group commits: {count:,.0f}, {ops / count:.1f} writes each on average,"
        f" {seconds / count * 1000:.2f} ms each on average"
    )


async def profile(count: int, out: Path, children: Children, spy: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    collapsed = out / "ptdaemon.collapsed.txt"
    with tempfile.TemporaryDirectory(prefix="ptdaemon-profile-") as work:
        receiver = Receiver(children, Path(work) / "receiver.log")
        env = Env(children, Path(work), receiver.url + "/forms", itertools.count())
        daemon = Ptdaemon()
        if spy:
            program = str(Path(sys.executable).with_name("py-spy"))
            daemon.wrapper = [program, "record", "--format", "raw", "--rate", "250"]
            daemon.wrapper += ["--output", str(collapsed), "--threads", "--"]
        try:
            await daemon.start(env)
            batch = forms("profile", count)
            assert daemon.proc is not None
            pid = descendants(daemon.proc.pid)[1 if spy else 0]
            before = thread_cpu(pid)
            started = time.time()
            await daemon.burst(batch)
            await receiver.wait(count, 600)
            after = thread_cpu(pid)
            commits = await commit_figures(daemon)
            arrivals, duplicates = await receiver.dump()
            seconds = max(arrivals.values()) - started
            print(
                f"{len(arrivals)} of {count} forms arrived in {seconds:.1f} s"
                f" ({count / seconds:,.0f}/s),"
                f" {duplicates} duplicates",
                file=sys.stderr,
            )
            spent = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
            main_thread = spent.pop(pid, 0.0)
            others = ", ".join(
                f"{cpu:.2f}" for cpu in sorted(spent.values())[::-1] if cpu
            )
            print(
                f"CPU seconds of the daemon's threads: event loop {main_thread:.2f};"
                f" others (SQLite connections, executor) {others}",
                file=sys.stderr,
            )
            print(commits, file=sys.stderr)
            # SIGTERM to the daemon alone: py-spy writes its file once it exits.
            os.kill(pid, signal.SIGTERM)
            await asyncio.to_thread(daemon.proc.wait, 60)
        finally:
            await receiver.session.close()
            if daemon.session is not None:
                await daemon.session.close()
            children.stop_all()
    return collapsed


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--forms", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--no-spy", action="store_true", help="only the CPU of each thread"
    )
    args = parser.parse_args()
    children = Children()
    try:
        import uvloop

        collapsed = uvloop.run(profile(args.forms, args.out, children, not args.no_spy))
    finally:
        children.stop_all()
    if not args.no_spy:
        print(summarise(collapsed, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
