"""``promptseg grids``: qualitative overlay grids chosen by rule, one PNG per dataset.

For every target of a dataset's split (validation by default) each case is segmented with the
target's canonical prompt and scored by Dice with the same case rule as ``promptseg evaluate``
(a CHAOS or LiTS volume is one case, scored in 3D; a brain tumour or BTCV slice is one case).
Per target the best, median and worst case are drawn (input | prediction | truth | overlay,
prediction red, truth green, both yellow) on the slice with the largest truth area, with
:func:`promptseg.evaluate.overlay_grid`; the rule is written in the figure title.

Only present targets are prompted (absent-target behaviour is ``promptseg evaluate``'s job), so
this is much cheaper than a full evaluation. BTCV and LiTS grids show licensed image pixels:
they may be drawn locally but must not be committed (``.gitignore`` covers
``results/**/grid_btcv-ct*.png`` and ``results/**/grid_lits-ct*.png``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from promptseg.checkpoint import load_checkpoint
from promptseg.data.datasets import DATASET_FOLDERS, KINDS, load_cases
from promptseg.evaluate import Predictor, overlay_grid
from promptseg.preprocess import normalize


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool arrays (1.0 when both are empty)."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def case_samples(
    checkpoint: str | Path,
    data: Path,
    dataset: str,
    *,
    split: str | None = "val",
    max_cases: int = 0,
    batch: int = 16,
    threshold: float = 0.5,
) -> list[dict]:
    """One sample per (case, present target): Dice and the slice with the largest truth area.

    Returns:
        Dicts with ``row`` (case, target, prompt, dice), ``image`` (H, W) in [0, 1], ``pred``
        and ``truth`` (H, W) bool: the input of :func:`promptseg.evaluate.overlay_grid`.
    """
    loaded = load_checkpoint(checkpoint)
    predictor = Predictor(loaded, batch)
    samples: list[dict] = []
    for n, case in enumerate(load_cases(dataset, Path(data), split)):
        if max_cases and n >= max_cases:
            break
        targets = [t for t, m in case.masks.items() if t in loaded.vocabulary.targets and m.any()]
        if not targets:
            continue
        prompts = [loaded.vocabulary.canonical(t) for t in targets]
        slices = normalize(case.image, case.modality, loaded.preprocessing)
        probs = predictor.predict(slices, prompts)
        for target, prompt, prob in zip(targets, prompts, probs):
            pred, truth = prob > threshold, case.masks[target]
            z = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(1)))
            row = {"case": case.case_id, "target": target, "prompt": prompt}
            row["dice"] = dice(pred, truth)
            samples.append({"row": row, "image": slices[z], "pred": pred[z], "truth": truth[z]})
    return samples


def grid_title(checkpoint: str | Path, dataset: str, split: str | None, samples: list[dict]) -> str:
    """The figure title: model, data, and the picking rule."""
    n = {s["row"]["target"]: 0 for s in samples}
    for s in samples:
        n[s["row"]["target"]] += 1
    unit = "3D Dice per volume" if dataset in ("chaos-mr", "lits-ct") else "2D Dice per slice"
    counts = ", ".join(f"{t} {c}" for t, c in n.items())
    return (
        f"{Path(str(checkpoint)).name} on {dataset}, {split or 'all'} split\n"
        f"rule: per target the best, median and worst case by {unit} "
        "(slice with the largest truth area shown)\n"
        f"cases per target: {counts}"
    )


def write_grids(
    checkpoint: str | Path,
    data_root: Path,
    out: Path,
    *,
    datasets: Sequence[str] = KINDS,
    split: str | None = "val",
    max_cases: int = 0,
    batch: int = 16,
    threads: int = 1,
    threshold: float = 0.5,
    log=print,
) -> dict[str, Path]:
    """Write ``out/grid_<dataset>.png`` for each dataset; returns {dataset: path}.

    Raises:
        FileNotFoundError: A dataset folder under ``data_root`` is missing.
        ValueError: An unknown dataset or split.
    """
    torch.set_num_threads(threads)
    out = Path(out)
    for kind in datasets:
        if kind not in KINDS:
            raise ValueError(f"unknown dataset {kind!r}; expected one of {list(KINDS)}")
        folder = Path(data_root) / DATASET_FOLDERS[kind]
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: dataset folder not found")
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for kind in datasets:
        folder = Path(data_root) / DATASET_FOLDERS[kind]
        samples = case_samples(
            checkpoint,
            folder,
            kind,
            split=split,
            max_cases=max_cases,
            batch=batch,
            threshold=threshold,
        )
        if not samples:
            log(f"{kind}: no case with a present target; no grid written")
            continue
        path = overlay_grid(
            samples, out / f"grid_{kind}.png", title=grid_title(checkpoint, kind, split, samples)
        )
        written[kind] = path
        log(f"wrote {path} ({len(samples)} case/target pairs)")
    return written
