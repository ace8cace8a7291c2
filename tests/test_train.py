"""Tests for promptseg.train: short real training runs on CHAOS MR slices, resume, outputs.

Each run uses the tiny preset at 64 px, 48 samples per epoch and one thread (about 15 s on
two busy cores). The banks of preprocessed slices are built once with the real
``build_bank`` and shared by the runs of this module; everything else is the real loop.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import promptseg.train as train_mod
from promptseg.checkpoint import load_checkpoint
from promptseg.data.bank import Bank, build_bank
from promptseg.losses import build_loss
from promptseg.model.unet import PromptSegModel, preset_config
from promptseg.preprocess import Preprocessing
from promptseg.prompts import PromptVocabulary
from promptseg.train import FLIP_POLICY, TrainConfig, augment, epoch_samples, train

pytestmark = pytest.mark.slow

RES = 64
BASE = {
    "preset": "tiny",
    "resolution": RES,
    "datasets": ["chaos-mr"],
    "epochs": 3,
    "batch": 8,
    "lr": 5e-3,
    "max_samples_per_epoch": 48,
    "val_max_samples": 32,
    "threads": 1,
    "progress": False,
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bank_cache() -> Iterator[Callable[..., Bank]]:
    """The real build_bank, memoised per (root, datasets, split, resolution) for this module."""
    cache: dict[tuple, Bank] = {}

    def cached(data_root, datasets, split, pre, progress=True) -> Bank:
        key = (str(data_root), tuple(datasets), split, pre.resolution)
        if key not in cache:
            cache[key] = build_bank(data_root, datasets, split, pre, progress=False)
        return cache[key]

    deterministic = torch.are_deterministic_algorithms_enabled()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "build_bank", cached)
        yield cached
    # train() switches deterministic algorithms on for the whole process; undo that.
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory, bank_cache) -> Callable[..., Path]:
    def _run(name: str, resume_dir: Path | None = None, **overrides) -> Path:
        out = resume_dir or tmp_path_factory.mktemp(name)
        cfg = TrainConfig(**{**BASE, "data_root": str(data_root), "out": str(out), **overrides})
        train(cfg, resume=resume_dir is not None)
        return out

    return _run


@pytest.fixture(scope="module")
def run_a(run) -> Path:
    """The reference run: seed 0, three epochs."""
    return run("run_a")


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pt", map_location="cpu", weights_only=False)["model"]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- training runs


def test_training_lowers_the_loss_on_a_fixed_batch(run_a, data_root, bank_cache, text_encoder):
    bank = bank_cache(data_root, ["chaos-mr"], "train", Preprocessing(resolution=RES))
    rng = random.Random(0)
    batch = rng.sample(bank.positives(), 24) + rng.sample(bank.negatives(True), 8)
    images, masks = train_mod._batch_tensors(bank, batch)
    vocab = PromptVocabulary()
    emb = text_encoder([vocab.canonical(s.target) for s in batch])

    config = preset_config("tiny", resolution=RES)
    torch.manual_seed(0)  # train() seeds exactly like this before building the model
    initial = PromptSegModel(config, 384).eval()
    trained = PromptSegModel(config, 384)
    trained.load_state_dict(_weights(run_a))
    trained.eval()
    loss_fn = build_loss("dice_bce")
    with torch.no_grad():
        before = float(loss_fn(initial(images, emb), masks))
        after = float(loss_fn(trained(images, emb), masks))
    assert after < 0.9 * before, (before, after)

    history = json.loads((run_a / "metrics.json").read_text())["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_same_seed_same_weights_other_seed_differs(run, run_a):
    again = run("run_a_again")
    assert _same_weights(_weights(again), _weights(run_a))
    h1 = json.loads((run_a / "metrics.json").read_text())["history"]
    h2 = json.loads((again / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in h1] == [h["train_loss"] for h in h2]
    other = run("run_seed1", seed=1)
    assert not _same_weights(_weights(other), _weights(run_a))


class _Interrupted(Exception):
    """Stands for a crash or Ctrl-C at the end of an epoch."""


def test_resume_after_interruption_equals_uninterrupted(run, run_a, tmp_path, capsys):
    real_plot = train_mod.plot_history

    def plot_then_stop(history: list[dict], path: Path) -> None:
        real_plot(history, path)  # the last thing an epoch writes
        if len(history) == 2:
            raise _Interrupted

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "plot_history", plot_then_stop)
        with pytest.raises(_Interrupted):
            run("unused", resume_dir=tmp_path)
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 2
    assert not _same_weights(state["model"], _weights(run_a))
    capsys.readouterr()

    run("unused", resume_dir=tmp_path)
    assert f"resumed from {tmp_path / 'last.pt'} at epoch 3" in capsys.readouterr().out
    assert _same_weights(_weights(tmp_path), _weights(run_a))
    resumed = json.loads((tmp_path / "metrics.json").read_text())["history"]
    reference = json.loads((run_a / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    assert [h["train_loss"] for h in resumed] == [h["train_loss"] for h in reference]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _train_cli(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "promptseg.cli", "train", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_resume_with_other_options_is_refused_before_writing(run_a, data_root, tmp_path):
    """The CLI on a copy of a finished run: changed recipe -> one line naming every field."""
    out = tmp_path / "run"
    shutil.copytree(run_a, out)
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["config"]
    assert saved == {
        **TrainConfig().__dict__,
        **BASE,
        "data_root": str(data_root),
        "out": str(run_a),
    }
    before = _snapshot(out)
    config = tmp_path / "changed.json"
    changed = {"lr": 1e-3, "loss": "dice", "neg_ratio": 0.25, "datasets": ["brain-tumor"]}
    config.write_text(json.dumps({**BASE, "data_root": str(data_root), "out": str(out), **changed}))
    result = _train_cli(config, "--resume")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"promptseg train: error: {out / 'last.pt'}: cannot resume")
    for name, value in changed.items():
        assert f"{name} {BASE.get(name, TrainConfig().__dict__[name])!r} -> {value!r}" in lines[0]
    assert "epochs" not in lines[0] and "threads" not in lines[0]
    assert _snapshot(out) == before  # config.json, metrics, checkpoints untouched


def test_resume_allows_other_threads_and_progress(run, run_a, tmp_path, capsys):
    """Fields outside the recipe may change: a finished run resumes to no further epoch."""
    out = tmp_path / "run"
    shutil.copytree(run_a, out)
    run("unused", resume_dir=out, threads=2, progress=True, device="cpu")
    assert f"resumed from {out / 'last.pt'} at epoch 4" in capsys.readouterr().out
    assert _same_weights(_weights(out), _weights(run_a))
    assert json.loads((out / "config.json").read_text())["config"]["threads"] == 2


def test_resume_of_an_older_last_pt_checks_what_it_holds(run, run_a, tmp_path, capsys):
    """A last.pt without a saved config: epochs and config.json are checked, with a warning."""
    out = tmp_path / "run"
    shutil.copytree(run_a, out)
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    del state["config"]
    torch.save(state, out / "last.pt")
    with pytest.raises(ValueError, match=r"cannot resume.*epochs 3 -> 4"):
        run("unused", resume_dir=out, epochs=4)
    err = capsys.readouterr().err
    assert "holds no training config" in err and "config.json and its epochs" in err
    with pytest.raises(ValueError, match=r"cannot resume.*batch 8 -> 4"):
        run("unused", resume_dir=out, batch=4)  # from config.json
    (out / "config.json").unlink()
    with pytest.raises(ValueError, match=r"epochs 3 -> 5"):
        run("unused", resume_dir=out, epochs=5)
    assert "checked against its epochs only" in capsys.readouterr().err


def test_run_outputs(run_a):
    names = {p.name for p in run_a.iterdir()}
    assert {"best.pt", "last.pt", "metrics.json", "loss_curve.png", "config.json"} <= names
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]

    metrics = json.loads((run_a / "metrics.json").read_text())
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for row in history:
        assert np.isfinite(row["train_loss"]) and row["train_loss"] > 0
        val = row["val"]
        assert 0.0 <= val["mean_dice"] <= 1.0 and 0.0 <= val["empty_rate"] <= 1.0
        assert set(val["dice"]) <= {"liver", "spleen", "left kidney", "right kidney"}
        assert all(0.0 <= d <= 1.0 for d in val["dice"].values())
        assert val["score"] == pytest.approx(0.8 * val["mean_dice"] + 0.2 * val["empty_rate"])
    scores = [h["val"]["score"] for h in history]
    assert metrics["best_score"] == max(scores)

    best = load_checkpoint(run_a / "best.pt")
    assert best.config.resolution == RES and best.config.widths == [4, 8, 8, 16]
    assert best.train["epoch"] == 1 + scores.index(max(scores))  # first epoch with the best score
    assert best.train["config"]["datasets"] == ["chaos-mr"]
    assert best.preprocessing.resolution == RES
    assert best.vocabulary == PromptVocabulary()
    assert "Segment the liver" in best.prompt_embeddings

    png = run_a / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        im.load()
        assert im.width > im.height > 100

    config = json.loads((run_a / "config.json").read_text())
    assert config["config"]["seed"] == 0 and config["model"]["resolution"] == RES
    assert config["train_samples"] > config["val_samples"] == BASE["val_max_samples"]


# --------------------------------------------------------------------------- augmentation


def _corner_blobs(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, R, R) images and masks with a square blob near the top-left corner."""
    masks = torch.zeros(b, 1, RES, RES)
    masks[:, :, 6:18, 8:20] = 1.0
    return masks.clone(), masks


