"""Random version-4 UUIDs as text, drawn from a buffer of system randomness.

`uuid.uuid4()` asks the kernel for 16 bytes each time; a burst of creates
asks for thousands a second. This draws 4 KiB at a time from the same
source (`os.urandom`) and formats the UUID directly.
"""

from __future__ import annotations

import os
import threading
from typing import Final

_CHUNK: Final = 4096
_VARIANT: Final = "89ab"


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = b""
        self._at = 0

    def take16(self) -> bytes:
        with self._lock:
            if self._at + 16 > len(self._bytes):
                self._bytes = os.urandom(_CHUNK)
                self._at = 0
            start = self._at
            self._at = start + 16
            return self._bytes[start : start + 16]

    def forget(self) -> None:
        """Drop the buffer, so that a forked child never repeats the parent's ids."""
        self._bytes = b""
        self._at = 0


_pool = _Pool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool.forget)


def new_id() -> str:
    """A random UUID (version 4, RFC 9562 variant) in its 36-character form."""
    text = _pool.take16().hex()
    variant = _VARIANT[int(text[16], 16) & 3]
    return f"{text[:8]}-{text[8:12]}-4{text[13:16]}-{variant}{text[17:20]}-{text[20:]}"
