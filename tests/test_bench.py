"""The benchmark's smoke run: ptdaemon and its shape, a few hundred forms each.

It keeps `python -m bench.run` working; figures are not checked here, only
that every form arrived exactly once and that the report was printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_smoke_run_delivers_every_form_once(tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--json", str(figures_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    figures = json.loads(figures_path.read_text())
    assert set(figures) == {"ptdaemon", "shape"}
    for name, values in figures.items():
        # One entry per workload: the burst, the open-loop rate, the scheduled.
        assert values["lost"] == [0, 0, 0], name
        assert values["duplicates"] == [0, 0, 0], name
        assert len(values["e2e_per_s"]) == 1, name
    assert "delivery check: 0 forms missing, 0 duplicates" in done.stdout
    assert done.stdout.count("ptdaemon") >= 3
    assert "e2e/s" in done.stdout
    assert "Targets (ptdaemon)" in done.stdout


def test_the_writes_benchmark_runs_and_commits_in_groups() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.writes", "--forms", "40", "--groups", "1,10"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    # Three writes per form: one commit each alone, one per ten in groups of ten.
    assert [(row[0], row[-1]) for row in rows] == [("1", "120"), ("10", "12")]
