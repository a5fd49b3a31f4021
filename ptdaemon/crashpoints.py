"""Test-only: kill the process with SIGKILL at a named moment.

Crash tests set PTDAEMON_TEST_CRASH_AT=NAME (or NAME:N for the N-th time
the moment is reached) to prove that a kill there loses nothing. Without
the variable, `reach` does nothing. Never set it in production.

Moments:
  submission-committed  a submission is on disk, its 202 not yet sent
  claim-committed       an attempt's claim is on disk, nothing sent yet
  reply-received        the destination answered, nothing recorded yet
  file-written          a file drop is written and synced, not yet renamed
"""

from __future__ import annotations

import os
import signal
from typing import Final

ENV_VAR: Final = "PTDAEMON_TEST_CRASH_AT"
MOMENTS: Final = frozenset(
    {"submission-committed", "claim-committed", "reply-received", "file-written"}
)


def _parse(text: str) -> tuple[str, int] | None:
    if not text:
        return None
    name, _, count = text.partition(":")
    if name not in MOMENTS:
        raise ValueError(f"{ENV_VAR}: unknown moment {name!r}")
    return name, int(count) if count else 1


_target = _parse(os.environ.get(ENV_VAR, ""))
_seen = 0


def reach(moment: str) -> None:
    """Die here if the test asked for this moment (and this is its N-th time)."""
    global _seen  # noqa: PLW0603 - one counter for the whole process
    if _target is None or _target[0] != moment:
        return
    _seen += 1
    if _seen >= _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
