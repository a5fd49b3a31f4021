"""ptdaemon: a single-host daemon that delivers filled-in forms, durably."""

from __future__ import annotations

__version__ = "0.1.0"

from ptdaemon.config import Config, load_config
from ptdaemon.daemon import Daemon
from ptdaemon.errors import PermanentFailure, RetryLater

__all__ = [
    "Config",
    "Daemon",
    "PermanentFailure",
    "RetryLater",
    "__version__",
    "load_config",
]