def _centroid(x: torch.Tensor) -> tuple[float, float]:
    rows, cols = torch.meshgrid(torch.arange(RES), torch.arange(RES), indexing="ij")
    w = x[0].clamp(min=0)
    return float((rows * w).sum() / w.sum()), float((cols * w).sum() / w.sum())


@pytest.mark.parametrize("dataset", sorted(FLIP_POLICY))
def test_augment_shapes_binary_masks_and_flip_policy(dataset):
    moved_quadrant = 0
    for seed in range(6):
        images, masks = _corner_blobs(16)
        gen = torch.Generator().manual_seed(seed)
        out_i, out_m = augment(images, masks, [dataset] * 16, gen)
        assert out_i.shape == images.shape and out_m.shape == masks.shape
        assert set(torch.unique(out_m).tolist()) <= {0.0, 1.0}
        assert out_i.min() >= 0 and out_i.max() <= 1
        for img, mask in zip(out_i, out_m):
            assert mask.sum() > 50  # the blob survives the affine
            r, c = _centroid(mask)
            ri, ci = _centroid(img * (img > 0.5))
            assert abs(r - ri) < 2 and abs(c - ci) < 2  # image and mask move together
            moved_quadrant += not (r < RES / 2 and c < RES / 2)
    if FLIP_POLICY[dataset] == "none":
        assert moved_quadrant == 0  # never flipped: left/right stay where they are
    else:
        assert moved_quadrant > 20  # flips happen (about 3 in 4 samples)


