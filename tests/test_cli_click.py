"""Every command line: --version, defaults in --help, one-line usage errors with exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import promptseg

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMMANDS = {
    "promptseg": [str(BIN / "promptseg")],
    "promptseg-run": [str(BIN / "promptseg-run")],
    "promptseg-export": [str(BIN / "promptseg-export")],
    "parity": [sys.executable, "-m", "promptseg.calibration.parity"],
    "bench": [sys.executable, str(REPO / "bench" / "latency.py")],
}


def run(name: str, *args: str) -> subprocess.CompletedProcess:
    if not Path(COMMANDS[name][0]).exists():
        pytest.skip(f"{COMMANDS[name][0]} is not installed")
    return subprocess.run(
        [*COMMANDS[name], *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


@pytest.mark.parametrize("name", list(COMMANDS))
def test_version_and_defaults_in_help(name: str) -> None:
    version = run(name, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().endswith(promptseg.__version__)
    helped = run(name, "--help")
    assert helped.returncode == 0 and "--version" in helped.stdout
    if name != "promptseg":  # a group: its commands show theirs
        assert "[default: " in helped.stdout, helped.stdout


def test_run_help_lists_targets_and_groups() -> None:
    text = " ".join(run("promptseg-run", "--help").stdout.split())
    assert "Known targets (packaged engine): liver, spleen, left kidney, right kidney" in text
    assert "kidneys = left kidney + right kidney" in text


@pytest.mark.parametrize(
    ("name", "args", "says"),
    [
        ("promptseg", ["evaluate", "default"], "Missing option '--data'"),
        ("promptseg", ["info", "--bogus"], "No such option"),
        ("promptseg-run", ["x.nii.gz", "--prompt", "liver", "--threads", "0"], "--threads:"),
        ("promptseg-export", ["default"], "Missing option '-o' / '--out'"),
        ("parity", ["engine", "--batch", "zero"], "--batch: must be an integer >= 1"),
        ("bench", ["--preset", "huge"], "--preset: 'huge' is not one of"),
    ],
)
def test_usage_errors_are_one_line(name: str, args: list[str], says: str) -> None:
    proc = run(name, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert ": error: " in lines[0]
