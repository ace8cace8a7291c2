"""Step-based training of the mask decoder and the presence head, with exact resume.

One step takes ``batch`` images. Most are drawn target-first (target probability proportional
to the square root of its number of positive slices, then a random positive slice of it); a
``uniform_fraction`` of them uniformly from all slices, so that slices without any target are
seen too. The prompt-independent encoder runs once per image; every known (image, target) pair
is fused and scored by the presence head (BCE, positives and absent-target negatives from the
same and other domains); the mask decoder runs on one positive pair per image (mask loss on
positives only).

Every random choice of step ``s`` comes from generators seeded with ``(seed, s)``, so a run
resumed from ``last.pt`` (model, EMA, optimiser, schedule, step) continues exactly as an
uninterrupted run would, with the same thread count.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from promptseg.checkpoint import save_checkpoint
from promptseg.data.bank import ABSENT, PRESENT, UNKNOWN, Bank, build_bank
from promptseg.data.datasets import KINDS
from promptseg.losses import build_loss
from promptseg.model.text import DEFAULT_ENCODER, TextEncoder
from promptseg.model.unet import PromptSegModel, UNetConfig, preset_config
from promptseg.preprocess import Preprocessing
from promptseg.prompts import TARGETS, PromptVocabulary
from promptseg.runtime.writers import atomic_write, write_figure_atomic, write_json_atomic
from promptseg.validation import deployed_metrics

# Geometric policy per dataset: brain images may flip freely; the LiTS crop's orientation is
# unknown (any of the 8 dihedral orientations); CHAOS/BTCV keep the left/right convention.
FLIP_POLICY = {"brain-tumor": "flip", "lits-ct": "dihedral", "chaos-mr": "none", "btcv-ct": "none"}
# Largest rotation (degrees) per dataset: brain slices vary more in head pose than abdomens.
MAX_ROTATION = {"brain-tumor": 30.0, "lits-ct": 15.0, "chaos-mr": 15.0, "btcv-ct": 15.0}
SCALE_RANGE = (0.7, 1.4)

# TrainConfig fields a resumed run may change: where outputs go and the data is read from, the
# device, the thread count, the progress bar, how often it saves, and how the step is executed
# (compilation). Every other field shapes the trained weights and must equal the saved run's.
RESUME_MAY_CHANGE = frozenset(
    {"out", "data_root", "device", "threads", "progress", "save_every_steps", "compile"}
)


@dataclass
class TrainConfig:
    """Every knob of a training run (saved next to its results)."""

    data_root: str = "../shared/data"
    out: str = "runs/default"
    preset: str = "default"
    fusion: str = "film+cbn"
    se: bool = True
    cbam: bool = True
    loss: str = "dice_bce_pos"
    datasets: list[str] = field(default_factory=lambda: list(KINDS))
    batch: int = 16
    total_samples: int = 320_000  # images seen over the whole schedule
    warmup_samples: int = 8_000
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    encoder: str = DEFAULT_ENCODER
    resolution: int = 0  # 0 = the preset's
    augment: bool = True
    progress: bool = True
    init_from: str = ""  # fine-tune: start from this checkpoint's (or last.pt's) weights
    presence_weight: float = 1.0
    uniform_fraction: float = 0.25
    ema_decay: float = 0.999
    eval_every_samples: int = 16_000
    save_every_steps: int = 100
    channels_last: bool = True
    bf16: bool = False  # bf16 autocast of the training step (fast where the CPU has native bf16)
    compile: bool = False
    empty_weight: float = 0.3  # selection score = (1 - w) * mean Dice + w * empty rate

    def __post_init__(self) -> None:
        unknown = [d for d in self.datasets if d not in KINDS]
        if unknown:
            raise ValueError(f"unknown datasets {unknown}; expected some of {list(KINDS)}")
        if self.batch < 2 or self.total_samples < self.batch or self.lr <= 0:
            raise ValueError(
                "batch must be >= 2, total_samples >= batch and lr > 0; got "
                f"{self.batch}, {self.total_samples}, {self.lr}"
            )
        if self.threads < 1 or self.save_every_steps < 1:
            raise ValueError(
                "threads and save_every_steps must be >= 1; got "
                f"{self.threads}, {self.save_every_steps}"
            )
        if not 0 <= self.uniform_fraction <= 1 or not 0 <= self.ema_decay < 1:
            raise ValueError(
                "uniform_fraction must be in [0, 1] and ema_decay in [0, 1); got "
                f"{self.uniform_fraction}, {self.ema_decay}"
            )

    @property
    def total_steps(self) -> int:
        return self.total_samples // self.batch

    def model_config(self) -> UNetConfig:
        overrides = {"fusion": self.fusion, "se": self.se, "cbam": self.cbam}
        if self.resolution:
            overrides["resolution"] = self.resolution
        return preset_config(self.preset, **overrides)


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


def step_seed(seed: int, step: int) -> int:
    """The seed of every random choice made in ``step`` of a run with ``seed``."""
    return (seed * 1_000_003 + step) % (2**63)


# ---------------------------------------------------------------- sampling and augmentation


class TargetSampler:
    """Chooses the images of a step and the target whose mask each one trains.

    Target-first draws pick target t with probability proportional to sqrt(positives of t);
    uniform draws pick any slice (a present target of it, if any, trains the mask).
    """

    def __init__(self, bank: Bank, uniform_fraction: float) -> None:
        self.bank = bank
        self.uniform_fraction = uniform_fraction
        present = bank.state == PRESENT
        self.positives = [np.nonzero(present[:, j])[0] for j in range(len(TARGETS))]
        counts = np.array([len(p) for p in self.positives], np.float64)
        if counts.sum() == 0:
            raise ValueError("the training bank holds no positive slice")
        self.weights = np.sqrt(counts) / np.sqrt(counts).sum()

    def draw(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Image indices (size,) and the mask target column of each (-1: none)."""
        n_uniform = int(round(size * self.uniform_fraction))
        columns = rng.choice(len(TARGETS), size=size - n_uniform, p=self.weights)
        images = [int(rng.choice(self.positives[c])) for c in columns]
        targets = list(columns)
        for _ in range(n_uniform):
            image = int(rng.integers(len(self.bank.images)))
            present = np.nonzero(self.bank.state[image] == PRESENT)[0]
            images.append(image)
            targets.append(int(rng.choice(present)) if len(present) else -1)
        return np.array(images), np.array(targets)


