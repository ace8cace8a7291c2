"""Segment one volume or 2-D image with one engine: the runtime's core loop (numpy only).

Steps (docs/engine_format.md, "Using it"):

1. Volumes are brought to the manifest's axis codes (:mod:`promptseg.runtime.orientation`);
   2-D images are used as they are (assumed to be in the training convention already).
2. Intensities are normalised with the training arithmetic (:func:`promptseg.preprocess.normalize`)
   using bounds computed once over the whole volume, then each slice is resized to R x R.
3. Slices go through the engine in batches, the prompt's FiLM vector repeated per slice.
4. Logits are resized to the input grid (bilinear); a voxel is on for a prompt where the sigmoid
   of its logit exceeds the threshold. Sigmoid is monotonic, so this is computed as
   ``logit >= logit_cutoff(threshold)`` (:func:`logit_cutoff`, same result bit for bit) and the
   sigmoid is only evaluated where several prompts are on.
5. With several prompts, each voxel takes the label (1..K) of the most probable prompt whose
   mask is on there; equal probabilities go to the lower label (:class:`LabelVotes`).
6. Post-processing (``postprocess="largest"``, the default): in a volume, each single-organ
   target (liver, spleen, either kidney) keeps only the largest 3D connected component of its
   label (:mod:`promptseg.postprocess`, as ``promptseg evaluate`` does); tumour masks are
   never reduced. Settling overlaps first means a neighbour's voxels never cut an organ into
   pieces that this step would then drop.
7. The label map goes back to the input orientation.

Modality ``auto``: a DICOM series uses its Modality tag (CT or MR). Otherwise a volume is CT
when its minimum is below -500 and its values look like Hounsfield units (minimum >= -3100,
the lowest scanner padding value, and maximum <= 32767); anything else is MR (percentile
window). 8-bit 2-D images use the ``uint8`` rule (divide by 255); other 2-D images use the MR
percentile rule unless ``--modality ct`` says they hold HU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from promptseg.data.readers import InputError, Volume
from promptseg.postprocess import POSTPROCESS_MODES, applies, largest_component
from promptseg.preprocess import (
    Preprocessing,
    intensity_bounds,
    normalize,
    resize_bilinear,
    sigmoid,
)
from promptseg.runtime.engines import Engine
from promptseg.runtime.io import Image2D
from promptseg.runtime.orientation import Reorientation, volume_reorientation
from promptseg.runtime.prompt_resolver import PromptResolver, ResolvedPrompt

MODALITY_CHOICES = ("auto", "ct", "mr")
CT_MIN_BELOW = -500.0
CT_MIN_FLOOR = -3100.0
CT_MAX_CEIL = 32767.0


@dataclass
class SegmentationResult:
    """Output of :func:`segment`.

    Attributes:
        labels: uint8 label map on the input grid: (X, Y, Z) for volumes, (H, W) for images;
            0 background, k for the k-th prompt.
        prompts: The resolved prompts, in label order.
        stats: Per prompt: label, voxels, volume_ml (None for 2-D), slices_with_target.
        modality: Normalisation rule used ("ct", "mr" or "uint8").
        seconds: Stage timings: preprocess, infer, postprocess.
        warnings: Non-fatal problems (e.g. an all-constant volume).
        reorientation: The orientation transform (None for 2-D images).
    """

    labels: np.ndarray
    prompts: list[ResolvedPrompt]
    stats: list[dict[str, Any]]
    modality: str
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    reorientation: Reorientation | None = None


def choose_modality(image: Volume | Image2D, requested: str = "auto") -> str:
    """The normalisation rule for an input (see the module docstring)."""
    if requested not in MODALITY_CHOICES:
        raise InputError(
            "--modality", f"unknown modality {requested!r}; valid: {', '.join(MODALITY_CHOICES)}"
        )
    if isinstance(image, Image2D):
        if requested != "auto":
            return requested
        return "uint8" if int(image.info.get("bit_depth", 8)) == 8 else "mr"
    if requested != "auto":
        return requested
    tag = str(image.meta.get("modality", "")).upper()
    if image.kind == "dicom" and tag in ("CT", "MR"):
        return tag.lower()
    vmin, vmax = float(image.data.min()), float(image.data.max())
    if CT_MIN_FLOOR <= vmin < CT_MIN_BELOW and vmax <= CT_MAX_CEIL:
        return "ct"
    return "mr"


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in millilitres (|det| of the affine's 3x3 part, mm^3 / 1000)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def _resolve(
    prompts: Sequence[str | ResolvedPrompt], resolver: PromptResolver | None
) -> list[ResolvedPrompt]:
    out: list[ResolvedPrompt] = []
    for p in prompts:
        if isinstance(p, ResolvedPrompt):
            out.append(p)
        elif resolver is None:
            raise ValueError("string prompts need a PromptResolver; got resolver=None")
        else:
            out.extend(resolver.expand(p))
    if not out:
        raise InputError("--prompt", "no prompt given; expected at least one --prompt TEXT")
    if len(out) > 255:
        raise InputError("--prompt", f"{len(out)} prompts; a uint8 label map holds at most 255")
    return out


def _engine_where(engine: Engine) -> str:
    """The engine folder (or the engine's source file) for error messages."""
    if engine.folder is not None:
        return str(engine.folder.path)
    return engine.source or "--engine"


def check_engine(engine: Engine, pre: Preprocessing, film_dim: int) -> int:
    """Model resolution R from the engine's image input, checked against the preprocessing.

    Raises:
        InputError: The engine's inputs disagree with the manifest's preprocessing or with the
            prompts' FiLM vectors (names the engine folder).
    """
    spec = {s.name: s for s in engine.inputs}
    res = spec["image"].shape[-1]
    if not isinstance(res, int) or res != pre.resolution:
        raise InputError(
            _engine_where(engine),
            f"engine image input {spec['image'].describe()} does not match the preprocessing "
            f"resolution {pre.resolution}; the engine folder is inconsistent",
        )
    p = spec["film"].shape[-1]
    if isinstance(p, int) and p != film_dim:
        raise InputError(
            _engine_where(engine),
            f"prompt FiLM vectors have {film_dim} values; the engine expects {p}",
        )
    return res


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


class LabelVotes:
    """The prompts' thresholded masks on a (Z, H, W) grid, merged into a label map.

    Prompts are added batch by batch, in label order. ``first`` holds the lowest label whose
    mask is on at each voxel; where several masks are on, every such prompt's logit is kept
    (a sparse list), so :meth:`labels` can post-process each prompt's own mask before the
    prompts compete for a voxel. Memory: the uint8 map, those few overlap entries and one
    batch of float32 logits.

    Args:
        shape: (Z, H, W) of the label map.
        threshold: Probability above which a voxel is on for a prompt.
    """

    def __init__(self, shape: tuple[int, int, int], threshold: float) -> None:
        self.cutoff = logit_cutoff(threshold)
        self.first = np.zeros(shape, dtype=np.uint8)
        self._plane = int(shape[1]) * int(shape[2])
        self._start = -1
        self._label_now = 0
        self._first_logit = np.empty(0, dtype=np.float32)
        self._shared = np.empty(0, dtype=bool)
        self._index: list[np.ndarray] = []
        self._label: list[np.ndarray] = []
        self._logit: list[np.ndarray] = []

    def add(self, start: int, label: int, logits: np.ndarray) -> None:
        """Record prompt ``label``'s logits (n, H, W) on the input grid for slices from ``start``.

        Raises:
            ValueError: Not called batch by batch with labels 1, 2, ... in order.
        """
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if start != self._start:  # a new batch: its voxels are still unclaimed
            self._start, self._label_now = start, 0
            self._first_logit = np.empty(logits.shape, dtype=np.float32)
            self._shared = np.zeros(logits.shape, dtype=bool)
        if label != self._label_now + 1:
            raise ValueError(f"expected label {self._label_now + 1} for slice {start}, got {label}")
        self._label_now = label
        first = self.first[start : start + logits.shape[0]]
        on = logits >= self.cutoff
        taken = first != 0
        both = on & taken
        if both.any():
            offset = start * self._plane
            lone = np.flatnonzero(both & ~self._shared)  # first prompt not yet listed there
            self._keep(lone + offset, first.ravel()[lone], self._first_logit.ravel()[lone])
            shared = np.flatnonzero(both)
            self._keep(
                shared + offset, np.full(shared.size, label, np.uint8), logits.ravel()[shared]
            )
            self._shared |= both
        alone = on & ~taken
        first[alone] = label
        self._first_logit[alone] = logits[alone]

    def _keep(self, index: np.ndarray, label: np.ndarray, logit: np.ndarray) -> None:
        self._index.append(index.astype(np.int64, copy=False))
        self._label.append(np.asarray(label, dtype=np.uint8))
        self._logit.append(np.asarray(logit, dtype=np.float32))

    def overlaps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat voxel index, label, logit) of every prompt on at a voxel where several are."""
        if not self._index:
            return np.empty(0, np.int64), np.empty(0, np.uint8), np.empty(0, np.float32)
        return (
            np.concatenate(self._index),
            np.concatenate(self._label),
            np.concatenate(self._logit),
        )

    def labels(self, reduce: Collection[int] = ()) -> np.ndarray:
        """The merged uint8 (Z, H, W) label map.

        Every voxel where several masks are on first takes the most probable prompt (the lower
        label on equal probabilities); then each label in ``reduce`` keeps only the largest 3D
        connected component of its share of the map (the rest becomes background), so no
        organ comes out in pieces because a neighbour won some of its voxels.
        """
        index, label, logit = self.overlaps()
        out = self.first.copy()
        if index.size:
            order = np.lexsort((label, -sigmoid(logit), index))  # by voxel, most probable first
            idx, lab = index[order], label[order]
            best = np.ones(idx.size, dtype=bool)
            best[1:] = idx[1:] != idx[:-1]
            out.ravel()[idx[best]] = lab[best]
        for k in reduce:
            mask = out == k
            out[mask & ~largest_component(mask)] = 0
        return out


def _volume_slices(
    image: Volume, axcodes: str
) -> tuple[np.ndarray, Reorientation, float, list[str]]:
    """A volume as contiguous (Z, H, W) slices in ``axcodes``, its transform, voxel ml, warnings."""
    reo, warning = volume_reorientation(image, axcodes)
    warn = [] if warning is None else [warning]
    if image.meta.get("voxel_size_missing"):
        warn.append("the file stores no voxel size; volume_ml assumes 1 mm voxels")
    return reo.slices(image.data), reo, voxel_volume_ml(image.affine), warn


def segment(
    image: Volume | Image2D,
    prompts: Sequence[str | ResolvedPrompt],
    engine: Engine,
    resolver: PromptResolver | None,
    preprocessing: Preprocessing,
    *,
    batch: int = 16,
    threshold: float = 0.5,
    modality: str = "auto",
    axcodes: str = "LAS",
    progress: Callable[[int], None] | None = None,
    postprocess: str = "largest",
) -> SegmentationResult:
    """Segment a volume or 2-D image for one or several prompts.

    Args:
        image: A :class:`~promptseg.data.readers.Volume` (X, Y, Z) or an :class:`Image2D` (H, W).
        prompts: Prompt strings (resolved with ``resolver``) or already resolved prompts.
        engine: Any engine of :mod:`promptseg.runtime.engines`.
        resolver: Resolves string prompts (may be None when all are resolved).
        preprocessing: The engine's normalisation settings.
        batch: Slices per engine call.
        threshold: Probability above which a pixel belongs to the target.
        modality: "auto", "ct" or "mr" (see the module docstring).
        axcodes: Training orientation of (rows, columns, slices).
        progress: Called with the number of slices finished after every batch.
        postprocess: "largest" keeps the largest 3D connected component of each single-organ
            target (liver, spleen, each kidney) in a volume, after the prompts have
            competed for voxels; "none" keeps every component.

    Returns:
        The :class:`SegmentationResult`; an all-constant input gives an empty mask and a warning.
    """
    if batch < 1:
        raise InputError("--batch", f"must be at least 1, got {batch}")
    if not 0.0 < threshold < 1.0:
        raise InputError("--threshold", f"must be between 0 and 1 (exclusive), got {threshold}")
    if postprocess not in POSTPROCESS_MODES:
        raise InputError(
            "--postprocess", f"unknown mode {postprocess!r}; valid: {', '.join(POSTPROCESS_MODES)}"
        )
    resolved = _resolve(prompts, resolver)
    res = check_engine(engine, preprocessing, int(resolved[0].film.shape[-1]))
    t0 = time.perf_counter()
    mod = choose_modality(image, modality)
    reo: Reorientation | None = None
    warn: list[str] = []
    voxel_ml: float | None = None
    if isinstance(image, Image2D):
        slices = image.data[None]  # (1, H, W)
    else:
        slices, reo, voxel_ml, warn = _volume_slices(image, axcodes)  # (Z, H, W), rows x columns
    n_slices, height, width = slices.shape
    lo, hi = intensity_bounds(slices, mod, preprocessing)
    window = replace(preprocessing, ct_window=(float(lo), float(hi)))
    constant = bool(slices.min() == slices.max())
    if constant:
        warn.append(
            f"all {slices.size} voxels have the value {float(slices.flat[0]):g}; nothing to segment, "
            "the mask is empty"
        )
    elif hi <= lo:
        warn.append(
            f"the {mod} intensity window is empty ({lo:g} to {hi:g}); the model sees a blank image"
        )
    seconds = {"preprocess": time.perf_counter() - t0, "infer": 0.0, "postprocess": 0.0}
    votes = LabelVotes((n_slices, height, width), threshold)
    per_prompt_infer = [0.0] * len(resolved)
    if not constant:
        rows = min(batch, n_slices)
        films = [  # each prompt's (batch, P) FiLM block, built once; batch n uses [:n]
            np.ascontiguousarray(
                np.broadcast_to(rp.film.astype(np.float32), (rows, rp.film.shape[-1]))
            )
            for rp in resolved
        ]
        for start in range(0, n_slices, batch):
            t = time.perf_counter()
            chunk = normalize(
                slices[start : start + batch], "ct", window
            )  # same arithmetic as training
            small = resize_bilinear(chunk, (res, res))[:, None]  # (n, 1, R, R)
            n = small.shape[0]
            seconds["preprocess"] += time.perf_counter() - t
            for k, film in enumerate(films, start=1):
                t = time.perf_counter()
                logits = engine.infer({"image": small, "film": film[:n]})["logits"]
                dt = time.perf_counter() - t
                seconds["infer"] += dt
                per_prompt_infer[k - 1] += dt
                t = time.perf_counter()
                votes.add(start, k, resize_bilinear(logits[:, 0], (height, width)))
                seconds["postprocess"] += time.perf_counter() - t
            if progress is not None:
                progress(n)
    elif progress is not None:
        progress(n_slices)
    t = time.perf_counter()
    is_volume = reo is not None and n_slices > 1
    reduce = [
        k
        for k, rp in enumerate(resolved, start=1)
        if not constant and applies(rp.target, postprocess, is_volume=is_volume)
    ]
    labels_zhw = votes.labels(reduce)
    counts = np.bincount(labels_zhw.ravel(), minlength=len(resolved) + 1)
    per_slice = [np.any(labels_zhw == k, axis=(1, 2)) for k in range(1, len(resolved) + 1)]
    if reo is None:
        labels = labels_zhw[0]
    else:
        labels = reo.undo(labels_zhw.transpose(1, 2, 0))
    seconds["postprocess"] += time.perf_counter() - t
    stats = []
    for k, rp in enumerate(resolved, start=1):
        voxels = int(counts[k])
        stats.append(
            {
                **rp.summary(),
                "label": k,
                "voxels": voxels,
                "volume_ml": None if voxel_ml is None else round(voxels * voxel_ml, 3),
                "slices_with_target": int(per_slice[k - 1].sum()),
                "seconds_infer": round(per_prompt_infer[k - 1], 4),
            }
        )
    return SegmentationResult(labels, resolved, stats, mod, seconds, warn, reo)
