"""Train and evaluate the runs of a study: cached data banks, a process pool, resumable.

Each run's result is one JSON file ``<cache>/<spec key>.json``; a run whose file exists is not
repeated, so an interrupted study continues where it stopped, and studies share runs.
Evaluation is on the validation split at the model's resolution, slice by slice (2D metrics;
distances in model pixels), per target and pooled over the test datasets.
"""

from __future__ import annotations

import hashlib
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

from promptseg.data.datasets import splits_sha256
from promptseg.runtime.writers import atomic_write as _atomic_write
from promptseg.studies import CACHE
from promptseg.studies.spec import METRICS, RunSpec

FINGERPRINT_KEYS = ("device", "splits_sha256", "encoder", "preprocessing")


def git_hash() -> str:
    """HEAD of the checkout this code runs from (``-dirty`` with uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            cwd=here,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=here,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder (studies' one writer)."""
    blob = data.encode() if isinstance(data, str) else data
    return _atomic_write(path, lambda tmp: tmp.write_bytes(blob))


def _atomic_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- fingerprints


def preprocessing(resolution: int) -> dict:
    """The preprocessing a bank at ``resolution`` is built with (JSON types)."""
    from promptseg.preprocess import Preprocessing

    return json.loads(json.dumps(Preprocessing(resolution=resolution).to_dict()))


def fingerprint(spec: RunSpec, device: str, encoder: dict) -> dict:
    """What a run's result depends on beyond its key: checked before a result is reused."""
    return {
        "device": device,
        "splits_sha256": splits_sha256(),
        "encoder": encoder,
        "preprocessing": preprocessing(spec.resolution),
    }


def stale_reasons(result: dict, current: dict) -> list[str]:
    """How a stored result's conditions differ from ``current`` ([] = reusable).

    Results from before fingerprints only record (at most) their device, which defaults to
    "cpu" (older code trained on the CPU only); they are reused unless that differs.
    """
    stored = result.get("fingerprint") or {"device": result.get("device", "cpu")}
    return [
        _difference(k, stored[k], current[k])
        for k in FINGERPRINT_KEYS
        if k in stored and stored[k] != current[k]
    ]


