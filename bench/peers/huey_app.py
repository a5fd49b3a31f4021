"""The huey consumer's module: the queue in the file named by BENCH_HUEY_DB."""

from __future__ import annotations

import os

from bench.peers.huey_tasks import make_huey

huey, post = make_huey(os.environ["BENCH_HUEY_DB"])
