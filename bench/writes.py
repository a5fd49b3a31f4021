"""CPU of the store's writes per form, against the size of the group commits.

    .venv/bin/python -m bench.writes [--forms 6000] [--groups 1,10,50]

Drives the real `Store` with the three writes of one delivered form (the
create's insert, the claim, the attempt's record), `G` forms at a time so
that each group commit carries G writes of one kind, and prints the CPU
seconds per form: of the whole process, and of the event loop's thread
alone (the rest is the SQLite writer's thread). No HTTP, no engine: this
is the price of durability and bookkeeping by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

from tests.factories import make_template

from ptdaemon import queries
from ptdaemon.dispatch.base import Result
from ptdaemon.engine import build_finish
from ptdaemon.ids import new_id
from ptdaemon.models import Method, Status, Submission, Template, User
from ptdaemon.store import Store


def template_of(user: User) -> Template:
    return make_template(
        Method.API,
        {"url": "http://127.0.0.1:9/forms"},
        id=new_id(),
        user_id=user.id,
        name="bench",
    )


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(forms: int, group: int) -> tuple[float, float, int]:
    """(CPU s per form, loop-thread CPU s per form, commits) for one group size."""
    with tempfile.TemporaryDirectory(prefix="ptdaemon-writes-") as folder:
        store = await Store.open(Path(folder) / "db.sqlite")
        user = User(id=new_id(), name="bench", admin=False, created_at=1.0)
        template = template_of(user)
        await store.write(lambda c: queries.insert_user(c, user, "digest"))
        await store.write(lambda c: queries.insert_template(c, template))
        commits_before = store.commits
        cpu, loop_cpu = process_cpu(), time.thread_time()
        for _ in range(0, forms, group):
            now = time.time()
            items = [
                queries.NewSubmission(
                    Submission(
                        id=new_id(),
                        user_id=user.id,
                        form_template_id=template.id,
                        data={"name": "Ada", "email": "ada@example.com", "n": 1},
                        status=Status.PENDING,
                        max_retries=3,
                        retry_backoff_seconds=1.0,
                        retry_backoff_max_seconds=60.0,
                        retry_jitter=0.0,
                        next_retry_at=now,
                        created_at=now,
                        updated_at=now,
                    ),
                    None,
                )
                for _ in range(group)
            ]
            created = await asyncio.gather(
                *[
                    store.write(
                        lambda c, item=item: queries.insert_submissions(
                            c, [item], 10**9
                        )
                    )
                    for item in items
                ]
            )
            ids = [result[0][0].id for result in created]  # type: ignore[index]
            due = now + 0.001
            claimed = await asyncio.gather(
                *[
                    store.write(lambda c, i=i, due=due: queries.claim(c, [i], due))
                    for i in ids
                ]
            )
            finishes = [
                build_finish(sub, 1, now + 0.001, now + 0.002, Result(status=200))
                for [sub] in claimed
                if sub is not None
            ]
            await asyncio.gather(
                *[
                    store.write(lambda c, f=f: queries.finish_attempt(c, f))
                    for f in finishes
                ]
            )
        spent, loop_spent = process_cpu() - cpu, time.thread_time() - loop_cpu
        commits = store.commits - commits_before
        await store.close()
    return spent / forms, loop_spent / forms, commits


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writes")
    parser.add_argument("--forms", type=int, default=6000)
    parser.add_argument("--groups", default="1,10,50")
    args = parser.parse_args()
    print("writes per group  CPU ms/form  loop ms/form  writer ms/form  commits")
    for group in [int(text) for text in args.groups.split(",")]:
        cpu, loop_cpu, commits = asyncio.run(run(args.forms, group))
        print(
            f"{group:>16}  {cpu * 1000:>11.3f}  {loop_cpu * 1000:>12.3f}"
            f"  {(cpu - loop_cpu) * 1000:>14.3f}  {commits:>7,}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
