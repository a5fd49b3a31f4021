"""Run the same workloads through every system in alternating rounds; print figures.

    .venv/bin/python -m bench.run           # the full run (about 16 minutes)
    .venv/bin/python -m bench.run --smoke   # ptdaemon and the shape, 300 forms

Each round starts every system afresh, in turn, and measures: end-to-end
throughput of a burst (first submit to last arrival), submit throughput, CPU
seconds per 1,000 deliveries and peak RSS of all the system's processes,
submit-to-arrival latency at offered rates (open loop), and the lateness of
forms scheduled 2 s ahead. Once after the rounds: idle CPU and wake-ups
with submissions scheduled far ahead, and ptdaemon with 1,000,000 rows
(RSS, READY after SIGKILL). Every process started is stopped by PID at the
end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench import procs
from bench.procs import Children
from bench.report import Figures, report
from bench.systems import PYTHON, REPO, SYSTEMS, Env, Form, Ptdaemon, System

ALL = [
    "ptdaemon",
    "ptdaemon batch",
    "shape",
    "shape batch",
    "bare loop",
    "celery prefork",
    "celery tuned",
    "huey sqlite",
    "arq",
]


@dataclass
class Plan:
    systems: list[str]
    rounds: int
    forms: int
    peer_forms: int
    rates: list[int]
    rate_seconds: float
    scheduled: int
    idle_rows: int
    peer_idle_rows: int
    idle_seconds: float
    big_rows: int
    big_processing: int


FULL = Plan(
    systems=ALL,
    rounds=3,
    forms=20000,
    peer_forms=5000,
    rates=[100, 500],
    rate_seconds=5.0,
    scheduled=200,
    idle_rows=100000,
    peer_idle_rows=10000,
    idle_seconds=10.0,
    big_rows=1000000,
    big_processing=10000,
)
SMOKE = Plan(
    systems=["ptdaemon", "shape"],
    rounds=1,
    forms=300,
    peer_forms=300,
    rates=[100],
    rate_seconds=1.0,
    scheduled=20,
    idle_rows=0,
    peer_idle_rows=0,
    idle_seconds=0.0,
    big_rows=0,
    big_processing=0,
)
IDLE_SETTLE_SECONDS = 16.0
PEERS = {"celery prefork", "celery tuned", "huey sqlite", "arq"}


def forms(prefix: str, count: int) -> list[Form]:
    return [
        {
            "id": f"{prefix}-{i}",
            "full_name": "Ada Lovelace",
            "email": "ada@example.org",
            "address": {"street": "12 St James's Square", "postcode": "SW1Y 4JH"},
            "permit": "residential parking",
            "n": i,
        }
        for i in range(count)
    ]


class Receiver:
    """The receiver process and a client for its control routes."""

    def __init__(self, children: Children, log: Path) -> None:
        self.proc = children.start(
            [PYTHON, "-m", "bench.receiver"],
            log=log,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900))

    async def wait(self, count: int, timeout: float) -> int:
        url = f"{self.url}/wait?n={count}&timeout={timeout}"
        async with self.session.get(url) as reply:
            return int((await reply.json())["count"])

    async def dump(self) -> tuple[dict[str, float], int]:
        async with self.session.get(f"{self.url}/dump") as reply:
            payload = await reply.json()
        return payload["arrivals"], int(payload["duplicates"])

    async def reset(self) -> None:
        async with self.session.post(f"{self.url}/reset", data=b"") as reply:
            await reply.read()


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


# -- one round of one system -------------------------------------------------


async def deliveries(
    receiver: Receiver, ids: Sequence[str], timeout: float
) -> tuple[dict[str, float], int, int]:
    """Wait for every id; return their arrivals, the missing count, duplicates."""
    await receiver.wait(len(ids), timeout)
    arrivals, duplicates = await receiver.dump()
    missing = sum(1 for key in ids if key not in arrivals)

    return arrivals, missing, duplicates


async def measure_burst(
    system: System, env: Env, receiver: Receiver, figures: Figures, count: int, tag: str
) -> None:
    batch = forms(f"{tag}-b", count)
    ids = [form["id"] for form in batch]
    roots = system.roots()
    before = procs.usage(roots)
    started = time.time()
    accepted = await system.burst(batch)
    started = system.started or started
    arrivals, missing, duplicates = await deliveries(
        receiver, ids, max(120.0, count / 20)
    )
    after = procs.usage(roots)
    name = system.name
    check(figures, name, "burst", missing, duplicates)
    last = max(arrivals[key] for key in ids if key in arrivals)
    figures.add(name, "e2e_per_s", count / (last - started))
    if system.has_submit:
        figures.add(name, "submit_per_s", count / (accepted - started))
    figures.add(name, "cpu_per_1000", (after.cpu - before.cpu) / count * 1000)
    figures.add(name, "peak_rss_mb", procs.peak_rss_mb(roots))
    await receiver.reset()


async def measure_open(
    system: System,
    receiver: Receiver,
    figures: Figures,
    rate: int,
    seconds: float,
    tag: str,
) -> None:
    batch = forms(f"{tag}-r{rate}", int(rate * seconds))
    start = time.time() + 0.2
    await system.open_loop(batch, start, rate)
    ids = [form["id"] for form in batch]
    arrivals, missing, duplicates = await deliveries(receiver, ids, 120.0)
    check(figures, system.name, f"{rate}/s", missing, duplicates)
    latencies = [
        (arrivals[key] - (start + index / rate)) * 1000
        for index, key in enumerate(ids)
        if key in arrivals
    ]
    figures.add(system.name, f"p50_ms_{rate}", percentile(latencies, 0.5))
    figures.add(system.name, f"p99_ms_{rate}", percentile(latencies, 0.99))
    await receiver.reset()


async def measure_at(
    system: System, receiver: Receiver, figures: Figures, count: int, tag: str
) -> None:
    batch = forms(f"{tag}-s", count)
    # Spread over one second from 2 s ahead: lateness, not a burst's throughput.
    first = time.time() + 2.0
    dues = [first + index / count for index in range(count)]
    await system.at(batch, dues)
    ids = [form["id"] for form in batch]
    arrivals, missing, duplicates = await deliveries(receiver, ids, 120.0)
    check(figures, system.name, "scheduled", missing, duplicates)
    late = [
        (arrivals[key] - due) * 1000
        for key, due in zip(ids, dues, strict=True)
        if key in arrivals
    ]
    figures.add(system.name, "late_p50_ms", percentile(late, 0.5))
    figures.add(system.name, "late_p99_ms", percentile(late, 0.99))
    figures.add(system.name, "late_max_ms", max(late))
    figures.add(system.name, "late_min_ms", min(late))
    figures.add(system.name, "early", sum(1 for value in late if value < 0))
    await receiver.reset()


def check(
    figures: Figures, system: str, workload: str, missing: int, duplicates: int
) -> None:
    if missing or duplicates:
        figures.notes.append(
            f"{system} {workload}: {missing} forms missing, {duplicates} duplicates"
        )
    figures.add(system, "lost", missing)
    figures.add(system, "duplicates", duplicates)


async def warm_up(system: System, receiver: Receiver, tag: str) -> None:
    """One delivery through the system, so that figures start from a ready system."""
    form = forms(f"{tag}-warm", 1)
    await system.burst(form)
    if await receiver.wait(1, 90.0) < 1:
        raise RuntimeError(f"{system.name}: the warm-up form did not arrive")
    await receiver.reset()


async def run_round(
    name: str, env: Env, receiver: Receiver, figures: Figures, plan: Plan, number: int
) -> None:
    system = SYSTEMS[name]()
    tag = f"{name.replace(' ', '_')}-{number}"
    print(f"  {name}: starting", file=sys.stderr, flush=True)
    try:
        await system.start(env)
        await warm_up(system, receiver, tag)
        count = plan.peer_forms if name in PEERS else plan.forms
        await measure_burst(system, env, receiver, figures, count, tag)
        if "open" in system.workloads:
            for rate in plan.rates:
                await measure_open(
                    system, receiver, figures, rate, plan.rate_seconds, tag
                )
        if "at" in system.workloads:
            await measure_at(system, receiver, figures, plan.scheduled, tag)
    finally:
        await system.stop(env)
        await receiver.reset()
    e2e = figures.get(name, "e2e_per_s")[-1]
    print(f"  {name}: {e2e:,.0f} forms/s end to end", file=sys.stderr, flush=True)


# -- once: idle, and a million rows -----------------------------------------


async def measure_idle(
    name: str, env: Env, receiver: Receiver, figures: Figures, plan: Plan
) -> None:
    system = SYSTEMS[name]()
    rows = plan.peer_idle_rows if name in PEERS else plan.idle_rows
    try:
        await system.start(env)
        await warm_up(system, receiver, f"{name}-idle")
        # Due in 30 minutes: inside the brokers' visibility timeout.
        due = time.time() + 1800
        batch = forms(f"{name}-idle", rows)
        await system.at(batch, [due] * rows)
        await system.quiesce()
        # Past the 15 s after which aiohttp closes an idle client connection,
        # a one-off wake-up that would otherwise fall into the window.
        await asyncio.sleep(IDLE_SETTLE_SECONDS)
        roots = system.roots()
        before = procs.usage(roots)
        await asyncio.sleep(plan.idle_seconds)
        after = procs.usage(roots)
        seconds = plan.idle_seconds
        figures.add(name, "idle_rows", rows)
        figures.add(name, "idle_cpu_pct", (after.cpu - before.cpu) / seconds * 100)
        figures.add(
            name, "idle_wakeups_per_s", (after.switches - before.switches) / seconds
        )
        figures.add(name, "idle_rss_mb", procs.rss_mb(roots))
    finally:
        await system.stop(env)
        await receiver.reset()


def fill_rows(db: Path, rows: int, processing: int) -> None:
    """Copy the one queued row into `rows` rows due in two hours, as a
    long-running daemon's backlog would look; `processing` of them as a
    SIGKILL mid-attempt leaves them."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA synchronous = OFF")
    columns = [row[1] for row in conn.execute("PRAGMA table_info(submissions)")]
    copied = [c for c in columns if c not in ("seq", "id", "data", "next_retry_at")]
    new_id = (
        "lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4'"
        " || substr(lower(hex(randomblob(2))), 2) || '-a'"
        " || substr(lower(hex(randomblob(2))), 2) || '-' || lower(hex(randomblob(6)))"
    )
    with conn:
        conn.execute(
            f"INSERT INTO submissions (id, data, next_retry_at, {', '.join(copied)})"
            " WITH RECURSIVE n(i) AS"
            " (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
            f" SELECT {new_id}, json_object('id', 'big-' || n.i, 'full_name', 'Ada'),"
            f" unixepoch() + 7200 + n.i * 0.001, {', '.join('s.' + c for c in copied)}"
            " FROM n, (SELECT * FROM submissions LIMIT 1) AS s",
            (rows - 1,),
        )
    mark_processing(conn, processing)
    conn.close()


