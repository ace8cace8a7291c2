"""Training loop: AdamW + cosine annealing, per-epoch validation, best/last checkpoints, resume.

Same seed, same data, same thread count -> same weights (deterministic algorithms, seeded
per-epoch sampling and augmentation).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from promptseg.checkpoint import save_checkpoint
from promptseg.data.bank import Bank, Sample, build_bank
from promptseg.data.datasets import KINDS
from promptseg.losses import build_loss
from promptseg.model.text import DEFAULT_ENCODER, TextEncoder
from promptseg.model.unet import PromptSegModel, preset_config
from promptseg.preprocess import Preprocessing
from promptseg.prompts import PromptVocabulary
from promptseg.runtime.writers import atomic_write, write_figure_atomic, write_json_atomic

# Geometric policy per dataset: brain images may flip freely; the LiTS crop's orientation is
# unknown (any of the 8 dihedral orientations); CHAOS/BTCV keep the left/right convention.
FLIP_POLICY = {"brain-tumor": "flip", "lits-ct": "dihedral", "chaos-mr": "none", "btcv-ct": "none"}

# TrainConfig fields a resumed run may change: where outputs go and the data is read from, the
# device, the thread count and the progress bar. Every other field shapes the trained weights
# (recipe, data selection, schedule, seed) and must equal the saved run's on --resume.
RESUME_MAY_CHANGE = frozenset({"out", "data_root", "device", "threads", "progress"})


@dataclass
class TrainConfig:
    """Every knob of a training run (saved next to its results)."""

    data_root: str = "../shared/data"
    out: str = "runs/default"
    preset: str = "small"
    fusion: str = "film+cbn"
    se: bool = True
    cbam: bool = True
    loss: str = "dice_bce"
    datasets: list[str] = field(default_factory=lambda: list(KINDS))
    epochs: int = 12
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    neg_ratio: float = 0.5
    easy_neg_fraction: float = 0.2
    max_samples_per_epoch: int = 0  # 0 = all positives + negatives
    val_max_samples: int = 600
    encoder: str = DEFAULT_ENCODER
    resolution: int = 0  # 0 = the preset's
    augment: bool = True
    progress: bool = True
    init_from: str = ""  # fine-tune: start from this checkpoint's (or last.pt's) weights
    empty_weight: float = 0.2  # best-checkpoint score = (1 - w) * mean Dice + w * empty rate

    def __post_init__(self) -> None:
        unknown = [d for d in self.datasets if d not in KINDS]
        if unknown:
            raise ValueError(f"unknown datasets {unknown}; expected some of {list(KINDS)}")
        if self.epochs < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError(
                f"epochs, batch must be >= 1 and lr > 0; got {self.epochs}, {self.batch}, {self.lr}"
            )
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def resume_mismatches(saved: dict, cfg: TrainConfig) -> list[str]:
    """``"name saved -> now"`` for each result-shaping field of ``cfg`` that differs from the
    saved run's config (fields in :data:`RESUME_MAY_CHANGE` or absent from ``saved`` are not
    compared)."""
    now = json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as saved
    return [
        f"{name} {saved[name]!r} -> {value!r}"
        for name, value in now.items()
        if name not in RESUME_MAY_CHANGE and name in saved and saved[name] != value
    ]


def _check_resume(state: dict, cfg: TrainConfig, last_path: Path) -> None:
    """Refuse to resume ``last_path`` with options that change the result (one-line error).

    ``last.pt`` files from before the config was saved in them hold only ``epochs``; those
    are compared with that and with ``config.json`` beside them (if readable), with a warning.
    """
    saved = state.get("config")
    if saved is None:
        saved, checked = {}, []
        try:
            saved = dict(json.loads((last_path.parent / "config.json").read_text())["config"])
            checked.append("config.json")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if "epochs" in state:
            saved["epochs"] = state["epochs"]
            checked.append("its epochs")
        print(
            f"warning: {last_path} holds no training config (written by an older version); "
            f"resume checked against {' and '.join(checked) or 'nothing'} only",
            file=sys.stderr,
        )
    diffs = resume_mismatches(saved, cfg)
    if diffs:
        raise ValueError(
            f"{last_path}: cannot resume with different options ({'; '.join(diffs)}); "
            "resume with the run's options or train into another --out"
        )


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_samples(bank: Bank, cfg: TrainConfig, rng: random.Random) -> list[Sample]:
    """All positives plus ``neg_ratio`` x as many negatives (mostly hard), shuffled."""
    pos = bank.positives()
    n_neg = int(round(cfg.neg_ratio * len(pos)))
    n_easy = int(round(cfg.easy_neg_fraction * n_neg))
    hard, easy = bank.negatives(True), bank.negatives(False)
    picked = pos + rng.sample(hard, min(n_neg - n_easy, len(hard)))
    picked += rng.sample(easy, min(n_easy, len(easy)))
    rng.shuffle(picked)
    if cfg.max_samples_per_epoch:
        picked = picked[: cfg.max_samples_per_epoch]
    return picked


def _batch_tensors(bank: Bank, batch: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(bank.images[[s.image for s in batch]])[:, None]
    masks = torch.zeros_like(images)
    for i, s in enumerate(batch):
        if s.positive:
            masks[i, 0] = torch.from_numpy(bank.masks[s.mask].astype(np.float32))
    return images, masks


def augment(
    images: torch.Tensor, masks: torch.Tensor, datasets: list[str], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine (rotation, scale, shift), dataset-dependent flips, intensity jitter.

    images, masks: (B, 1, R, R) -> same shapes.
    """
    b = images.shape[0]
    u = torch.rand(b, 8, generator=gen)
    angle = (u[:, 0] - 0.5) * math.radians(20)
    scale = 0.9 + 0.25 * u[:, 1]
    shift = (u[:, 2:4] - 0.5) * 0.12
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    for i, ds in enumerate(datasets):
        policy = FLIP_POLICY[ds]
        if policy in ("flip", "dihedral"):
            if u[i, 4] < 0.5:
                images[i], masks[i] = images[i].flip(-1), masks[i].flip(-1)
            if u[i, 5] < 0.5:
                images[i], masks[i] = images[i].flip(-2), masks[i].flip(-2)
        if policy == "dihedral" and u[i, 6] < 0.5:
            images[i], masks[i] = (
                images[i].transpose(-1, -2).clone(),
                masks[i].transpose(-1, -2).clone(),
            )
    gamma = torch.exp((torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.7)
    contrast = 0.9 + 0.2 * torch.rand(b, 1, 1, 1, generator=gen)
    noise = (
        torch.randn(images.shape, generator=gen)
        * 0.02
        * (u[:, 7] < 0.3).float()[:, None, None, None]
    )
    images = (images.clamp(0, 1) ** gamma * contrast + noise).clamp(0, 1)
    return images, masks


@torch.no_grad()
def validate(
    model: PromptSegModel,
    bank: Bank,
    samples: list[Sample],
    embeddings: dict[str, torch.Tensor],
    vocab: PromptVocabulary,
    batch: int,
) -> dict:
    """Per-target mean Dice on positives and the empty-answer rate on negatives (model res)."""
    model.eval()
    dice: dict[str, list[float]] = {}
    empty: list[bool] = []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        images, masks = _batch_tensors(bank, chunk)
        emb = torch.stack([embeddings[vocab.canonical(s.target)] for s in chunk])
        pred = (model(images, emb) > 0).float()
        for s, p, m in zip(chunk, pred, masks):
            if s.positive:
                inter = float((p * m).sum())
                d = 2 * inter / max(float(p.sum() + m.sum()), 1e-6)
                dice.setdefault(s.target, []).append(d)
            else:
                empty.append(bool(p.sum() == 0))
    per_target = {t: float(np.mean(v)) for t, v in sorted(dice.items())}
    mean_dice = float(np.mean(list(per_target.values()))) if per_target else 0.0
    empty_rate = float(np.mean(empty)) if empty else 1.0
    return {
        "dice": per_target,
        "mean_dice": mean_dice,
        "empty_rate": empty_rate,
        "score": 0.8 * mean_dice + 0.2 * empty_rate,
    }


def validation_samples(bank: Bank, limit: int, seed: int) -> list[Sample]:
    """All positives and hard negatives (deterministic subsample to ``limit``)."""
    chosen = bank.positives() + bank.negatives(True)
    if limit and len(chosen) > limit:
        chosen = random.Random(seed).sample(chosen, limit)
    return chosen


def plot_history(history: list[dict], path: Path) -> None:
    """Loss curve and validation metrics per epoch (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax[0].set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax[1].plot(epochs, [h["val"]["mean_dice"] for h in history], marker="o", label="mean Dice")
    ax[1].plot(epochs, [h["val"]["empty_rate"] for h in history], marker="s", label="empty rate")
    ax[1].set(xlabel="epoch", ylim=(0, 1), title="validation")
    ax[1].legend()
    fig.tight_layout()
    write_figure_atomic(fig, path, dpi=100)
    plt.close(fig)


def _write_json(obj: dict, path: Path) -> None:
    write_json_atomic(obj, path, default=str)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run training; returns the path of the best checkpoint.

    With ``resume``, training continues from ``out/last.pt`` when it exists; a config that
    differs from the saved run's in a field that shapes the result (all but
    :data:`RESUME_MAY_CHANGE`) is a ValueError naming the fields, raised before anything is
    written.
    """
    out = Path(cfg.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    state = None
    if resume and last_path.is_file():
        try:
            state = torch.load(last_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unpickling error is a bad file
            detail = " ".join(str(exc).split())[:200]
            raise ValueError(f"{last_path}: not a readable training state ({detail})") from exc
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError(f"{last_path}: not a promptseg training state (no 'model' entry)")
        _check_resume(state, cfg, last_path)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed, cfg.threads)
    overrides = {"fusion": cfg.fusion, "se": cfg.se, "cbam": cfg.cbam}
    if cfg.resolution:
        overrides["resolution"] = cfg.resolution
    model_cfg = preset_config(cfg.preset, **overrides)
    pre = Preprocessing(resolution=model_cfg.resolution)
    vocab = PromptVocabulary()

    encoder = TextEncoder(cfg.encoder)
    all_prompts = list(vocab.all_prompts()) + [vocab.canonical(t) for t in vocab.targets]
    embeddings = encoder.embed_unique(all_prompts)
    identity = encoder.identity().to_dict()
    del encoder

    train_bank = build_bank(Path(cfg.data_root), cfg.datasets, "train", pre, cfg.progress)
    val_bank = build_bank(Path(cfg.data_root), cfg.datasets, "val", pre, cfg.progress)
    val_set = validation_samples(val_bank, cfg.val_max_samples, cfg.seed)

    torch.manual_seed(cfg.seed)
    model = PromptSegModel(model_cfg, identity["hidden_size"]).to(cfg.device)
    if cfg.init_from:
        init = torch.load(cfg.init_from, map_location="cpu", weights_only=False)
        model.load_state_dict(init.get("state_dict", init.get("model")))
        print(f"initialised from {cfg.init_from}")
    loss_fn = build_loss(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    history: list[dict] = []
    start_epoch, best_score = 1, -1.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, best_score = state["history"], state["best_score"]
        start_epoch = state["epoch"] + 1
        print(f"resumed from {last_path} at epoch {start_epoch}")
    _write_json(
        {
            "config": asdict(cfg),
            "model": model_cfg.to_dict(),
            "train_samples": len(train_bank.samples),
            "val_samples": len(val_set),
        },
        out / "config.json",
    )

    started = time.time()
    for epoch in range(start_epoch, cfg.epochs + 1):
        rng = random.Random(cfg.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        torch.manual_seed(cfg.seed * 1000 + epoch)
        samples = epoch_samples(train_bank, cfg, rng)
        model.train()
        losses = []
        bar = tqdm(
            range(0, len(samples), cfg.batch),
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not cfg.progress,
        )
        t0 = time.time()
        for i in bar:
            chunk = samples[i : i + cfg.batch]
            if len(chunk) < 2:  # BatchNorm needs more than one sample
                continue
            images, masks = _batch_tensors(train_bank, chunk)
            if cfg.augment:
                images, masks = augment(images, masks, [s.dataset for s in chunk], gen)
            emb = torch.stack([embeddings[vocab.sample(s.target, rng)] for s in chunk])
            loss = loss_fn(model(images.to(cfg.device), emb.to(cfg.device)), masks.to(cfg.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        sched.step()
        val = validate(model, val_bank, val_set, embeddings, vocab, cfg.batch * 2)
        val["score"] = (1 - cfg.empty_weight) * val["mean_dice"] + cfg.empty_weight * val[
            "empty_rate"
        ]
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val": val,
            "lr": sched.get_last_lr()[0],
            "seconds": time.time() - t0,
        }
        history.append(row)
        print(
            f"epoch {epoch}: loss {row['train_loss']:.4f} val dice {val['mean_dice']:.4f} "
            f"empty {val['empty_rate']:.3f} ({row['seconds']:.0f}s)",
            flush=True,
        )
        train_info = {
            "config": asdict(cfg),
            "epoch": epoch,
            "val": val,
            "history": history,
            "seconds": sum(h["seconds"] for h in history),
        }
        if val["score"] > best_score:
            best_score = val["score"]
            save_checkpoint(
                best_path,
                model,
                text_encoder=identity,
                vocabulary=vocab,
                preprocessing=pre,
                prompt_embeddings=embeddings,
                train=train_info,
            )
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "history": history,
            "best_score": best_score,
            "epoch": epoch,
            "epochs": cfg.epochs,
            "config": asdict(cfg),  # checked on --resume
        }
        atomic_write(last_path, lambda tmp, state=state: torch.save(state, tmp))
        _write_json({"history": history, "best_score": best_score}, out / "metrics.json")
        plot_history(history, out / "loss_curve.png")
    print(f"trained {time.time() - started:.0f}s; best checkpoint {best_path}")
    return best_path
