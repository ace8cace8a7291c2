"""The diagnostic scripts run as a user runs them, on real validation volumes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _false_components(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "false_components.py"), "default", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def test_false_components_partition_the_mask_and_the_truth(data_root, tmp_path):
    png = tmp_path / "c.png"
    proc = _false_components(
        "--case", "chaos/1", "--target", "spleen", "--truth-of", "liver",
        "--data-root", str(data_root), "--out", str(png),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    head = re.search(r"liver truth (\d+) voxels .* mask (\d+) voxels", proc.stdout)
    truth_voxels, mask_voxels = int(head[1]), int(head[2])
    mask_parts = [int(m) for m in re.findall(r"^  component +(\d+) voxels", proc.stdout, re.M)]
    truth_parts = re.findall(
        r"liver truth component +(\d+) voxels.*, (\d+) in the mask", proc.stdout
    )
    # Every voxel of the spleen mask and of the liver truth is in exactly one listed component
    # (8 are listed at most; the volume has fewer).
    assert sum(mask_parts) == mask_voxels and mask_parts == sorted(mask_parts, reverse=True)
    assert sum(int(v) for v, _ in truth_parts) == truth_voxels
    assert all(int(v) >= int(inside) for v, inside in truth_parts)
    # A spleen prompt's mask barely touches the liver: a real confusion would show here.
    assert sum(int(inside) for _, inside in truth_parts) < 0.01 * truth_voxels
    assert png.is_file() == ("0 in the truth" in proc.stdout)


def test_false_components_refuses_an_unknown_case(data_root):
    proc = _false_components(
        "--case", "chaos/999", "--target", "spleen", "--data-root", str(data_root)
    )
    assert proc.returncode != 0
    assert proc.stderr.strip() == "chaos/999: not a chaos-mr validation case"