def test_augment_is_deterministic_for_a_generator():
    images, masks = _corner_blobs(4)
    a = augment(images, masks, ["brain-tumor"] * 4, torch.Generator().manual_seed(3))
    b = augment(images, masks, ["brain-tumor"] * 4, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def chaos_bank(data_root, bank_cache) -> Bank:
    return bank_cache(data_root, ["chaos-mr"], "train", Preprocessing(resolution=RES))


@pytest.mark.parametrize(("neg_ratio", "easy_fraction"), [(0.5, 0.2), (1.0, 0.0), (0.25, 0.5)])
def test_epoch_samples_ratio(chaos_bank, data_root, neg_ratio, easy_fraction):
    cfg = TrainConfig(
        data_root=str(data_root),
        datasets=["chaos-mr"],
        neg_ratio=neg_ratio,
        easy_neg_fraction=easy_fraction,
    )
    samples = epoch_samples(chaos_bank, cfg, random.Random(5))
    positives = chaos_bank.positives()
    n_neg = round(neg_ratio * len(positives))
    assert len(chaos_bank.negatives(True)) > n_neg  # enough to honour the ratio
    picked_pos = [s for s in samples if s.positive]
    assert sorted(picked_pos, key=id) == sorted(positives, key=id)  # all positives, once
    negatives = [s for s in samples if not s.positive]
    assert len(negatives) == n_neg
    assert sum(not s.hard for s in negatives) == round(easy_fraction * n_neg)
    assert len({id(s) for s in samples}) == len(samples)
    assert samples != positives + negatives  # shuffled
    assert epoch_samples(chaos_bank, cfg, random.Random(5)) == samples


def test_epoch_samples_max_per_epoch(chaos_bank, data_root):
    cfg = TrainConfig(data_root=str(data_root), datasets=["chaos-mr"], max_samples_per_epoch=48)
    samples = epoch_samples(chaos_bank, cfg, random.Random(1))
    assert len(samples) == 48
    assert any(s.positive for s in samples) and any(not s.positive for s in samples)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"datasets": ["chaos-ct"]}, r"unknown datasets \['chaos-ct'\]"),
        ({"epochs": 0}, "epochs, batch must be >= 1"),
        ({"batch": 0}, "epochs, batch must be >= 1"),
        ({"lr": 0.0}, "lr > 0"),
    ],
)
def test_train_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**overrides)
