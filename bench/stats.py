"""Time GET /v1/stats's queries on a seeded database of 100,000 submissions.

Run from the repository root: `.venv/bin/python bench/stats.py [COUNT]`.
Prints the seeded size, and the median and slowest wall time and the median
CPU time of several runs for the first user (80 % of the rows).
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.stats_data import NOW, make_rows, write_rows

from ptdaemon import queries

RUNS = 7


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    seeded = make_rows(count)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "stats.db"
        write_rows(path, seeded)
        conn = sqlite3.connect(path)
        user = seeded.users[0]
        timings, cpu = [], []
        for _ in range(RUNS):
            started, started_cpu = time.perf_counter(), time.process_time()
            queries.stats(conn, user, NOW - 86400.0, NOW)
            timings.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - started_cpu) * 1000)
        conn.close()
    # CPU time is shown too: on a shared machine it varies less than wall time.
    print(
        f"stats over {count} submissions, {len(seeded.attempts)} attempts:"
        f" median {statistics.median(timings):.1f} ms,"
        f" slowest {max(timings):.1f} ms, median CPU"
        f" {statistics.median(cpu):.1f} ms ({RUNS} runs)"
    )


if __name__ == "__main__":
    main()
