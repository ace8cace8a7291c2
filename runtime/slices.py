"""The one path from slices to masks: preprocess, batch, infer, threshold, presence gate.

Everything that turns slices into masks uses this module: ``promptseg-run`` and
:class:`~promptseg.runtime.segmenter.Segmenter` (through :func:`promptseg.runtime.pipeline.segment`),
``promptseg evaluate``, ``grids`` and ``robustness``, the parity table, the INT8 proxy check,
the latency bench and the export self-verification. PyTorch is one more engine
(:class:`~promptseg.runtime.torch_engine.TorchEngine`), so every number measures what the
runtime delivers.

Steps of :func:`segment_slices` on (Z, H, W) slices in the training orientation:

1. Intensity bounds once over all slices (:func:`promptseg.preprocess.intensity_bounds`), then
   per batch the training arithmetic (:func:`promptseg.preprocess.normalize`) and a bilinear
   resize to the engine's R x R.
2. One engine call per batch and prompt, the prompt's FiLM vector repeated per slice.
3. Logits resized back to H x W (bilinear); a pixel is on where ``logit >= logit_cutoff(t)``,
   which equals ``sigmoid(logit) > t`` bit for bit (:func:`logit_cutoff`).
4. Presence gate: when the engine has a ``presence`` output (N, 1) and the prompt has a
   threshold tau, a slice whose ``sigmoid(presence) < tau`` gets an empty mask. Per prompt
   the highest presence probability and the number of gated slices are reported.

numpy only (no torch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from promptseg.preprocess import (
    Preprocessing,
    intensity_bounds,
    normalize,
    resize_bilinear,
    sigmoid,
)
from promptseg.runtime.engine_base import MASK_OUTPUT, PRESENCE_OUTPUT

# sink(start, k, logits (n, H, W) float32, on (n, H, W) bool): prompt k's batch from slice start
Sink = Callable[[int, int, np.ndarray, np.ndarray], None]


def logit_cutoff(threshold: float) -> np.float32:
    """The smallest float32 logit whose float32 sigmoid exceeds ``threshold``.

    ``logits >= logit_cutoff(t)`` equals ``sigmoid(logits) > t`` element for element (the
    cutoff is found by bisection with :func:`promptseg.preprocess.sigmoid` itself, which is
    monotonic) without evaluating the sigmoid per voxel. NaN when no logit qualifies (a
    threshold that rounds to 1.0 in float32), so that every comparison is False.
    """

    def above(x: np.float32) -> bool:  # array vs scalar: float32 on numpy 1.x and 2.x alike
        return bool((sigmoid(np.array([x], dtype=np.float32)) > threshold)[0])

    lo, hi = np.float32(-200.0), np.float32(200.0)  # sigmoid: exactly 0 and exactly 1
    if above(lo):
        return np.float32(-np.inf)
    if not above(hi):
        return np.float32(np.nan)
    while True:
        mid = np.float32((float(lo) + float(hi)) / 2.0)
        if mid == lo or mid == hi:  # adjacent float32 values
            return hi
        if above(mid):
            hi = mid
        else:
            lo = mid


def model_resolution(engine: Any) -> int:
    """R of the engine's ``image`` input (N, C, R, R)."""
    spec = {s.name: s for s in engine.inputs}
    return int(spec["image"].shape[-1])


def _film_rows(film: np.ndarray, rows: int) -> np.ndarray:
    """A (P,) FiLM vector as a contiguous float32 (rows, P) block."""
    film = np.asarray(film, dtype=np.float32).reshape(-1)
    return np.repeat(film[None], rows, axis=0)  # a writable copy (torch warns on read-only)


