"""Train and evaluate the runs of a study: cached data banks, a process pool, resumable.

Each run's result is one JSON file ``<cache>/<spec key>.json``; a run whose file exists is not
repeated, so an interrupted study continues where it stopped, and studies share runs.
Evaluation is on the validation split at the model's resolution, slice by slice (2D metrics;
distances in model pixels), per target and pooled over the test datasets.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from promptseg.studies.spec import RunSpec

METRICS = ("dice", "iou", "f1", "precision", "recall", "hd95", "kappa")
CACHE = Path("runs/study_cache")


def git_hash() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- cached inputs


def _bank_path(cache: Path, dataset: str, split: str, resolution: int) -> Path:
    return cache / f"bank_{dataset}_{split}_{resolution}.pkl"


def prepare_inputs(specs: list[RunSpec], cache: Path, progress: bool = True) -> None:
    """Build (once) every data bank and the prompt embeddings the runs need."""
    from promptseg.data.bank import build_bank
    from promptseg.preprocess import Preprocessing

    cache.mkdir(parents=True, exist_ok=True)
    needed = set()
    for s in specs:
        needed |= {(d, "train", s.resolution, s.data_root) for d in s.train_datasets}
        needed |= {(d, "val", s.resolution, s.data_root) for d in s.test_datasets}
    for dataset, split, res, root in sorted(needed):
        path = _bank_path(cache, dataset, split, res)
        if not path.is_file():
            bank = build_bank(Path(root), [dataset], split, Preprocessing(resolution=res), progress)
            _atomic_bytes(path, pickle.dumps(bank))
    emb_path = cache / "embeddings.pkl"
    if not emb_path.is_file():
        from promptseg.model.text import TextEncoder
        from promptseg.prompts import PromptVocabulary

        vocab = PromptVocabulary()
        encoder = TextEncoder()
        prompts = list(vocab.all_prompts()) + [vocab.canonical(t) for t in vocab.targets]
        emb = {p: e.numpy() for p, e in encoder.embed_unique(prompts).items()}
        _atomic_bytes(emb_path, pickle.dumps({"embeddings": emb, "encoder": encoder.identity()}))


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def _atomic_json(path: Path, obj: dict) -> None:
    _atomic_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


_LOADED: dict[Path, object] = {}


def _load(path: Path):
    if path not in _LOADED:
        _LOADED[path] = pickle.loads(path.read_bytes())
    return _LOADED[path]


# ----------------------------------------------------------------------------- one run


def _train_samples(banks: list, targets: set[str], neg_ratio: float, rng: random.Random):
    """(bank index, sample) pairs: all positives plus neg_ratio x as many hard negatives."""
    pos, neg = [], []
    for b, bank in enumerate(banks):
        for s in bank.samples:
            if s.target in targets and s.hard:
                (pos if s.positive else neg).append((b, s))
    picked = pos + rng.sample(neg, min(len(neg), int(round(neg_ratio * len(pos)))))
    rng.shuffle(picked)
    return picked


def _batch(banks: list, chunk: list):
    import torch

    images = torch.from_numpy(np.stack([banks[b].images[s.image] for b, s in chunk]))[:, None]
    masks = torch.zeros_like(images)
    for i, (b, s) in enumerate(chunk):
        if s.positive:
            masks[i, 0] = torch.from_numpy(banks[b].masks[s.mask].astype(np.float32))
    return images, masks


def train_run(spec: RunSpec, cache: Path = CACHE, log_every: int = 10, device: str = "cpu"):
    """Train one model for ``spec.steps`` steps; returns (model, loss curve, seconds)."""
    import torch

    from promptseg.losses import build_loss
    from promptseg.model.unet import PromptSegModel, preset_config
    from promptseg.prompts import PromptVocabulary
    from promptseg.train import augment, seed_everything

    seed_everything(spec.seed, 1)
    emb = _load(cache / "embeddings.pkl")["embeddings"]
    banks = [_load(_bank_path(cache, d, "train", spec.resolution)) for d in spec.train_datasets]
    vocab = PromptVocabulary()
    config = preset_config(
        "small",
        widths=list(spec.widths),
        resolution=spec.resolution,
        fusion=spec.fusion,
        se=spec.se,
        cbam=spec.cbam,
    )
    torch.manual_seed(spec.seed)
    model = PromptSegModel(config, next(iter(emb.values())).shape[0]).to(device)
    loss_fn = build_loss(spec.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.steps)
    rng = random.Random(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    targets = set(spec.targets)
    queue: list = []
    curve, window = [], []
    started = time.time()
    model.train()
    for step in range(1, spec.steps + 1):
        if len(queue) < spec.batch:
            queue += _train_samples(banks, targets, spec.neg_ratio, rng)
        chunk, queue = queue[: spec.batch], queue[spec.batch :]
        images, masks = _batch(banks, chunk)
        datasets = [s.dataset for _, s in chunk]
        images, masks = augment(images, masks, datasets, gen)
        film_in = torch.stack(
            [torch.from_numpy(emb[vocab.sample(s.target, rng)]) for _, s in chunk]
        )
        loss = loss_fn(model(images.to(device), film_in.to(device)), masks.to(device))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"run {spec.key()}: loss became {loss.item()} at {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(loss.item())
        if step % log_every == 0 or step == spec.steps:
            curve.append([step, float(np.mean(window))])
            window = []
    return model, curve, time.time() - started


def evaluate_run(model, spec: RunSpec, cache: Path = CACHE, device: str = "cpu") -> dict:
    """Validation metrics at model resolution: per dataset, per target and macro means."""
    import torch

    from promptseg.metrics import segmentation_metrics
    from promptseg.prompts import PromptVocabulary

    emb = _load(cache / "embeddings.pkl")["embeddings"]
    vocab = PromptVocabulary()
    model.eval()
    per_dataset: dict[str, dict] = {}
    pooled: dict[str, dict[str, list[float]]] = {}
    empty: list[bool] = []
    for dataset in spec.test_datasets:
        bank = _load(_bank_path(cache, dataset, "val", spec.resolution))
        samples = [s for s in bank.samples if s.target in spec.targets and s.hard]
        rows: dict[str, dict[str, list[float]]] = {}
        with torch.no_grad():
            for i in range(0, len(samples), 64):
                chunk = samples[i : i + 64]
                images = torch.from_numpy(bank.images[[s.image for s in chunk]])[:, None]
                e = torch.stack([torch.from_numpy(emb[vocab.canonical(s.target)]) for s in chunk])
                pred = (model(images.to(device), e.to(device))[:, 0] > 0).cpu().numpy()
                for s, p in zip(chunk, pred):
                    if not s.positive:
                        empty.append(not p.any())
                        continue
                    m = segmentation_metrics(p, bank.masks[s.mask])
                    for k in METRICS:
                        rows.setdefault(s.target, {}).setdefault(k, []).append(float(m[k]))
                        pooled.setdefault(s.target, {}).setdefault(k, []).append(float(m[k]))
        per_dataset[dataset] = {
            t: {k: _nanmean(v) for k, v in ms.items()} | {"n": len(ms["dice"])}
            for t, ms in sorted(rows.items())
        }
    per_target = {
        t: {k: _nanmean(v) for k, v in ms.items()} | {"n": len(ms["dice"])}
        for t, ms in sorted(pooled.items())
    }
    macro = {k: _nanmean([per_target[t][k] for t in per_target]) for k in METRICS}
    return {
        "metrics": macro,
        "per_target": per_target,
        "per_dataset": per_dataset,
        "empty_rate": float(np.mean(empty)) if empty else float("nan"),
        "n_negatives": len(empty),
    }


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def run_one(spec: RunSpec, cache: Path = CACHE, git: str = "unknown", device: str = "cpu") -> Path:
    """Train + evaluate ``spec`` unless its result exists; returns the result path."""
    import torch

    out = cache / "runs" / f"{spec.key()}.json"
    if out.is_file():
        return out
    torch.set_num_threads(1)
    model, curve, seconds = train_run(spec, cache, device=device)
    t0 = time.time()
    result = evaluate_run(model, spec, cache, device)
    result.update(
        key=spec.key(),
        spec=spec.to_dict(),
        loss_curve=curve,
        train_seconds=seconds,
        eval_seconds=time.time() - t0,
        git=git,
        torch=torch.__version__,
        threads=1,
        device=device,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_json(out, result)
    return out


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        os.nice(5)
    except OSError:
        pass


def run_all(
    specs: list[RunSpec],
    cache: Path = CACHE,
    workers: int = 1,
    progress: bool = True,
    device: str = "cpu",
) -> list[Path]:
    """Run every spec not yet done (``workers`` processes, one thread each; ``device``: a torch
    device such as "cuda" for the paper preset on a GPU, recorded in each result)."""
    from tqdm import tqdm

    prepare_inputs(specs, cache, progress)
    git = git_hash()
    unique = list({s.key(): s for s in specs}.values())
    todo = [s for s in unique if not (cache / "runs" / f"{s.key()}.json").is_file()]
    print(f"{len(unique)} runs, {len(unique) - len(todo)} already done, {len(todo)} to run")
    paths = []
    bar = tqdm(total=len(todo), desc="study runs", disable=not progress)
    if workers <= 1:
        for s in todo:
            paths.append(run_one(s, cache, git, device))
            bar.update()
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(run_one, s, cache, git, device): s for s in todo}
            for fut in as_completed(futures):
                paths.append(fut.result())
                bar.update()
    bar.close()
    return paths
