"""Prompts that mean what users mean: groups, ambiguity, side words, organs in one piece.

Real parts only: the packaged engine, the shipped CHAOS example and its label map, and the
``promptseg-run`` console script in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from promptseg.runtime.manifest import DEFAULT_ENGINE_DIR
from promptseg.runtime.prompt_resolver import (
    DEFAULT_AMBIGUITY_MARGIN,
    PromptError,
    PromptResolver,
    named_targets,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "promptseg" / "examples"
EXAMPLE = EXAMPLES / "chaos_mr_1.nii.gz"
TRUTH = EXAMPLES / "chaos_mr_1_label.nii.gz"  # 1 liver, 2 right kidney, 3 left kidney, 4 spleen


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("promptseg-run")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "promptseg.runtime.cli"]
    return subprocess.run(
        [*command, *map(str, args), "--quiet", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def resolver() -> PromptResolver:
    if not (DEFAULT_ENGINE_DIR / "manifest.json").is_file():
        pytest.skip(f"the packaged engine is missing ({DEFAULT_ENGINE_DIR})")
    return PromptResolver(None, threads=1)


@pytest.mark.parametrize("prompt", ["kidneys", "both kidneys", "Segment the kidneys", "KIDNEYS."])
def test_group_prompts_expand_to_their_members(resolver: PromptResolver, prompt: str) -> None:
    got = resolver.resolve_all([prompt])
    assert [r.target for r in got] == ["left kidney", "right kidney"]
    assert all(r.group == "kidneys" and r.how == "group" for r in got)
    organs = resolver.resolve_all(["abdominal organs", "liver"])
    assert [r.target for r in organs] == ["liver", "spleen", "left kidney", "right kidney", "liver"]


def test_named_targets_and_side_words_pick_the_target(resolver: PromptResolver) -> None:
    assert named_targets("the patient's liver", resolver.targets) == ["liver"]
    assert named_targets("any tumor in the liver", resolver.targets) == ["liver tumour"]
    assert resolver.resolve("the patient's liver").target == "liver"
    # The encoder alone puts this one nearer a left-kidney phrasing; the side word decides.
    right = resolver.resolve("mask of the right kidney")
    assert right.how == "encoder" and right.target == "right kidney"
    with pytest.raises(PromptError, match=r"ambiguous prompt 'liver and spleen': liver, spleen\?"):
        resolver.resolve("liver and spleen")
    with pytest.raises(
        PromptError, match=r"ambiguous prompt 'kidney': left kidney, right kidney\?"
    ):
        resolver.resolve("kidney")


def test_packaged_margin_is_what_the_calibration_gives(resolver: PromptResolver) -> None:
    from promptseg.export.refusal import calibrate_ambiguity
    from promptseg.prompts import PromptVocabulary

    got = calibrate_ambiguity(
        resolver.cache, PromptVocabulary(), resolver.embed, resolver.threshold
    )
    # The packaged manifest records the export's calibration, the same rule as the default.
    assert resolver.margin == pytest.approx(got["ambiguity_margin"], abs=1e-9)
    assert got["ambiguity_margin"] == pytest.approx(DEFAULT_AMBIGUITY_MARGIN, abs=1e-4)
    assert "tumor" in got["ambiguity"]["ambiguous_prompts"]
    assert got["ambiguity"]["passed_wrongly"] == []


@pytest.mark.slow
def test_kidneys_gives_both_kidneys_on_the_correct_sides(resolver, tmp_path: Path) -> None:
    out = tmp_path / "kidneys.nii.gz"
    proc = run_cli(EXAMPLE, "--prompt", "kidneys", "-o", out)
    assert proc.returncode == 0, proc.stderr
    sidecar = json.loads(out.with_name("kidneys.labels.json").read_text())
    assert sidecar["labels"] == {
        "1": {"prompt": "kidneys", "target": "left kidney"},
        "2": {"prompt": "kidneys", "target": "right kidney"},
    }
    image = nib.load(out)
    labels = np.asarray(image.dataobj)
    truth = np.asarray(nib.load(TRUTH).dataobj)

    def world_x(mask: np.ndarray) -> float:
        """World x of the mask's centroid; RAS+: x grows towards the patient's right."""
        ijk = np.argwhere(mask).mean(axis=0)
        return float(image.affine[0, :3] @ ijk + image.affine[0, 3])

    left, right = labels == 1, labels == 2
    assert left.sum() > 1000 and right.sum() > 1000
    assert world_x(left) < world_x(right)  # the left kidney lies on the patient's left
    assert world_x(truth == 3) < world_x(truth == 2)  # the example agrees (RAS-consistent)
    # Each label overlaps its own kidney in the reference, not the other one.
    assert (left & (truth == 3)).sum() > 5 * (left & (truth == 2)).sum()
    assert (right & (truth == 2)).sum() > 5 * (right & (truth == 3)).sum()


@pytest.mark.slow
def test_four_organs_come_out_in_one_piece_each(resolver, tmp_path: Path) -> None:
    out = tmp_path / "organs.nii.gz"
    prompts = ["liver", "spleen", "left kidney", "right kidney"]
    proc = run_cli(EXAMPLE, *[a for p in prompts for a in ("--prompt", p)], "-o", out)
    assert proc.returncode == 0, proc.stderr
    labels = np.asarray(nib.load(out).dataobj)
    for k, target in enumerate(prompts, start=1):
        _, pieces = ndimage.label(labels == k, structure=np.ones((3, 3, 3), bool))
        assert pieces == 1, (target, pieces)


def test_tumor_is_refused_as_ambiguous(resolver, tmp_path: Path) -> None:
    out = tmp_path / "tumor.nii.gz"
    proc = run_cli(EXAMPLE, "--prompt", "tumor", "-o", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(
        "promptseg-run: error: --prompt: ambiguous prompt 'tumor': "
        "glioma, meningioma, pituitary tumour, liver tumour?"
    ), lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())