def engine_batches(
    engine: Any,
    n: int,
    images: Callable[[int, int], np.ndarray],
    films: Sequence[np.ndarray],
    batch: int,
    seconds: dict[str, float] | None = None,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
    """The slice loop: batches of ``n`` model inputs through the engine, every prompt per batch.

    Args:
        engine: Anything with ``infer({"image", "film"}) -> {"logits", ["presence"]}``.
        n: Number of slices.
        images: ``images(start, stop)`` gives the model inputs (m, C, R, R) of those slices.
        films: Per prompt its (P,) FiLM vector.
        batch: Slices per engine call.
        seconds: Accumulates "preprocess" (``images``) and "infer" (engine) times, and per
            prompt ``"infer:<k>"``.

    Yields:
        (start, k, logits (m, R, R) float32, presence logits (m,) float32 or None) per batch
        and prompt k (0-based), batch by batch.
    """
    clock = seconds if seconds is not None else {}
    rows = min(batch, n)
    blocks = [_film_rows(f, rows) for f in films]
    for start in range(0, n, batch):
        t = time.perf_counter()
        chunk = images(start, min(start + batch, n))
        m = chunk.shape[0]
        clock["preprocess"] = clock.get("preprocess", 0.0) + time.perf_counter() - t
        for k, block in enumerate(blocks):
            t = time.perf_counter()
            out = engine.infer({"image": chunk, "film": block[:m]})
            dt = time.perf_counter() - t
            clock["infer"] = clock.get("infer", 0.0) + dt
            clock[f"infer:{k}"] = clock.get(f"infer:{k}", 0.0) + dt
            presence = out.get(PRESENCE_OUTPUT)
            yield (
                start,
                k,
                out[MASK_OUTPUT][:, 0],
                None if presence is None else np.asarray(presence, np.float32).reshape(-1),
            )


def model_outputs(
    engine: Any, images: np.ndarray, film: np.ndarray, batch: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw outputs of model inputs (N, C, R, R) for one prompt: logits (N, 1, R, R) and
    presence logits (N, 1) or None, through :func:`engine_batches` (last batch may be smaller).
    """
    n = images.shape[0]
    logits, presence = [], []
    for _, _, lg, pr in engine_batches(
        engine, n, lambda a, b: np.ascontiguousarray(images[a:b]), [film], batch
    ):
        logits.append(lg[:, None])
        if pr is not None:
            presence.append(pr[:, None])
    return np.concatenate(logits), (np.concatenate(presence) if presence else None)


@dataclass
class Presence:
    """What the presence gate did for one prompt.

    Attributes:
        present: The prompt's mask has at least one pixel after the gate.
        max_probability: Highest sigmoid(presence) over the slices (None: no presence output).
        slices_gated: Slices whose mask the gate emptied (0 with the gate off).
        threshold: The tau applied (None: gate off or no presence output).
        slice_probability: (Z,) sigmoid(presence) per slice (None: no presence output).
    """

    present: bool = False
    max_probability: float | None = None
    slices_gated: int = 0
    threshold: float | None = None
    slice_probability: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "present": self.present,
            "presence_max_probability": self.max_probability,
            "slices_gated": self.slices_gated,
            "presence_threshold": self.threshold,
        }


@dataclass
class SliceMasks:
    """Output of :func:`segment_slices`.

    Attributes:
        masks: bool (K, Z, H, W) per prompt, or None when a sink received them.
        probabilities: float32 (K, Z, H, W) sigmoid of the resized logits (zero on gated
            slices), when asked for.
        presence: Per prompt, what the presence gate did.
        voxels_on: Per prompt, (Z,) pixels on per slice.
        seconds: preprocess, infer, postprocess (resize and threshold), and per prompt infer.
        modality: The normalisation rule used.
        constant: The slices were all one value (nothing was inferred; masks are empty).
        warnings: Non-fatal problems (constant input, empty intensity window).
    """

    masks: np.ndarray | None
    probabilities: np.ndarray | None
    presence: list[Presence]
    voxels_on: list[np.ndarray]
    seconds: dict[str, float]
    modality: str
    constant: bool = False
    warnings: list[str] = field(default_factory=list)


def _window(
    slices: np.ndarray, modality: str, pre: Preprocessing
) -> tuple[Preprocessing, bool, list[str]]:
    """Preprocessing whose ``ct_window`` holds the bounds of all slices; constant; warnings."""
    lo, hi = intensity_bounds(slices, modality, pre)
    constant = bool(slices.size == 0 or slices.min() == slices.max())
    warn = []
    if constant:
        value = float(slices.flat[0]) if slices.size else 0.0
        warn.append(
            f"all {slices.size} voxels have the value {value:g}; nothing to segment, "
            "the mask is empty"
        )
    elif hi <= lo:
        warn.append(
            f"the {modality} intensity window is empty ({lo:g} to {hi:g}); the model sees a "
            "blank image"
        )
    return replace(pre, ct_window=(float(lo), float(hi))), constant, warn


def _taus(thresholds: Sequence[float | None] | float | None, k: int) -> list[float | None]:
    if thresholds is None or isinstance(thresholds, int | float):
        return [thresholds] * k  # type: ignore[list-item]
    taus = list(thresholds)
    if len(taus) != k:
        raise ValueError(f"{len(taus)} presence thresholds for {k} prompts")
    return taus


def segment_slices(
    engine: Any,
    slices: np.ndarray,
    films: Sequence[np.ndarray],
    preprocessing: Preprocessing,
    modality: str,
    *,
    batch: int = 16,
    threshold: float = 0.5,
    presence_thresholds: Sequence[float | None] | float | None = None,
    sink: Sink | None = None,
    probabilities: bool = False,
    progress: Callable[[int], None] | None = None,
    resolution: int | None = None,
) -> SliceMasks:
    """Masks of (Z, H, W) slices for K prompts through one engine (see the module docstring).

    Options are checked by the caller (``batch >= 1``, ``0 < threshold < 1``, modality one of
    "ct", "mr", "uint8"); the engine's resolution is taken from its ``image`` input.

    Args:
        engine: Any engine of :mod:`promptseg.runtime.engines` (or an object with ``infer``
            and ``resolution`` given).
        slices: (Z, H, W) raw intensities in the training orientation.
        films: Per prompt its (P,) FiLM vector.
        preprocessing: The model's normalisation settings.
        modality: "ct", "mr" or "uint8".
        batch: Slices per engine call.
        threshold: Probability above which a pixel is on.
        presence_thresholds: Per prompt tau (or one for all; None: gate off). Used only when
            the engine returns ``presence``.
        sink: Receives each batch (start, k, logits (n, H, W), on (n, H, W)) instead of the
            (K, Z, H, W) masks being collected.
        probabilities: Also collect sigmoid probabilities (K, Z, H, W).
        progress: Called with the number of slices finished after every batch.
        resolution: Model input size R (default: from the engine's ``image`` input).

    Returns:
        The :class:`SliceMasks`.
    """
    n, height, width = slices.shape
    k_prompts = len(films)
    res = resolution or model_resolution(engine)
    taus = _taus(presence_thresholds, k_prompts)
    window, constant, warn = _window(slices, modality, preprocessing)
    cutoff = logit_cutoff(threshold)
    seconds: dict[str, float] = {"preprocess": 0.0, "infer": 0.0, "postprocess": 0.0}
    masks = None if sink is not None else np.zeros((k_prompts, n, height, width), dtype=bool)
    probs = np.zeros((k_prompts, n, height, width), np.float32) if probabilities else None
    presence = [Presence() for _ in range(k_prompts)]
    voxels = [np.zeros(n, dtype=np.int64) for _ in range(k_prompts)]

    def images(a: int, b: int) -> np.ndarray:
        chunk = normalize(slices[a:b], "ct", window)  # same arithmetic as training
        return resize_bilinear(chunk, (res, res))[:, None]  # (m, 1, R, R)

    done = -1
    if not constant:
        for start, k, logits, pres in engine_batches(engine, n, images, films, batch, seconds):
            t = time.perf_counter()
            m = logits.shape[0]
            full = resize_bilinear(logits, (height, width))
            on = full >= cutoff
            gate, gated = presence[k], None
            if pres is not None:
                prob = sigmoid(pres)
                if gate.slice_probability is None:
                    gate.slice_probability = np.full(n, np.nan, np.float32)
                gate.slice_probability[start : start + m] = prob.reshape(m)
                gate.max_probability = max(gate.max_probability or 0.0, float(prob.max()))
                if taus[k] is not None:
                    gate.threshold = float(taus[k])
                    gated = prob < taus[k]
                    on[gated] = False
                    gate.slices_gated += int(gated.sum())
            voxels[k][start : start + m] = on.reshape(m, -1).sum(1)
            if sink is not None:
                sink(start, k, full, on)
            else:
                masks[k, start : start + m] = on
            if probs is not None:
                probs[k, start : start + m] = sigmoid(full)
                if gated is not None:
                    probs[k, start : start + m][gated] = 0.0
            seconds["postprocess"] += time.perf_counter() - t
            if progress is not None and k == k_prompts - 1 and start != done:
                done = start
                progress(m)
    elif progress is not None:
        progress(n)
    for gate, count in zip(presence, voxels):
        gate.present = bool(count.any())
    return SliceMasks(masks, probs, presence, voxels, seconds, modality, constant, warn)
