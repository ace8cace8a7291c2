"""Tests for promptseg.train: short real runs on CHAOS MR slices, exact resume, outputs, sampling.

The runs (``train_run`` / ``trained_run`` in conftest.py) use the default preset at 32 px,
30 steps of 8 images and one thread: seconds each. Their banks of preprocessed slices and the
text encoder are built once per session with the real code; everything else is the real loop.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN_BASE

import promptseg.train as train_mod
from promptseg.checkpoint import load_checkpoint
from promptseg.data.bank import ABSENT, PRESENT, UNKNOWN, Bank
from promptseg.data.datasets import KINDS
from promptseg.losses import build_loss
from promptseg.model.unet import PromptSegModel, preset_config
from promptseg.preprocess import Preprocessing
from promptseg.prompts import TARGETS, PromptVocabulary
from promptseg.train import (
    EMA,
    FLIP_POLICY,
    MAX_ROTATION,
    RESUME_MAY_CHANGE,
    SCALE_RANGE,
    StepBatch,
    TargetSampler,
    TrainConfig,
    augment,
    lr_lambda,
    make_batch,
    resume_mismatches,
    step_losses,
)

pytestmark = pytest.mark.slow

RES = TRAIN_BASE["resolution"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _state(out: Path) -> dict:
    return torch.load(out / "last.pt", map_location="cpu", weights_only=False)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _history(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["history"]


@pytest.fixture(scope="module")
def chaos_bank(train_run, data_root) -> Bank:
    return train_run.bank(data_root, ["chaos-mr"], "train", Preprocessing(resolution=RES))


def _cfg(data_root: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**TRAIN_BASE, "data_root": str(data_root), **overrides})


# --------------------------------------------------------------------------- training runs


def test_training_lowers_mask_and_presence_loss_on_a_fixed_batch(
    trained_run, chaos_bank, data_root, vocab_embeddings
):
    cfg = _cfg(data_root)
    sampler = TargetSampler(chaos_bank, cfg.uniform_fraction)
    vocab = PromptVocabulary()
    batches = [make_batch(chaos_bank, sampler, cfg, vocab_embeddings, vocab, s) for s in (500, 501)]
    torch.manual_seed(cfg.seed)  # train() seeds exactly like this before building the model
    initial = PromptSegModel(cfg.model_config(), 384).eval()
    trained = PromptSegModel(cfg.model_config(), 384).eval()
    trained.load_state_dict(_state(trained_run)["model"])
    loss_fn = build_loss(cfg.loss)

    def losses(model: PromptSegModel) -> dict[str, float]:
        with torch.no_grad():
            stats = [step_losses(model, b, loss_fn, 1.0)[1] for b in batches]
        return {k: float(np.mean([s[k] for s in stats])) for k in ("mask", "presence")}

    before, after = losses(initial), losses(trained)
    assert after["mask"] < 0.9 * before["mask"], (before, after)
    assert after["presence"] < 0.9 * before["presence"], (before, after)

    history = _history(trained_run)
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]


def test_same_seed_same_weights_other_seed_differs(train_run, trained_run, tmp_path):
    again = train_run(tmp_path / "again")
    a, b = _state(trained_run), _state(again)
    assert _same(a["model"], b["model"]) and _same(a["ema"], b["ema"])
    assert _history(again) == _history(trained_run)  # losses and tune/val metrics

    first = train_run(tmp_path / "seed0", stop_after_minutes=1e-6)  # one step
    other = train_run(tmp_path / "seed1", stop_after_minutes=1e-6, seed=1)
    s0, s1 = _state(first), _state(other)
    assert s0["step"] == s1["step"] == 1
    assert not _same(s0["model"], s1["model"])


class _Crash(Exception):
    """Stands for a crash right after a state save."""


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(
    train_run, trained_run, tmp_path, capsys
):
    """Out of wall time after step 1, SIGTERM during step 13, a crash after the save at step
    20: the resumed run ends with bit-identical model, EMA and optimiser state."""
    out = tmp_path / "run"
    train_run(out, stop_after_minutes=1e-6)
    assert _state(out)["step"] == 1
    assert "stopped at step 1; resume with --resume" in capsys.readouterr().out

    real_make_batch = train_mod.make_batch

    def terminate_at_step_12(bank, sampler, cfg, embeddings, vocab, step):
        if step == 12:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler sets a flag; the step finishes
        return real_make_batch(bank, sampler, cfg, embeddings, vocab, step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "make_batch", terminate_at_step_12)
        # Options outside the recipe may change on resume.
        train_run(out, resume=True, progress=True, save_every_steps=7)
    assert _state(out)["step"] == 13
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'last.pt'} at step 1 (8 samples)" in printed
    assert "stopped at step 13" in printed

    real_save = train_mod._atomic_torch_save

    def save_then_crash(obj: dict, path: Path) -> None:
        real_save(obj, path)
        if obj["step"] == 20:
            raise _Crash

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "_atomic_torch_save", save_then_crash)
        with pytest.raises(_Crash):
            train_run(out, resume=True)
    assert _state(out)["step"] == 20

    train_run(out, resume=True)
    got, ref = _state(out), _state(trained_run)
    assert got["step"] == ref["step"] == 30
    assert _same(got["model"], ref["model"])
    assert _same(got["ema"], ref["ema"])
    assert got["scheduler"] == ref["scheduler"]
    opt_got, opt_ref = got["optimizer"]["state"], ref["optimizer"]["state"]
    assert opt_got.keys() == opt_ref.keys()
    assert all(_same(opt_got[k], opt_ref[k]) for k in opt_ref)
    # Evaluations (of the EMA weights) agree; the training-loss means of the windows that
    # an interruption cut differ, the last window (steps 21-30) does not.
    resumed, reference = _history(out), _history(trained_run)
    assert [h["step"] for h in resumed] == [10, 20, 30]
    for r, e in zip(resumed, reference):
        assert (r["tune"], r["val"], r["score"]) == (e["tune"], e["val"], e["score"])
    assert resumed[-1]["train"] == reference[-1]["train"]
    best, best_ref = load_checkpoint(out / "best.pt"), load_checkpoint(trained_run / "best.pt")
    assert best.train["step"] == best_ref.train["step"]
    assert _same(best.model.state_dict(), best_ref.model.state_dict())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_resume_with_other_options_is_refused_by_the_cli_before_writing(
    trained_run, data_root, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = _snapshot(out)
    changed = {
        "lr": 1e-3,
        "loss": "dice",
        "total_samples": 480,
        "uniform_fraction": 0.5,
        "datasets": ["brain-tumor"],
    }
    config = tmp_path / "changed.json"
    values = {**TRAIN_BASE, "data_root": str(data_root), "out": str(out), **changed}
    config.write_text(json.dumps({**values, "threads": 2, "save_every_steps": 3}))
    result = subprocess.run(
        [sys.executable, "-m", "promptseg.cli", "train", "--config", str(config), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"promptseg train: error: {out / 'last.pt'}: cannot resume")
    for name, value in changed.items():
        assert (
            f"{name} {TRAIN_BASE.get(name, getattr(TrainConfig(), name))!r} -> {value!r}"
            in (lines[0])
        )
    assert "threads" not in lines[0] and "save_every_steps" not in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert _snapshot(out) == before  # last.pt, best.pt, config.json, metrics untouched


def test_resume_of_a_finished_run_may_change_threads_and_progress(
    train_run, trained_run, tmp_path, capsys
):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    train_run(out, resume=True, threads=2, progress=True, save_every_steps=4, device="cpu")
    assert f"resumed from {out / 'last.pt'} at step 30" in capsys.readouterr().out
    got, ref = _state(out), _state(trained_run)
    assert _same(got["model"], ref["model"]) and _same(got["ema"], ref["ema"])
    assert got["step"] == 30
    assert json.loads((out / "config.json").read_text())["config"]["threads"] == 2


def test_resume_refuses_files_that_are_not_training_states(train_run, trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    state = _state(out)
    old = {"model": state["model"], "epoch": 3, "history": []}  # the epoch-based trainer's
    torch.save(old, out / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt: not a promptseg training state"):
        train_run(out, resume=True)
    (out / "last.pt").write_text("not a state\n")
    with pytest.raises(ValueError, match=r"last\.pt: not a readable training state"):
        train_run(out, resume=True)


def test_resume_mismatches_compares_result_shaping_fields_only(data_root):
    saved = json.loads(json.dumps(_cfg(data_root).__dict__))
    same = _cfg(data_root, threads=2, progress=True, out="elsewhere", save_every_steps=1)
    assert resume_mismatches(saved, same) == []
    changed = _cfg(data_root, lr=0.1, datasets=["lits-ct"], ema_decay=0.9)
    assert resume_mismatches(saved, changed) == [
        "datasets ['chaos-mr'] -> ['lits-ct']",
        f"lr {TRAIN_BASE['lr']!r} -> 0.1",
        "ema_decay 0.999 -> 0.9",
    ]
    del saved["lr"]  # a field the saved run did not know is not compared
    assert resume_mismatches(saved, changed) == [
        "datasets ['chaos-mr'] -> ['lits-ct']",
        "ema_decay 0.999 -> 0.9",
    ]
    assert {"out", "data_root", "threads", "progress", "save_every_steps"} <= RESUME_MAY_CHANGE
    assert not {"seed", "batch", "total_samples", "preset", "augment"} & RESUME_MAY_CHANGE


def test_run_outputs(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"best.pt", "last.pt", "metrics.json", "loss_curve.png", "config.json"} <= names
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]

    metrics = json.loads((trained_run / "metrics.json").read_text())
    history = metrics["history"]
    assert [(h["step"], h["samples"]) for h in history] == [(10, 80), (20, 160), (30, 240)]
    for row in history:
        assert {"loss", "mask", "presence"} <= set(row["train"])
        assert all(math.isfinite(v) and v > 0 for v in row["train"].values())
        for split in ("tune", "val"):
            m = row[split]
            assert set(m["dice"]) <= {f"chaos-mr/{t}" for t in TARGETS}
            for key in ("mean_dice", "empty_rate", "empty_same_domain", "empty_cross_domain"):
                assert 0.0 <= m[key] <= 1.0, (split, key)
            assert set(m["ungated"]) == {"mean_dice", "empty_rate"}
            assert m["empty_rate"] >= m["ungated"]["empty_rate"]  # the gate only empties masks
        tune = row["tune"]
        assert row["score"] == pytest.approx(0.7 * tune["mean_dice"] + 0.3 * tune["empty_rate"])
    scores = [h["score"] for h in history]
    assert metrics["best_score"] == max(scores)

    best = load_checkpoint(trained_run / "best.pt")
    assert best.config == preset_config("default", resolution=RES)
    assert best.model.unet.presence_head is not None
    first_best = history[scores.index(max(scores))]
    assert best.train["step"] == first_best["step"]
    assert best.train["tune"] == first_best["tune"] and best.train["val"] == first_best["val"]
    assert best.train["config"]["datasets"] == ["chaos-mr"]
    assert best.preprocessing.resolution == RES
    assert best.vocabulary == PromptVocabulary()
    assert "Segment the liver" in best.prompt_embeddings

    png = trained_run / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        im.load()
        assert im.width > im.height > 100

    config = json.loads((trained_run / "config.json").read_text())
    assert config["config"]["seed"] == 0 and config["model"]["resolution"] == RES
    assert config["train_images"] > config["val_images"] > 0 and config["tune_images"] > 0
    assert list(config["target_weights"]) == list(TARGETS)


# --------------------------------------------------------------------------- augmentation


def _blob_batch(b: int, t: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, R, R) images and (B, T, R, R) masks: a square in the top-left quadrant (mask 0)
    and a disc at the centre (mask 1)."""
    r = 64
    rows, cols = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    masks = torch.zeros(b, t, r, r)
    masks[:, 0, 14:26, 16:28] = 1.0
    masks[:, 1] = (((rows - 31.5) ** 2 + (cols - 31.5) ** 2) < 8**2).float()
    return masks[:, :1].clone(), masks