def mark_processing(conn: sqlite3.Connection, count: int) -> None:
    with conn:
        conn.execute(
            "UPDATE submissions SET status = 'processing', processing_started_at = ?"
            " WHERE seq IN (SELECT seq FROM submissions WHERE status = 'pending'"
            " ORDER BY seq DESC LIMIT ?)",
            (time.time(), count),
        )


async def readyz_after(daemon: Ptdaemon, env: Env, started: float) -> float:
    """Poll /readyz from the bench until 200; seconds since `started`."""
    assert daemon.session is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            async with daemon.session.get(daemon.base + "/readyz") as reply:
                if reply.status == 200:
                    return time.monotonic() - started
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.01)
    raise RuntimeError("ptdaemon never answered /readyz 200")


async def measure_big(
    env: Env, receiver: Receiver, figures: Figures, plan: Plan
) -> None:
    """ptdaemon with a million rows: RSS, and READY after SIGKILL."""
    daemon = Ptdaemon()
    root = env.folder("ptdaemon-big")
    try:
        await daemon.start(env, root)
        await daemon.at(forms("big-seed", 1), [time.time() + 7200])
        await daemon.stop(env)
        db = root / "state" / "ptdaemon.db"
        print(f"  filling {plan.big_rows:,} rows", file=sys.stderr, flush=True)
        fill_rows(db, plan.big_rows, plan.big_processing)
        for label in ("first start", "after SIGKILL"):
            started = time.monotonic()
            ready_log = await daemon.launch(env)
            ready = await readyz_after(daemon, env, started)
            figures.add("ptdaemon", "big_ready_log_s", ready_log)
            figures.add("ptdaemon", "big_ready_s", ready)
            # The recovered attempts are due at once; let them finish.
            await receiver.wait(plan.big_processing, 120.0)
            arrivals, _ = await receiver.dump()
            figures.add("ptdaemon", "big_recovered", len(arrivals))
            await asyncio.sleep(3.0)
            assert daemon.proc is not None
            figures.add("ptdaemon", "big_rss_mb", procs.rss_mb([daemon.proc.pid]))
            figures.add(
                "ptdaemon", "big_peak_rss_mb", procs.peak_rss_mb([daemon.proc.pid])
            )
            await receiver.reset()
            print(f"  {label}: READY in {ready:.2f} s", file=sys.stderr, flush=True)
            env.children.kill(daemon.proc)
            daemon.proc = None
            conn = sqlite3.connect(db)
            mark_processing(conn, plan.big_processing)
            conn.close()
    finally:
        await daemon.stop(env)


