"""The report of a run: figures per system, tables of medians, the targets."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.run import Plan


@dataclass
class Figures:
    """Per system: figure name -> one value per round."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, system: str, name: str, value: float) -> None:
        self.values.setdefault(system, {}).setdefault(name, []).append(value)

    def get(self, system: str, name: str) -> list[float]:
        return self.values.get(system, {}).get(name, [])

    def median(self, system: str, name: str) -> float | None:
        found = self.get(system, name)
        return statistics.median(found) if found else None


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


COLUMNS = [
    ("e2e_per_s", "e2e/s", 0),
    ("submit_per_s", "submit/s", 0),
    ("cpu_per_1000", "CPU s/1k", 3),
    ("peak_rss_mb", "peak RSS MB", 1),
]


def table(
    figures: Figures, systems: list[str], columns: list[tuple[str, str, int]]
) -> str:
    rows = [["system", *(title for _, title, _ in columns)]]
    rows += [
        [name, *(cell(figures.get(name, key), d) for key, _, d in columns)]
        for name in systems
        if name in figures.values
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(text.ljust(w) for text, w in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratios(figures: Figures, systems: list[str]) -> str:
    base_e2e = figures.median("ptdaemon", "e2e_per_s")
    base_cpu = figures.median("ptdaemon", "cpu_per_1000")
    lines = ["system           e2e vs ptdaemon   CPU/1k vs ptdaemon"]
    for name in systems:
        e2e = figures.median(name, "e2e_per_s")
        cpu = figures.median(name, "cpu_per_1000")
        if e2e is None or base_e2e is None or cpu is None or base_cpu is None:
            continue
        lines.append(f"{name:<16} {e2e / base_e2e:>14.2f}x {cpu / base_cpu:>19.2f}x")
    return "\n".join(lines)


@dataclass
class Target:
    text: str
    value: float | None
    limit: float
    unit: str
    higher_is_better: bool = False

    @property
    def failed(self) -> bool:
        if self.value is None:
            return False
        if self.higher_is_better:
            return self.value < self.limit
        return self.value > self.limit

    def line(self) -> str:
        if self.value is None:
            return f"  n/a   {self.text}: not measured in this run"
        sign = ">=" if self.higher_is_better else "<="
        verdict = "FAIL" if self.failed else "PASS"
        return (
            f"  {verdict}  {self.text}: {self.value:,.3g}{self.unit}"
            f" (target {sign} {self.limit:g}{self.unit})"
        )


def share(figures: Figures, name: str, key: str, base: str) -> float | None:
    value, ceiling = figures.median(name, key), figures.median(base, key)
    if value is None or ceiling is None:
        return None
    return value / ceiling


def targets(figures: Figures) -> list[Target]:
    med = figures.median
    return [
        Target(
            "end to end, single creates, vs the shape",
            share(figures, "ptdaemon", "e2e_per_s", "shape"),
            0.6,
            "x",
            True,
        ),
        Target(
            "end to end, batch creates, vs the bare loop",
            share(figures, "ptdaemon batch", "e2e_per_s", "bare loop"),
            0.5,
            "x",
            True,
        ),
        Target(
            "p99 submit-to-arrival at 500/s", med("ptdaemon", "p99_ms_500"), 10, " ms"
        ),
        Target(
            "lateness p99 of scheduled forms", med("ptdaemon", "late_p99_ms"), 5, " ms"
        ),
        Target(
            "idle wake-ups per second", med("ptdaemon", "idle_wakeups_per_s"), 0, "/s"
        ),
        Target("idle CPU, % of a core", med("ptdaemon", "idle_cpu_pct"), 0.05, "%"),
        Target(
            "CPU seconds per 1,000 deliveries",
            med("ptdaemon", "cpu_per_1000"),
            0.3,
            " s",
        ),
        Target("peak RSS in the burst", med("ptdaemon", "peak_rss_mb"), 60, " MB"),
        Target(
            "RSS with 1,000,000 scheduled rows",
            max(figures.get("ptdaemon", "big_peak_rss_mb"), default=None),
            100,
            " MB",
        ),
        Target(
            "READY after SIGKILL with 1,000,000 rows",
            med("ptdaemon", "big_ready_s"),
            3,
            " s",
        ),
    ]


def versions() -> str:
    found = []
    for package in (
        "ptdaemon",
        "aiohttp",
        "aiosqlite",
        "uvloop",
        "msgspec",
        "celery",
        "kombu",
        "redis",
        "huey",
        "arq",
    ):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{package} {version(package)}")
    redis = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    )
    found.append(
        redis.stdout.split(" sha=")[0].strip()
        if redis.returncode == 0
        else "redis-server missing"
    )
    return ", ".join(found)


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    python = f"{platform.python_implementation()} {platform.python_version()}"
    return f"{python}, {os.cpu_count()} cores, {cpu}, Linux {platform.release()}"


def report(figures: Figures, plan: Plan, loads: list[str], seconds: float) -> str:
    systems = [name for name in plan.systems if name in figures.values]
    parts = [
        f"machine: {machine()}",
        f"versions: {versions()}",
        f"load average (1, 5, 15 min) before / after: {loads[0]} / {loads[-1]}",
        f"rounds: {plan.rounds}; burst {plan.forms:,} forms"
        f" ({plan.peer_forms:,} for the queue peers);"
        f" open loop {', '.join(map(str, plan.rates))}/s for {plan.rate_seconds:g} s;"
        f" {plan.scheduled} forms scheduled 2 s ahead; took {seconds:.0f} s",
        "",
        "Burst: medians over rounds (min-max)",
        table(figures, systems, COLUMNS),
        "",
        "Latency, submit to arrival (open loop), and lateness of scheduled forms, ms",
        table(
            figures,
            systems,
            [
                (f"{kind}_ms_{rate}", f"{kind} @{rate}/s", 1)
                for rate in plan.rates
                for kind in ("p50", "p99")
            ]
            + [
                ("late_p50_ms", "late p50", 1),
                ("late_p99_ms", "late p99", 1),
                ("late_max_ms", "late max", 1),
                ("late_min_ms", "late min", 1),
                ("early", "early", 0),
            ],
        ),
        "",
        "Ratios of medians",
        ratios(figures, systems),
    ]
    if any("idle_rows" in figures.values.get(name, {}) for name in systems):
        parts += [
            "",
            "Idle with submissions scheduled 30 min ahead (10 s)",
            table(
                figures,
                [name for name in systems if figures.get(name, "idle_rows")],
                [
                    ("idle_rows", "scheduled", 0),
                    ("idle_cpu_pct", "CPU %", 3),
                    ("idle_wakeups_per_s", "wake-ups/s", 1),
                    ("idle_rss_mb", "RSS MB", 1),
                ],
            ),
        ]
    if figures.get("ptdaemon", "big_ready_s"):
        ready = figures.get("ptdaemon", "big_ready_s")
        logged = figures.get("ptdaemon", "big_ready_log_s")
        rss = figures.get("ptdaemon", "big_rss_mb")
        peak = figures.get("ptdaemon", "big_peak_rss_mb")
        recovered = figures.get("ptdaemon", "big_recovered")
        parts += [
            "",
            f"ptdaemon with {plan.big_rows:,} rows,"
            f" {plan.big_processing:,} in processing"
            " (first start, then after SIGKILL):",
            "  READY (/readyz 200, polled by the bench every 10 ms): "
            + ", ".join(f"{v:.2f} s" for v in ready)
            + "; 'daemon ready' logged after: "
            + ", ".join(f"{v:.2f} s" for v in logged),
            "  RSS 3 s after READY: "
            + ", ".join(f"{v:.1f} MB" for v in rss)
            + "; peak: "
            + ", ".join(f"{v:.1f} MB" for v in peak)
            + "; recovered attempts delivered: "
            + ", ".join(f"{v:,.0f}" for v in recovered),
        ]
    lost = sum(sum(figures.get(name, "lost")) for name in systems)
    dups = sum(sum(figures.get(name, "duplicates")) for name in systems)
    parts += ["", f"delivery check: {lost:.0f} forms missing, {dups:.0f} duplicates"]
    parts += [f"  {note}" for note in figures.notes]
    checked = targets(figures)
    parts += ["", "Targets (ptdaemon)", *(t.line() for t in checked)]
    if any(target.failed for target in checked):
        parts += ["", *closing_note(figures)]

    return "\n".join(parts)


def closing_note(figures: Figures) -> list[str]:
    """What bounds the targets not met, from this run's own figures."""
    lines = ["Closing note (the profile: python -m bench.profile; bench/RESULTS.md):"]
    own, shape = (
        figures.median("ptdaemon", "cpu_per_1000"),
        figures.median("shape", "cpu_per_1000"),
    )
    if own is not None and shape is not None:
        lines.append(
            "  throughput follows CPU per form on 2 shared cores:"
            f" ptdaemon {own:.2f} ms, its non-durable shape {shape:.2f} ms"
            " (the same two HTTP exchanges); the rest is the store's three"
            " writes per form (insert, claim, record: python -m bench.writes),"
            " the hops to its thread, and the bookkeeping"
        )
    lines.append(
        "  latency: a form due at once leaves after two fsync'd commits in"
        " series (the create's, then the claim's), each waiting for the group"
        " in progress; scheduled forms are claimed ahead of their due time"
    )

    return lines
