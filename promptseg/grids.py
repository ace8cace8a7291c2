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

import torch

from promptseg.cases import iter_cases
from promptseg.checkpoint import LoadedCheckpoint, load_checkpoint
from promptseg.data.datasets import KINDS, load_cases
from promptseg.evaluate import (
    Predictor,
    case_metrics,
    dataset_folders,
    grid_sample,
    overlay_grid,
    require_int,
)
from promptseg.preprocess import normalize


def case_samples(
    checkpoint: str | Path | LoadedCheckpoint,
    data: Path,
    dataset: str,
    *,
    split: str | None = "val",
    max_cases: int = 0,
    batch: int = 16,
    threshold: float = 0.5,
) -> list[dict]:
    """One sample per (case, present target): Dice and the slice with the largest truth area.

    ``checkpoint`` is a path, ``"default"`` or an already loaded checkpoint. Dice and the shown
    slice come from :func:`promptseg.evaluate.case_metrics` and
    :func:`promptseg.evaluate.grid_sample`, as in ``promptseg evaluate``.

    Returns:
        Dicts with ``row`` (case, target, prompt, dice), ``image`` (H, W) in [0, 1], ``pred``
        and ``truth`` (H, W) bool: the input of :func:`promptseg.evaluate.overlay_grid`.
    """
    require_int(max_cases, "--max-cases", 0)
    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    predictor = Predictor(loaded, batch)
    samples: list[dict] = []
    for case in iter_cases(dataset, data, split, max_cases=max_cases):
        targets = [t for t, m in case.masks.items() if t in loaded.vocabulary.targets and m.any()]
        if not targets:
            continue
        prompts = [loaded.vocabulary.canonical(t) for t in targets]
        masks = predictor.segment(case, prompts, targets, threshold=threshold).masks
        slices = normalize(case.image, case.modality, loaded.preprocessing)  # shown in the grid
        for target, prompt, pred in zip(targets, prompts, masks):
            truth = case.masks[target]
            row = {"case": case.case_id, "target": target, "prompt": prompt}
            row["dice"] = float(case_metrics(case, pred, truth)["dice"])
            samples.append(grid_sample(row, slices, pred, truth))
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

    Every input (numbers, dataset folders, the checkpoint) is checked before ``out`` is
    created; the checkpoint is loaded once for all datasets.

    Raises:
        FileNotFoundError: A dataset folder under ``data_root`` or the checkpoint is missing.
        ValueError: An unknown dataset or split, ``threads`` < 1, ``max_cases`` < 0, or an
            unreadable checkpoint.
    """
    require_int(threads, "--threads", 1)
    require_int(max_cases, "--max-cases", 0)
    require_int(batch, "batch", 1)
    folders = dataset_folders(data_root, datasets)
    for kind, folder in folders.items():
        load_cases(kind, folder, split)  # checks the split (lazy: reads no case)
    loaded = load_checkpoint(checkpoint)
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for kind, folder in folders.items():
        samples = case_samples(
            loaded,
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