def _centroid(x: torch.Tensor) -> tuple[float, float]:
    rows, cols = torch.meshgrid(torch.arange(x.shape[-2]), torch.arange(x.shape[-1]), indexing="ij")
    w = x.clamp(min=0)
    return float((rows * w).sum() / w.sum()), float((cols * w).sum() / w.sum())


@pytest.mark.parametrize("dataset", sorted(FLIP_POLICY))
def test_augment_shapes_binary_masks_and_flip_policy(dataset):
    moved_quadrant = 0
    for seed in range(4):
        images, masks = _blob_batch(16)
        gen = torch.Generator().manual_seed(seed)
        out_i, out_m = augment(images, masks, [dataset] * 16, gen)
        assert out_i.shape == images.shape and out_m.shape == masks.shape
        assert set(torch.unique(out_m).tolist()) <= {0.0, 1.0}
        assert out_i.min() >= 0 and out_i.max() <= 1
        for img, mask in zip(out_i, out_m):
            assert mask[0].sum() > 50  # the square survives the affine
            r, c = _centroid(mask[0])
            ri, ci = _centroid(img[0] * (img[0] > 0.5))
            assert abs(r - ri) < 2 and abs(c - ci) < 2  # image and mask move together
            moved_quadrant += not (r < 32 and c < 32)
    if FLIP_POLICY[dataset] == "none":
        assert moved_quadrant == 0  # never flipped: left and right stay where they are
    else:
        assert moved_quadrant > 20  # flips happen (about 3 in 4 samples)