def _difference(key: str, old: object, new: object) -> str:
    if key == "device":
        return f"device {old} -> {new}"
    if key == "splits_sha256":
        return f"splits {str(old)[:12]} -> {str(new)[:12]}"
    if key == "encoder" and isinstance(old, dict) and isinstance(new, dict):
        return "text encoder " + ", ".join(
            f"{k} {str(old.get(k))[:12]} -> {str(new.get(k))[:12]}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        )
    if isinstance(old, dict) and isinstance(new, dict):
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"{key} ({', '.join(changed)})"
    return f"{key} {old} -> {new}"


def _reusable(path: Path, current: dict) -> bool:
    if not path.is_file():
        return False
    return not stale_reasons(json.loads(path.read_text()), current)


# ----------------------------------------------------------------------------- cached inputs


def _inputs_tag(data_root: str, resolution: int) -> str:
    """Short hash of what a bank is built from besides dataset, split and resolution."""
    text = json.dumps(
        {
            "splits_sha256": splits_sha256(),
            "preprocessing": preprocessing(resolution),
            "data_root": str(Path(data_root).resolve()),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _bank_path(cache: Path, dataset: str, split: str, spec: RunSpec) -> Path:
    tag = _inputs_tag(spec.data_root, spec.resolution)
    return cache / f"bank_{dataset}_{split}_{spec.resolution}_{tag}.pkl"


def prepare_inputs(specs: list[RunSpec], cache: Path, progress: bool = True) -> dict:
    """Build (once) every data bank and the prompt embeddings the runs need; returns the text
    encoder's identity (as a dict)."""
    from promptseg.data.bank import build_bank
    from promptseg.preprocess import Preprocessing

    cache.mkdir(parents=True, exist_ok=True)
    needed: dict[Path, tuple[str, str, str, int]] = {}
    for s in specs:
        for split, datasets in (("train", s.train_datasets), ("val", s.test_datasets)):
            for d in datasets:
                needed[_bank_path(cache, d, split, s)] = (d, split, s.data_root, s.resolution)
    for path, (dataset, split, root, res) in sorted(needed.items()):
        if not path.is_file():
            bank = build_bank(Path(root), [dataset], split, Preprocessing(resolution=res), progress)
            write_atomic(path, pickle.dumps(bank))
    return _ensure_embeddings(cache)


def _identity(value: object) -> dict:
    return value.to_dict() if hasattr(value, "to_dict") else dict(value or {})


def _ensure_embeddings(cache: Path) -> dict:
    """Prompt embeddings of the current text encoder: reused only if the stored encoder
    identity matches and every prompt is there, else rebuilt."""
    from promptseg.model.text import TextEncoder
    from promptseg.prompts import PromptVocabulary

    vocab = PromptVocabulary()
    encoder = TextEncoder()
    identity = _identity(encoder.identity())
    prompts = list(vocab.all_prompts()) + [vocab.canonical(t) for t in vocab.targets]
    path = cache / "embeddings.pkl"
    if path.is_file():
        stored = pickle.loads(path.read_bytes())
        if _identity(stored.get("encoder")) == identity and set(prompts) <= set(
            stored["embeddings"]
        ):
            return identity
        print(f"{path}: text encoder or prompts changed; rebuilding the embeddings")
    emb = {p: e.numpy() for p, e in encoder.embed_unique(prompts).items()}
    write_atomic(path, pickle.dumps({"embeddings": emb, "encoder": encoder.identity()}))
    _LOADED.pop(path, None)
    return identity


_LOADED: dict[Path, object] = {}


def _load(path: Path):
    if path not in _LOADED:
        _LOADED[path] = pickle.loads(path.read_bytes())
    return _LOADED[path]


def _embedding_table(cache: Path):
    """(E, D) tensor of every cached prompt embedding and prompt -> row."""
    import torch

    emb = _load(cache / "embeddings.pkl")["embeddings"]
    index = {p: i for i, p in enumerate(emb)}
    return torch.from_numpy(np.stack(list(emb.values()))), index


# ----------------------------------------------------------------------------- one run


def _candidates(banks: list, targets: set[str]) -> tuple[list, list]:
    """(bank index, sample) pairs of the hard positives and hard negatives, scanned once."""
    pos, neg = [], []
    for b, bank in enumerate(banks):
        for s in bank.samples:
            if s.target in targets and s.hard:
                (pos if s.positive else neg).append((b, s))
    return pos, neg


def _train_samples(pos: list, neg: list, neg_ratio: float, rng: random.Random) -> list:
    """One pass: all positives plus neg_ratio x as many hard negatives, shuffled.

    Not train.epoch_samples: that takes one bank and mixes in easy negatives.
    """
    picked = pos + rng.sample(neg, min(len(neg), int(round(neg_ratio * len(pos)))))
    rng.shuffle(picked)
    return picked


def _batch(banks: list, chunk: list):
    """Images and masks of (bank index, sample) pairs from several banks (train._batch_tensors
    takes a single bank)."""
    import torch

    images = torch.from_numpy(np.stack([banks[b].images[s.image] for b, s in chunk]))[:, None]
    masks = torch.zeros_like(images)
    for i, (b, s) in enumerate(chunk):
        if s.positive:
            masks[i, 0] = torch.from_numpy(banks[b].masks[s.mask].astype(np.float32))
    return images, masks


def _seed_everything(seed: int, threads: int) -> None:
    """Seed Python, numpy and torch; ``threads`` torch threads; deterministic algorithms."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_run(spec: RunSpec, cache: Path = CACHE, log_every: int = 10, device: str = "cpu"):
    """Train one model for ``spec.steps`` steps; returns (model, loss curve, seconds)."""
    import torch

    from promptseg.losses import build_loss
    from promptseg.model.unet import PromptSegModel, preset_config
    from promptseg.prompts import PromptVocabulary
    from promptseg.train import augment

    _seed_everything(spec.seed, threads=1)
    table, index = _embedding_table(cache)
    banks = [_load(_bank_path(cache, d, "train", spec)) for d in spec.train_datasets]
    vocab = PromptVocabulary()
    config = preset_config(
        "small",
        widths=list(spec.widths),
        resolution=spec.resolution,
        fusion=spec.fusion,
        se=spec.se,
        cbam=spec.cbam,
    )
    model = PromptSegModel(config, table.shape[1]).to(device)
    loss_fn = build_loss(spec.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.steps)
    rng = random.Random(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    pos, neg = _candidates(banks, set(spec.targets))
    queue: list = []
    curve, window = [], []
    started = time.time()
    model.train()
    for step in range(1, spec.steps + 1):
        if len(queue) < spec.batch:
            queue += _train_samples(pos, neg, spec.neg_ratio, rng)
        chunk, queue = queue[: spec.batch], queue[spec.batch :]
        images, masks = _batch(banks, chunk)
        datasets = [s.dataset for _, s in chunk]
        images, masks = augment(images, masks, datasets, gen)
        film_in = table[[index[vocab.sample(s.target, rng)] for _, s in chunk]]
        loss = loss_fn(model(images.to(device), film_in.to(device))[0], masks.to(device))
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"run {spec.key()}: loss became {value} at {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(value)
        if step % log_every == 0 or step == spec.steps:
            curve.append([step, float(np.mean(window))])
            window = []
    return model, curve, time.time() - started


def evaluate_run(model, spec: RunSpec, cache: Path = CACHE, device: str = "cpu") -> dict:
    """Validation metrics at model resolution: per dataset, per target and macro means."""
    import torch

    from promptseg.metrics import segmentation_metrics
    from promptseg.prompts import PromptVocabulary

    table, index = _embedding_table(cache)
    vocab = PromptVocabulary()
    model.eval()
    per_dataset: dict[str, dict] = {}
    pooled: dict[str, dict[str, list[float]]] = {}
    empty: list[bool] = []
    for dataset in spec.test_datasets:
        bank = _load(_bank_path(cache, dataset, "val", spec))
        samples = [s for s in bank.samples if s.target in spec.targets and s.hard]
        rows: dict[str, dict[str, list[float]]] = {}
        with torch.no_grad():
            for i in range(0, len(samples), 64):
                chunk = samples[i : i + 64]
                images = torch.from_numpy(bank.images[[s.image for s in chunk]])[:, None]
                e = table[[index[vocab.canonical(s.target)] for s in chunk]]
                pred = (model(images.to(device), e.to(device))[0][:, 0] > 0).cpu().numpy()
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


def result_path(cache: Path, spec: RunSpec) -> Path:
    return cache / "runs" / f"{spec.key()}.json"


def run_one(spec: RunSpec, cache: Path = CACHE, git: str = "unknown", device: str = "cpu") -> Path:
    """Train + evaluate ``spec`` unless a result made under the same conditions exists (same
    key and fingerprint; see :func:`stale_reasons`); returns the result path."""
    import torch

    out = result_path(cache, spec)
    current = fingerprint(spec, device, _identity(_load(cache / "embeddings.pkl")["encoder"]))
    if _reusable(out, current):
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
        fingerprint=current,
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
    """Run every spec not yet done under the same conditions (``workers`` processes, one thread
    each; ``device``: a torch device such as "cuda" for the paper preset on a GPU, recorded in
    each result). A result whose recorded device, splits, preprocessing or text encoder differ
    from now is trained again (and replaced)."""
    from tqdm import tqdm

    encoder = prepare_inputs(specs, cache, progress)
    git = git_hash()
    unique = list({s.key(): s for s in specs}.values())
    todo, stale = _plan(unique, cache, device, encoder)
    print(f"{len(unique)} runs, {len(unique) - len(todo)} already done, {len(todo)} to run")
    for reason, n in sorted(stale.items()):
        print(f"re-running {n} finished runs recorded under other conditions: {reason}")
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


def _plan(
    specs: list[RunSpec], cache: Path, device: str, encoder: dict
) -> tuple[list[RunSpec], dict[str, int]]:
    """Specs to train (missing or stale) and a count of stale results per reason."""
    todo, stale = [], {}
    for s in specs:
        path = result_path(cache, s)
        if not path.is_file():
            todo.append(s)
            continue
        reasons = stale_reasons(json.loads(path.read_text()), fingerprint(s, device, encoder))
        if reasons:
            todo.append(s)
            key = "; ".join(reasons)
            stale[key] = stale.get(key, 0) + 1
    return todo, stale