async def run(plan: Plan, children: Children, json_out: Path | None) -> int:
    # Ctrl-C or SIGTERM cancels the run; the finally clauses stop every child.
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, main_task.cancel)
    begun = time.monotonic()
    loads = [procs.load_average()]
    figures = Figures()
    with tempfile.TemporaryDirectory(prefix="ptdaemon-bench-") as work:
        receiver = Receiver(children, Path(work) / "receiver.log")
        env = Env(children, Path(work), receiver.url + "/forms", itertools.count())
        try:
            for number in range(plan.rounds):
                print(
                    f"round {number + 1} of {plan.rounds}", file=sys.stderr, flush=True
                )
                # Alternate the order too, so that drift does not favour one system.
                order = plan.systems if number % 2 == 0 else plan.systems[::-1]
                for name in order:
                    await run_round(name, env, receiver, figures, plan, number)
            if plan.idle_seconds:
                for name in plan.systems:
                    if "idle" in SYSTEMS[name].workloads:
                        print(f"idle: {name}", file=sys.stderr, flush=True)
                        await measure_idle(name, env, receiver, figures, plan)
            if plan.big_rows and "ptdaemon" in plan.systems:
                await measure_big(env, receiver, figures, plan)
        finally:
            await receiver.session.close()
            children.stop_all()
    loads.append(procs.load_average())
    print(report(figures, plan, loads, time.monotonic() - begun))
    if json_out is not None:
        json_out.write_text(json.dumps(figures.values, indent=1))
    lost = sum(
        sum(figures.get(name, "lost")) + sum(figures.get(name, "duplicates"))
        for name in figures.values
    )
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="ptdaemon and the shape, a few hundred forms",
    )
    parser.add_argument(
        "--systems", help="comma-separated names, of: " + ", ".join(ALL)
    )
    parser.add_argument("--rounds", type=int)
    parser.add_argument(
        "--forms", type=int, help="burst size for ptdaemon, the shape and the bare loop"
    )
    parser.add_argument(
        "--peer-forms", type=int, help="burst size for Celery, huey and arq"
    )
    parser.add_argument("--no-idle", action="store_true")
    parser.add_argument("--no-big", action="store_true")
    parser.add_argument(
        "--json", type=Path, help="also write every figure as JSON here"
    )
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.systems:
        names = [name.strip() for name in args.systems.split(",")]
        unknown = [name for name in names if name not in SYSTEMS]
        if unknown:
            parser.error(f"unknown system {unknown[0]!r}")
        plan.systems = names
    plan.rounds = args.rounds or plan.rounds
    plan.forms = args.forms or plan.forms
    plan.peer_forms = args.peer_forms or plan.peer_forms
    if args.no_idle:
        plan.idle_seconds = 0
    if args.no_big:
        plan.big_rows = 0
    children = Children()
    try:
        import uvloop

        return uvloop.run(run(plan, children, args.json))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every started process stopped", file=sys.stderr)
        return 130
    finally:
        children.stop_all()


if __name__ == "__main__":
    sys.exit(main())
