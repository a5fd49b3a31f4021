"""systemd/ptdaemon.service passes systemd's own checks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "ptdaemon.service"
INSTALLED_PROGRAM = "/usr/local/bin/ptdaemon"
MAX_EXPOSURE = 1.5

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_unit_verifies_with_its_program_installed(tmp_path):
    # verify insists that ExecStart exists: point a copy at this checkout's.
    program = Path(sys.executable).parent / "ptdaemon"
    assert program.is_file()
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_PROGRAM} serve" in text
    copy = tmp_path / "ptdaemon.service"
    copy.write_text(text.replace(INSTALLED_PROGRAM, str(program)))

    result = analyze("verify", str(copy))

    assert result.returncode == 0, result.stderr
    assert "ptdaemon.service" not in result.stderr, result.stderr


def test_the_unit_is_sandboxed_to_an_exposure_of_at_most_1_5():
    result = analyze("security", "--offline=true", "--threshold=15", str(UNIT))

    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE


def test_the_unit_is_a_notify_service_with_a_watchdog_and_no_root():
    settings = dict(
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )

    assert settings["Type"] == "notify"
    assert settings["WatchdogSec"] == "30s"
    assert settings["DynamicUser"] == "yes"
    assert settings["StateDirectory"] == "ptdaemon"
    assert settings["ProtectSystem"] == "strict"
    assert settings["LoadCredential"].startswith("smtp-password:")
