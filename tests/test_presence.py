"""Tests for promptseg.presence: Youden thresholds, and ``promptseg calibrate-presence`` on a
checkpoint from a short real training run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from promptseg.presence import DEFAULT_TAU, GRID, choose_thresholds, compete, youden_tau
from promptseg.prompts import TARGETS


def _j(prob: np.ndarray, label: np.ndarray, tau: float) -> float:
    return (prob[label] >= tau).mean() + (prob[~label] < tau).mean() - 1


def test_separable_classes_give_j_1_and_a_tau_between_them():
    prob = np.array([0.6, 0.65, 0.7, 0.75, 0.8, 0.95])
    label = np.array([False, False, False, True, True, True])
    tau, j = youden_tau(prob, label)
    assert j == 1.0
    assert 0.7 < tau <= 0.75
    assert tau == 0.71  # of the equally good thresholds, the one closest to 0.5


def test_ties_go_to_the_threshold_closest_to_one_half():
    prob = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    label = np.array([False, False, False, True, True])
    assert youden_tau(prob, label) == (0.5, 1.0)


def test_overlapping_classes_maximise_j_over_the_grid():
    prob = np.array([0.3, 0.9, 0.9, 0.9, 0.1, 0.1, 0.2, 0.95])
    label = np.array([True, True, True, True, False, False, False, False])
    tau, j = youden_tau(prob, label)
    assert (tau, j) == (0.3, pytest.approx(0.75))  # all positives kept, one negative lost
    rng = np.random.default_rng(0)
    for _ in range(5):
        label = rng.random(200) < 0.3
        prob = np.clip(rng.normal(0.35 + 0.3 * label, 0.15), 0, 1)
        tau, j = youden_tau(prob, label)
        best = max(_j(prob, label, t) for t in GRID)
        assert j == pytest.approx(best) and _j(prob, label, tau) == pytest.approx(best)
        assert tau in GRID


@pytest.mark.parametrize("labels", [[False, False, False], [True, True]])
def test_one_class_only_keeps_one_half(labels):
    label = np.array(labels)
    tau, j = youden_tau(np.linspace(0.1, 0.9, len(label)), label)
    assert tau == DEFAULT_TAU == 0.5 and np.isnan(j)


def test_choose_thresholds_per_target_ignores_unknown_pairs():
    rng = np.random.default_rng(1)
    n = 60
    state = rng.choice([-1, 0, 1], size=(n, len(TARGETS))).astype(np.int8)
    state[:, TARGETS.index("glioma")] = np.where(state[:, TARGETS.index("glioma")] == 1, 0, -1)
    prob = np.clip(0.3 + 0.4 * (state == 1) + rng.normal(0, 0.1, state.shape), 0, 1)
    chosen = choose_thresholds(prob, state)
    assert list(chosen) == list(TARGETS)
    for j, target in enumerate(TARGETS):
        row = chosen[target]
        assert set(row) == {"tau", "youden_j", "positives", "negatives"}
        assert row["positives"] == (state[:, j] == 1).sum()
        assert row["negatives"] == (state[:, j] == 0).sum()
        assert row["tau"] in GRID
    assert chosen["glioma"]["tau"] == 0.5 and chosen["glioma"]["youden_j"] is None
    # What the network answers on unknown pairs changes nothing.
    noisy = np.where(state == -1, rng.random(state.shape), prob)
    assert choose_thresholds(noisy, state) == chosen


def test_tumour_types_compete_only_where_all_three_are_known_pairs():
    g, m, p, liver = (
        TARGETS.index(t) for t in ("glioma", "meningioma", "pituitary tumour", "liver")
    )
    prob = np.full((3, len(TARGETS)), 0.2)
    state = np.full((3, len(TARGETS)), -1, np.int8)
    prob[0, [g, m, p, liver]] = [0.7, 0.9, 0.6, 0.8]
    state[0, [g, m, p]] = [0, 1, 0]
    prob[1, [g, m, p]] = [0.7, 0.9, 0.6]
    state[1, [g, m]] = [1, 0]  # pituitary unknown: no competition on this row
    out = compete(prob, state)
    assert out[0, [g, m, p]].tolist() == [0.0, 0.9, 0.0] and out[0, liver] == 0.8
    assert np.array_equal(out[1:], prob[1:]) and np.array_equal(prob[0, g], 0.7)  # input kept


# --------------------------------------------------------------------------- CLI, end to end


def _calibrate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "promptseg.cli", "calibrate-presence", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_calibrate_presence_cli_writes_thresholds_into_the_checkpoint(
    trained_run, train_run, data_root, tmp_path
):
    import torch

    from promptseg.checkpoint import load_checkpoint, read_checkpoint_blob
    from promptseg.validation import pair_outputs

    checkpoint = tmp_path / "model.pt"
    shutil.copy(trained_run / "best.pt", checkpoint)
    before = read_checkpoint_blob(checkpoint)
    assert "presence_thresholds" not in before
    out = tmp_path / "calibration"
    result = _calibrate(
        str(checkpoint), "--data-root", str(data_root), "--out", str(out), "--datasets", "chaos-mr"
    )
    assert result.returncode == 0, result.stderr[-3000:]

    loaded = load_checkpoint(checkpoint)
    taus = loaded.presence_thresholds
    assert list(taus) == list(TARGETS) and all(t in GRID for t in taus.values())
    after = read_checkpoint_blob(checkpoint)
    assert after["train"] == before["train"] and after["model_config"] == before["model_config"]
    assert all(torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # The thresholds are those of the tune split's presence probabilities.
    bank = train_run.bank(data_root, ["chaos-mr"], "tune", loaded.preprocessing)
    torch.set_num_threads(1)
    pairs = pair_outputs(loaded.model, bank, loaded.prompt_embeddings, loaded.vocabulary)
    expected = choose_thresholds(pairs["prob"], bank.state)
    assert taus == {t: expected[t]["tau"] for t in TARGETS}
    for target in ("glioma", "meningioma", "pituitary tumour"):  # no positives in CHAOS
        assert taus[target] == 0.5

    report = json.loads((out / "presence_calibration.json").read_text())
    assert report["split"] == "tune" and report["checkpoint"] == str(checkpoint)
    assert {t: r["tau"] for t, r in report["targets"].items()} == taus
    liver = int((bank.state[:, TARGETS.index("liver")] == 1).sum())
    assert report["targets"]["liver"]["positives"] == liver > 0
    for key in ("tune_at_tau", "tune_at_0.5", "tune_at_tau_tumour_types_compete"):
        assert 0 <= report[key]["empty_rate"] <= 1 and "chaos-mr/liver" in report[key]["dice"]
    png = out / "presence_calibration.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        im.load()
        assert im.width > 500 and im.height > 500

    lines = result.stdout.splitlines()
    assert len(lines) == len(TARGETS) + 1
    for line, target in zip(lines, TARGETS):
        assert line.startswith(target) and f"tau {taus[target]:.2f}" in line
    assert str(out / "presence_calibration.json") in lines[-1]


@pytest.mark.slow
def test_calibrate_presence_missing_checkpoint_exits_2_with_one_line(tmp_path, data_root):
    missing = tmp_path / "nope.pt"
    out = tmp_path / "calibration"
    result = _calibrate(str(missing), "--data-root", str(data_root), "--out", str(out))
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "checkpoint not found" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_calibrate_presence_refuses_a_missing_data_root_before_touching_the_checkpoint(
    tmp_path, tiny_checkpoint
):
    checkpoint = tmp_path / "model.pt"
    shutil.copy(tiny_checkpoint, checkpoint)
    before = checkpoint.read_bytes()
    out = tmp_path / "calibration"
    nowhere = tmp_path / "no-data"
    result = _calibrate(str(checkpoint), "--data-root", str(nowhere), "--out", str(out))
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(nowhere) in lines[0], result.stderr
    assert checkpoint.read_bytes() == before and not out.exists()


def test_threshold_grid():
    assert GRID[0] == 0.05 and GRID[-1] == 0.95 and len(GRID) == 91
    assert np.all(np.diff(GRID) > 0)
