"""The one case loop: dataset cases through the runtime's slice path (numpy only).

``promptseg evaluate``, ``grids``, ``robustness``, the parity table and the INT8 proxy check
iterate cases with :func:`iter_cases` and segment each with :func:`segment_case`, which runs
:func:`promptseg.runtime.slices.segment_slices` (the path of ``promptseg-run``) on the case's
slices and, with ``postprocess="largest"``, keeps the largest 3D component of each organ mask
in volumes as the runtime does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.data.datasets import Case, load_cases
from promptseg.postprocess import applies, largest_component
from promptseg.preprocess import Preprocessing
from promptseg.runtime.slices import SliceMasks, segment_slices


def iter_cases(
    kind: str,
    folder: str | Path,
    split: str | None,
    *,
    max_cases: int = 0,
    progress: bool = False,
    desc: str | None = None,
) -> Iterator[Case]:
    """The cases of one dataset split, the first ``max_cases`` only (0: all), with an optional
    tqdm bar (``desc``, default the dataset kind)."""
    cases = load_cases(kind, Path(folder), split)
    if progress:
        from tqdm import tqdm

        cases = tqdm(cases, desc=desc or kind)
    for n, case in enumerate(cases):
        if max_cases and n >= max_cases:
            break
        yield case


def segment_case(
    engine: Any,
    case: Case,
    films: Sequence[np.ndarray],
    targets: Sequence[str],
    preprocessing: Preprocessing,
    *,
    batch: int = 16,
    threshold: float = 0.5,
    postprocess: str = "none",
    presence_thresholds: Sequence[float | None] | None = None,
    probabilities: bool = False,
    resolution: int | None = None,
) -> SliceMasks:
    """Masks (K, Z, H, W) of one case for K prompts (their FiLM vectors and targets).

    Args:
        engine: Any runtime engine (a :class:`~promptseg.runtime.torch_engine.TorchEngine`
            for a checkpoint).
        case: The case; its ``modality`` picks the normalisation rule.
        films: Per prompt its (P,) FiLM vector.
        targets: Per prompt its target (for the post-processing rule).
        preprocessing: The model's normalisation settings.
        batch, threshold, presence_thresholds, probabilities, resolution: As
            :func:`promptseg.runtime.slices.segment_slices`.
        postprocess: "none", or "largest": keep the largest 3D component of each single-organ
            mask in a volume (:func:`promptseg.postprocess.applies`).
    """
    out = segment_slices(
        engine,
        case.image,
        films,
        preprocessing,
        case.modality,
        batch=batch,
        threshold=threshold,
        presence_thresholds=presence_thresholds,
        probabilities=probabilities,
        resolution=resolution,
    )
    for k, target in enumerate(targets):
        if applies(target, postprocess, case.is_volume):
            out.masks[k] = largest_component(out.masks[k])
    return out
