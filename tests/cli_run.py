"""Run the ``promptseg`` CLI in a subprocess, as a user would (shared by the CLI tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def promptseg_command() -> list[str]:
    """The installed console script (next to this interpreter), else ``python -m``."""
    script = Path(sys.executable).with_name("promptseg")
    if script.is_file():
        return [str(script)]
    found = shutil.which("promptseg")
    return [found] if found else [sys.executable, "-m", "promptseg.cli"]


def run_promptseg(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``promptseg ARGS`` on one thread, output captured."""
    return subprocess.run(
        [*promptseg_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def nonblank_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]
