"""Largest-component post-processing: the function, evaluation and promptseg-run on real data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from promptseg.postprocess import applies, largest_component

EXAMPLE = Path(__file__).resolve().parents[1] / "promptseg" / "examples" / "chaos_mr_1.nii.gz"


def test_largest_component_keeps_the_biggest_blob_and_diagonal_neighbours():
    m = np.zeros((6, 10, 10), bool)
    m[1:4, 1:5, 1:5] = True  # 48 voxels
    m[4, 5, 5] = True  # touches the big block only at a corner: same 26-component
    m[1, 8, 8] = True  # separate
    out = largest_component(m)
    assert out.sum() == 49 and not out[1, 8, 8] and out[4, 5, 5]
    assert not largest_component(np.zeros((2, 3, 3), bool)).any()


def test_ties_are_kept_so_flipping_commutes():
    m = np.zeros((3, 8, 8), bool)
    m[1, 1:3, 1:3] = True
    m[1, 5:7, 5:7] = True
    assert largest_component(m).sum() == 8
    rng = np.random.default_rng(0)
    noisy = rng.random((8, 16, 16)) > 0.8
    assert np.array_equal(largest_component(noisy[:, ::-1])[:, ::-1], largest_component(noisy))


def test_rule_applies_to_organs_in_volumes_only():
    assert applies("liver", "largest", True) and applies("left kidney", "largest", True)
    assert not applies("liver tumour", "largest", True)
    assert not applies("liver", "largest", False) and not applies("liver", "none", True)
    with pytest.raises(ValueError, match="postprocess must be one of"):
        applies("liver", "biggest", True)
    with pytest.raises(ValueError, match="3D"):
        largest_component(np.ones((4, 4), bool))


@pytest.mark.slow
def test_promptseg_run_organs_are_single_components_by_default(tmp_path):
    outs = {}
    for mode in ("largest", "none"):
        out = tmp_path / f"{mode}.nii.gz"
        cmd = [sys.executable, "-m", "promptseg.runtime.cli", str(EXAMPLE), "--prompt", "liver",
               "--prompt", "spleen", "-o", str(out), "--quiet", "--postprocess", mode]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        outs[mode] = np.asarray(nib.load(out).dataobj)
    for label in (1, 2):
        _, n = ndimage.label(outs["largest"] == label, structure=np.ones((3, 3, 3)))
        assert n == 1
        kept = outs["largest"] == label
        assert np.all(outs["none"][kept] == label)  # only removes voxels
    assert (outs["largest"] > 0).sum() < (outs["none"] > 0).sum()
    cmd = [sys.executable, "-m", "promptseg.runtime.cli", str(EXAMPLE), "--prompt", "liver",
           "-o", str(tmp_path / "x.nii.gz"), "--postprocess", "biggest"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--postprocess" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.nii.gz").exists()
