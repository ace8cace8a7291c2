"""bench/serve_load.py at tiny scale: every answer checked, the fault check passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.http")


def test_serve_load_at_tiny_scale(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "serve_load.py"),
            "--clients",
            "2",
            "--volumes",
            "2",
            "--slices",
            "3",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["answers_checked"] == 4 and report["problems"] == []
    assert report["faults"] == {
        "killed_mid_request": True,
        "nothing_written_by_killed_client": True,
        "next_request_ok": True,
        "server_ready": True,
    }
    server = report["server"]
    assert server["slice_requests"] >= 4 * 1  # every volume went through the slice model
    for key in ("p50", "p95", "p99"):
        assert server["latency_ms"][key] > 0
    assert report["server_exit_code"] == 0