def _orientation(mask: torch.Tensor) -> float:
    """Angle (degrees, -90..90) of the principal axis of a mask from the column axis."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    r, c = rows.double() - rows.double().mean(), cols.double() - cols.double().mean()
    return math.degrees(0.5 * math.atan2(2 * float((r * c).mean()), float((c * c - r * r).mean())))


@pytest.mark.parametrize("dataset", sorted(FLIP_POLICY))
def test_augment_rotation_and_scale_bounds(dataset):
    """A horizontal bar turns by at most the dataset's angle; a disc's area scales by at most
    SCALE_RANGE squared, both ways."""
    b, r = 64, 64
    masks = torch.zeros(b, 2, r, r)
    masks[:, 0, 30:34, 12:52] = 1.0
    rows, cols = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    masks[:, 1] = (((rows - 31.5) ** 2 + (cols - 31.5) ** 2) < 9**2).float()
    area = float(masks[0, 1].sum())
    _, out = augment(masks[:, :1].clone(), masks, [dataset] * b, torch.Generator().manual_seed(1))
    angles = []
    for m in out:
        a = abs(_orientation(m[0] > 0))
        angles.append(min(a, 90 - a) if FLIP_POLICY[dataset] == "dihedral" else a)
    bound = MAX_ROTATION[dataset]
    assert max(angles) <= bound + 3  # nearest resampling of a 4-pixel bar
    assert max(angles) > 0.6 * bound  # it does rotate
    ratios = np.array([float(m[1].sum()) / area for m in out])
    lo, hi = SCALE_RANGE
    assert ratios.min() >= 0.9 * lo**2 and ratios.max() <= 1.1 * hi**2
    assert ratios.min() < 0.8 and ratios.max() > 1.3  # shrinks and grows


def test_augment_is_deterministic_for_a_generator():
    images, masks = _blob_batch(4)
    a = augment(images, masks, ["brain-tumor"] * 4, torch.Generator().manual_seed(3))
    b = augment(images, masks, ["brain-tumor"] * 4, torch.Generator().manual_seed(3))
    c = augment(images, masks, ["brain-tumor"] * 4, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


# --------------------------------------------------------------------------- sampling, batches


def test_target_sampler_weights_follow_sqrt_positives(chaos_bank):
    sampler = TargetSampler(chaos_bank, 0.25)
    counts = (chaos_bank.state == PRESENT).sum(axis=0)
    assert counts[TARGETS.index("liver")] > 0 and counts[TARGETS.index("glioma")] == 0
    np.testing.assert_allclose(sampler.weights, np.sqrt(counts) / np.sqrt(counts).sum())
    assert sampler.weights[TARGETS.index("glioma")] == 0

    images, targets = sampler.draw(np.random.default_rng(0), 8000)
    first = targets[:6000]  # round(8000 * 0.25) = 2000 uniform draws come last
    assert (first >= 0).all()
    assert (chaos_bank.state[images[:6000], first] == PRESENT).all()
    freq = np.bincount(first, minlength=len(TARGETS)) / len(first)
    np.testing.assert_allclose(freq, sampler.weights, atol=0.02)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_target_sampler_uniform_fraction(chaos_bank, fraction):
    sampler = TargetSampler(chaos_bank, fraction)
    size = 4000
    images, targets = sampler.draw(np.random.default_rng(1), size)
    n_uniform = round(size * fraction)
    uniform_images, uniform_targets = images[size - n_uniform :], targets[size - n_uniform :]
    any_present = (chaos_bank.state == PRESENT).any(axis=1)
    if n_uniform:
        # Uniform draws see slices without any target, as often as the bank holds them.
        empty = (uniform_targets == -1).mean()
        assert empty == pytest.approx(1 - any_present.mean(), abs=0.04)
        assert (uniform_targets == -1).tolist() == (~any_present[uniform_images]).tolist()
        assert len(np.unique(uniform_images)) > 0.5 * min(n_uniform, len(any_present))
    else:
        assert (targets >= 0).all()


def test_target_sampler_refuses_a_bank_without_positives():
    bank = Bank(8)
    bank.state = np.full((3, len(TARGETS)), ABSENT, np.int8)
    with pytest.raises(ValueError, match="no positive slice"):
        TargetSampler(bank, 0.25)


def test_make_batch_is_a_function_of_seed_and_step(chaos_bank, data_root, vocab_embeddings):
    cfg = _cfg(data_root)
    sampler, vocab = TargetSampler(chaos_bank, cfg.uniform_fraction), PromptVocabulary()
    a = make_batch(chaos_bank, sampler, cfg, vocab_embeddings, vocab, 7)
    b = make_batch(chaos_bank, sampler, cfg, vocab_embeddings, vocab, 7)
    c = make_batch(chaos_bank, sampler, cfg, vocab_embeddings, vocab, 8)
    for name in ("images", "masks", "state", "mask_target", "embeddings"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (8, 1, RES, RES) and a.masks.shape == (8, len(TARGETS), RES, RES)
    assert a.embeddings.shape == (8, len(TARGETS), 384)
    # After augmentation a PRESENT state has a mask; a target pushed out of view is ABSENT.
    for batch in (a, c):
        has_mask = batch.masks.flatten(2).amax(dim=2) > 0
        assert torch.equal(batch.state == PRESENT, has_mask)
        chosen = batch.mask_target >= 0
        rows = torch.nonzero(chosen)[:, 0]
        assert (batch.state[rows, batch.mask_target[rows]] == PRESENT).all()
        assert chosen.sum() >= 4  # target-first draws (6 of 8) train a mask


def test_step_losses_score_every_known_pair_and_one_mask_per_image(
    chaos_bank, data_root, vocab_embeddings
):
    """Presence BCE over all known (image, target) pairs and the mask loss of each image's
    chosen target equal what separate forward passes of those pairs give."""
    cfg = _cfg(data_root)
    sampler, vocab = TargetSampler(chaos_bank, cfg.uniform_fraction), PromptVocabulary()
    batch = make_batch(chaos_bank, sampler, cfg, vocab_embeddings, vocab, 3)
    batch.state[0, TARGETS.index("glioma")] = UNKNOWN  # an unknown pair is not scored
    torch.manual_seed(0)
    model = PromptSegModel(cfg.model_config(), 384).eval()
    loss_fn = build_loss(cfg.loss)
    with torch.no_grad():
        loss, stats = step_losses(model, batch, loss_fn, 0.5)
        presence, labels, logits, targets = [], [], [], []
        for b in range(len(batch.images)):
            for t in range(len(TARGETS)):
                if batch.state[b, t] == UNKNOWN:
                    continue
                m, p = model(batch.images[b : b + 1], batch.embeddings[b, t][None])
                presence.append(p[0, 0])
                labels.append(float(batch.state[b, t] == PRESENT))
                if t == batch.mask_target[b]:
                    logits.append(m)
                    targets.append(batch.masks[b, t][None, None])
    expected_presence = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.stack(presence), torch.tensor(labels)
    )
    assert stats["presence"] == pytest.approx(float(expected_presence), rel=1e-4)
    assert stats["mask"] == pytest.approx(
        float(loss_fn(torch.cat(logits), torch.cat(targets))), rel=1e-4
    )
    assert float(loss) == pytest.approx(0.5 * stats["presence"] + stats["mask"], rel=1e-5)


def test_step_without_mask_pairs_trains_presence_only_and_a_headless_model_still_steps(
    chaos_bank, data_root, vocab_embeddings
):
    cfg = _cfg(data_root)
    sampler, vocab = TargetSampler(chaos_bank, cfg.uniform_fraction), PromptVocabulary()
    batch = make_batch(chaos_bank, sampler, cfg, vocab_embeddings, vocab, 4)
    batch = StepBatch(
        batch.images, batch.masks, batch.state, torch.full_like(batch.mask_target, -1),
        batch.embeddings,
    )  # fmt: skip
    loss_fn = build_loss(cfg.loss)
    for preset, has_head in (("default", True), ("tiny", False)):
        torch.manual_seed(0)
        model = PromptSegModel(preset_config(preset, resolution=RES), 384).train()
        loss, stats = step_losses(model, batch, loss_fn, 1.0)
        assert "mask" not in stats
        loss.backward()  # never "does not require grad", with or without a head
        head_grad = [p.grad for n, p in model.named_parameters() if "presence_head" in n]
        decoder_grad = [p.grad for p in model.unet.decoder.parameters()]
        assert all(g is None for g in decoder_grad)
        if has_head:
            assert head_grad and all(g is not None and g.abs().sum() > 0 for g in head_grad)
        else:
            assert not head_grad and stats["presence"] == 0.0


# --------------------------------------------------------------------------- EMA, schedule, config


def test_ema_follows_the_decay_schedule():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(5.0)
    ema.update(model, step=2)  # warm-up decay (1 + 2) / (10 + 2) = 0.25 < 0.9
    for e, s, p in zip(ema.model.parameters(), start, model.parameters()):
        torch.testing.assert_close(e, 0.25 * s + 0.75 * p)
        assert not e.requires_grad
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)  # buffers copied
    before = [e.clone() for e in ema.model.parameters()]
    ema.update(model, step=1000)  # capped at the decay
    for e, b, p in zip(ema.model.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)


def test_lr_schedule_warms_up_then_decays_to_zero(data_root):
    cfg = _cfg(data_root, batch=8, warmup_samples=80, total_samples=800)  # 10 + 90 steps
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"datasets": ["chaos-ct"]}, r"unknown datasets \['chaos-ct'\]"),
        ({"batch": 1}, r"batch must be >= 2.*got 1, "),
        ({"batch": 16, "total_samples": 8}, r"total_samples >= batch.*got 16, 8, "),
        ({"lr": 0.0}, r"lr > 0.*, 0\.0$"),
        ({"threads": 0}, r"threads and save_every_steps must be >= 1; got 0, "),
        ({"save_every_steps": 0}, r"save_every_steps must be >= 1; got \d+, 0"),
        ({"uniform_fraction": 1.5}, r"uniform_fraction must be in \[0, 1\].*got 1\.5"),
        ({"ema_decay": 1.0}, r"ema_decay in \[0, 1\).*, 1\.0$"),
    ],
)
def test_train_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**overrides)


def test_train_config_defaults_and_model_config():
    cfg = TrainConfig()
    assert cfg.datasets == list(KINDS) and cfg.total_steps == cfg.total_samples // cfg.batch
    assert cfg.total_samples >= 300_000  # the planned long schedule
    assert cfg.model_config() == preset_config("default")
    small = TrainConfig(preset="small", resolution=64, cbam=False, fusion="film")
    assert small.model_config() == preset_config("small", resolution=64, cbam=False, fusion="film")


def test_shipped_default_config_is_the_long_schedule():
    values = json.loads((Path(__file__).parents[1] / "configs" / "default.json").read_text())
    cfg = TrainConfig(**values)
    assert cfg.preset == "default" and cfg.datasets == list(KINDS)
    assert cfg.total_samples >= 300_000  # at least 10x the samples of the old default
    assert cfg.model_config().presence_hidden > 0


def test_compile_falls_back_to_eager_when_the_backend_fails_at_the_first_call(tmp_path):
    """Inductor compiles at the first call; without a working C++ compiler the step runs
    eagerly after one warning line instead of failing."""
    code = (
        "import torch\n"
        "from promptseg.train import _compiled\n"
        "f = _compiled(lambda x: torch.relu(x) * 2 + 1)\n"
        "print(f(torch.ones(4, 3)).sum().item(), f(-torch.ones(2, 3)).sum().item())\n"
    )
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["36.0", "6.0"]
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "torch.compile unavailable" in warnings[0]
    assert "running eagerly" in warnings[0]
