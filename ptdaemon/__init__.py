"""ptdaemon: a single-host daemon that delivers filled-in forms, durably."""

from __future__ import annotations

__version__ = "0.1.0"

from ptdaemon.errors import PermanentFailure, RetryLater

__all__ = ["PermanentFailure", "RetryLater", "__version__"]