def batch_tensors(bank: Bank, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Slices (B, 1, R, R) and every target's mask (B, T, R, R) float (zeros where not present)."""
    r = bank.resolution
    x = torch.from_numpy(bank.images[images])[:, None]
    masks = torch.zeros(len(images), len(TARGETS), r, r)
    index = bank.mask_index[images]
    for b, j in zip(*np.nonzero(index >= 0)):
        masks[b, j] = torch.from_numpy(bank.masks[index[b, j]].astype(np.float32))
    return x, masks


def augment(
    images: torch.Tensor, masks: torch.Tensor, datasets: list[str], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random affine (rotation by dataset, scale 0.7-1.4, shift), dataset-dependent flips,
    intensity jitter (gamma, contrast, noise).

    images (B, 1, R, R), masks (B, T, R, R) -> same shapes (masks stay binary).
    """
    b = images.shape[0]
    u = torch.rand(b, 8, generator=gen)
    max_angle = torch.tensor([math.radians(MAX_ROTATION[d]) for d in datasets])
    angle = (2 * u[:, 0] - 1) * max_angle
    lo, hi = SCALE_RANGE
    scale = torch.exp(math.log(lo) + u[:, 1] * (math.log(hi) - math.log(lo)))
    shift = (u[:, 2:4] - 0.5) * 0.2
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
    contrast = 0.85 + 0.3 * torch.rand(b, 1, 1, 1, generator=gen)
    noise = (
        torch.randn(images.shape, generator=gen)
        * 0.03
        * (u[:, 7] < 0.3).float()[:, None, None, None]
    )
    images = (images.clamp(0, 1) ** gamma * contrast + noise).clamp(0, 1)
    return images, masks


# ---------------------------------------------------------------- one step


@dataclass
class StepBatch:
    """Everything one training step needs, already on the device."""

    images: torch.Tensor  # (B, 1, R, R)
    masks: torch.Tensor  # (B, T, R, R)
    state: torch.Tensor  # (B, T) int8: PRESENT / ABSENT / UNKNOWN after augmentation
    mask_target: torch.Tensor  # (B,) long, -1 where the image trains no mask
    embeddings: torch.Tensor  # (B, T, E): a sampled phrasing of every target per image


def make_batch(
    bank: Bank,
    sampler: TargetSampler,
    cfg: TrainConfig,
    embeddings: dict[str, torch.Tensor],
    vocab: PromptVocabulary,
    step: int,
) -> StepBatch:
    """The deterministic batch of ``step`` (images, augmented masks, states, phrasings)."""
    seed = step_seed(cfg.seed, step)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    idx, mask_target = sampler.draw(rng, cfg.batch)
    images, masks = batch_tensors(bank, idx)
    state = torch.from_numpy(bank.state[idx].copy())
    if cfg.augment:
        images, masks = augment(images, masks, [bank.image_dataset[i] for i in idx], gen)
        # A target pushed out of the field of view by the affine is absent from this view.
        gone = (state == PRESENT) & (masks.flatten(2).amax(dim=2) == 0)
        state[gone] = ABSENT
    target = torch.from_numpy(mask_target)
    has = target >= 0
    target[has & (state[torch.arange(len(idx)), target.clamp(min=0)] != PRESENT)] = -1
    prng = random.Random(seed)
    phrasings = [[vocab.sample(t, prng) for t in TARGETS] for _ in range(len(idx))]
    emb = torch.stack([torch.stack([embeddings[p] for p in row]) for row in phrasings])
    return StepBatch(images, masks, state, target, emb)


def step_losses(
    model: PromptSegModel, batch: StepBatch, mask_loss, presence_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mask loss on one positive pair per image plus presence BCE on every known pair."""
    unet = model.unet
    skips = unet.encode(batch.images)
    known = batch.state != UNKNOWN  # (B, T)
    img_idx, tgt_idx = torch.nonzero(known, as_tuple=True)
    film = model.film(batch.embeddings[img_idx, tgt_idx])  # (P, F)
    fused = unet.fuse(skips[-1][img_idx], film)  # (P, Cb, h, w)
    presence = unet.presence(fused)[:, 0]
    labels = (batch.state[img_idx, tgt_idx] == PRESENT).float().to(presence.device)
    presence_loss = F.binary_cross_entropy_with_logits(presence, labels)
    if unet.presence_head is None:  # nothing to learn: the network always answers "present"
        presence_loss = presence_loss * 0.0
    # Pair row of each image's mask target (pairs are ordered image-major, target-minor).
    pair_of = torch.full(known.shape, -1, dtype=torch.long)
    pair_of[img_idx, tgt_idx] = torch.arange(len(img_idx))
    chosen = torch.nonzero(batch.mask_target >= 0)[:, 0]
    stats = {"presence": float(presence_loss.detach())}
    loss = presence_weight * presence_loss
    if len(chosen) >= 2:  # BatchNorm in the decoder needs more than one sample
        rows = pair_of[chosen, batch.mask_target[chosen]]
        logits = unet.decode(fused[rows], [s[chosen] for s in skips], film[rows])
        target = batch.masks[chosen, batch.mask_target[chosen]][:, None]
        m = mask_loss(logits, target)
        loss = loss + m
        stats["mask"] = float(m.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats


# ---------------------------------------------------------------- EMA, schedule, state


class EMA:
    """Exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then cosine decay to zero at ``total_steps``."""
    warm = max(1, cfg.warmup_samples // cfg.batch)
    total = cfg.total_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def _atomic_torch_save(obj: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _write_json(obj: dict, path: Path) -> None:
    write_json_atomic(obj, path, default=str)


def _load_state(last_path: Path, cfg: TrainConfig) -> dict:
    try:
        state = torch.load(last_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling error is a bad file
        detail = " ".join(str(exc).split())[:200]
        raise ValueError(f"{last_path}: not a readable training state ({detail})") from exc
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError(f"{last_path}: not a promptseg training state (no 'model' and 'step')")
    diffs = resume_mismatches(state.get("config", {}), cfg)
    if diffs:
        raise ValueError(
            f"{last_path}: cannot resume with different options ({'; '.join(diffs)}); "
            "resume with the run's options or train into another --out"
        )
    return state


def plot_history(history: list[dict], path: Path) -> None:
    """Training losses and tune-split metrics against samples seen (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    samples = [h["samples"] for h in history]
    for key in ("loss", "mask", "presence"):
        ax[0].plot(samples, [h["train"].get(key, np.nan) for h in history], label=key)
    ax[0].set(xlabel="samples seen", ylabel="training loss (mean since last point)")
    ax[0].legend()
    for split, style in (("tune", "-"), ("val", ":")):
        rows = [h for h in history if split in h]
        xs = [h["samples"] for h in rows]
        ax[1].plot(
            xs, [h[split]["mean_dice"] for h in rows], style, marker="o", label=f"{split} Dice"
        )
        ax[1].plot(
            xs, [h[split]["empty_rate"] for h in rows], style, marker="s", label=f"{split} empty"
        )
    ax[1].set(xlabel="samples seen", ylim=(0, 1), title="deployed metrics (EMA, gate 0.5)")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    write_figure_atomic(fig, path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the run


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves its state and returns at the next step."""

    def __init__(self) -> None:
        self.set = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.set = True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, resume: bool = False, stop_after_minutes: float = 0.0) -> Path:
    """Run (or continue) the schedule; returns the path of the best checkpoint.

    With ``resume``, training continues from ``out/last.pt`` when it exists (a config differing
    in a result-shaping field is a ValueError, raised before anything is written).
    ``stop_after_minutes`` > 0 saves the state and returns after that much wall time; a later
    ``resume`` continues exactly.
    """
    out = Path(cfg.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    state = _load_state(last_path, cfg) if resume and last_path.is_file() else None
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    model_cfg = cfg.model_config()
    pre = Preprocessing(resolution=model_cfg.resolution)
    vocab = PromptVocabulary()

    encoder = TextEncoder(cfg.encoder)
    all_prompts = list(vocab.all_prompts()) + [vocab.canonical(t) for t in vocab.targets]
    embeddings = encoder.embed_unique(all_prompts)
    identity = encoder.identity().to_dict()
    del encoder

    root = Path(cfg.data_root)
    train_bank = build_bank(root, cfg.datasets, "train", pre, cfg.progress)
    tune_bank = build_bank(root, cfg.datasets, "tune", pre, cfg.progress)
    val_bank = build_bank(root, cfg.datasets, "val", pre, cfg.progress)
    sampler = TargetSampler(train_bank, cfg.uniform_fraction)

    torch.manual_seed(cfg.seed)
    model = PromptSegModel(model_cfg, identity["hidden_size"]).to(cfg.device)
    if cfg.init_from:
        init = torch.load(cfg.init_from, map_location="cpu", weights_only=False)
        model.load_state_dict(init.get("state_dict", init.get("model")), strict=False)
        print(f"initialised from {cfg.init_from}")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    ema = EMA(model, cfg.ema_decay)
    mask_loss = build_loss(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    history: list[dict] = []
    step, best_score = 0, -1.0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, best_score, step = state["history"], state["best_score"], state["step"]
        print(f"resumed from {last_path} at step {step} ({step * cfg.batch} samples)")
    _write_json(
        {
            "config": asdict(cfg),
            "model": model_cfg.to_dict(),
            "train_images": len(train_bank.images),
            "tune_images": len(tune_bank.images),
            "val_images": len(val_bank.images),
            "target_weights": dict(zip(TARGETS, sampler.weights.round(4).tolist())),
        },
        out / "config.json",
    )
    step_fn = _compiled(step_losses) if cfg.compile else step_losses

    def save_state() -> None:
        _atomic_torch_save(
            {
                "model": model.state_dict(),
                "ema": ema.model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "best_score": best_score,
                "step": step,
                "config": asdict(cfg),
            },
            last_path,
        )

    def evaluate_and_keep_best() -> None:
        nonlocal best_score
        tune = deployed_metrics(ema.model, tune_bank, embeddings, vocab)
        val = deployed_metrics(ema.model, val_bank, embeddings, vocab)
        row = {
            "step": step,
            "samples": step * cfg.batch,
            "train": running_means(),
            "tune": tune,
            "val": val,
        }
        score = (1 - cfg.empty_weight) * tune["mean_dice"] + cfg.empty_weight * tune["empty_rate"]
        row["score"] = score
        history.append(row)
        print(
            f"step {step} ({step * cfg.batch} samples): loss {row['train'].get('loss', 0):.4f} "
            f"tune dice {tune['mean_dice']:.4f} empty {tune['empty_rate']:.3f} | "
            f"val dice {val['mean_dice']:.4f} empty {val['empty_rate']:.3f}",
            flush=True,
        )
        if score > best_score:
            best_score = score
            save_checkpoint(
                best_path,
                ema.model,
                text_encoder=identity,
                vocabulary=vocab,
                preprocessing=pre,
                prompt_embeddings=embeddings,
                train={
                    "config": asdict(cfg),
                    "step": step,
                    "samples": step * cfg.batch,
                    "tune": tune,
                    "val": val,
                },
            )
        _write_json({"history": history, "best_score": best_score}, out / "metrics.json")
        plot_history(history, out / "loss_curve.png")

    recent: list[dict] = []

    def running_means() -> dict:
        keys = {k for r in recent for k in r}
        means = {k: float(np.mean([r[k] for r in recent if k in r])) for k in keys}
        recent.clear()
        return means

    eval_steps = max(1, cfg.eval_every_samples // cfg.batch)
    stop = _StopFlag()
    started, first_step = time.time(), step
    bar = tqdm(total=cfg.total_steps, initial=step, desc="train", disable=not cfg.progress)
    try:
        while step < cfg.total_steps:
            model.train()
            torch.manual_seed(step_seed(cfg.seed, step))  # dropout
            batch = make_batch(train_bank, sampler, cfg, embeddings, vocab, step)
            batch.images = batch.images.to(cfg.device, memory_format=memory_format)
            batch.masks = batch.masks.to(cfg.device)
            batch.embeddings = batch.embeddings.to(cfg.device)
            with torch.autocast(cfg.device.split(":")[0], torch.bfloat16, enabled=cfg.bf16):
                loss, stats = step_fn(model, batch, mask_loss, cfg.presence_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            ema.update(model, step)
            recent.append(stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", pres=f"{stats['presence']:.3f}")
            if step % eval_steps == 0 or step == cfg.total_steps:
                evaluate_and_keep_best()
            out_of_time = stop_after_minutes and time.time() - started > stop_after_minutes * 60
            if step % cfg.save_every_steps == 0 or stop.set or out_of_time:
                save_state()
                if not cfg.progress:  # a progress line per save for logs
                    rate = (step - first_step) * cfg.batch / max(time.time() - started, 1e-9)
                    print(
                        f"step {step}/{cfg.total_steps} ({step * cfg.batch} samples, "
                        f"{rate:.1f} images/s this run): loss {stats['loss']:.4f} "
                        f"presence {stats['presence']:.4f}",
                        flush=True,
                    )
            if stop.set or out_of_time:
                print(f"stopped at step {step}; resume with --resume", flush=True)
                break
        else:
            save_state()
    finally:
        stop.restore()
        bar.close()
    print(f"trained {time.time() - started:.0f}s this run; best checkpoint {best_path}")
    return best_path


def _compiled(fn):
    """``torch.compile`` of the model inside ``fn`` where it works here, else ``fn`` itself.

    The backend compiles at the first call, so a failure there (no C++ compiler, an
    unsupported op) also falls back to eager for the rest of the run.
    """

    def eager(exc: Exception):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        print(f"warning: torch.compile unavailable ({first}); running eagerly", file=sys.stderr)
        return fn

    try:
        current = torch.compile(fn, dynamic=True)
    except Exception as exc:  # noqa: BLE001 - any backend failure falls back to eager
        return eager(exc)

    def call(*args, **kwargs):
        nonlocal current
        if current is not fn:
            try:
                return current(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - as above, at the first compilation
                current = eager(exc)
        return fn(*args, **kwargs)

    return call
