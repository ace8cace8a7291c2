"""Segment one volume or 2-D image: orientation, label map and statistics (numpy only).

The slices go through the one slice path, :func:`promptseg.runtime.slices.segment_slices`.

Steps (docs/engine_format.md, "Using it"):

1. Volumes are brought to the manifest's axis codes (:mod:`promptseg.runtime.orientation`);
   2-D images are used as they are (assumed to be in the training convention already).
2. Intensities are normalised with the training arithmetic (:func:`promptseg.preprocess.normalize`)
   using bounds computed once over the whole volume, then each slice is resized to R x R.
3. Slices go through the engine in batches, the prompt's FiLM vector repeated per slice.
4. Logits are resized to the input grid (bilinear); a voxel is on for a prompt where the
   sigmoid of its logit exceeds the threshold and its slice passed the presence gate (engines
   with a ``presence`` output; tau per target from the manifest's ``presence_thresholds``).
   Sigmoid is monotonic, so this is computed as ``logit >= logit_cutoff(threshold)``
   (:func:`logit_cutoff`, same result bit for bit) and the sigmoid is only evaluated where
   several prompts are on.
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from promptseg.data.readers import Volume
from promptseg.postprocess import POSTPROCESS_MODES, applies, largest_component
from promptseg.preprocess import (
    Preprocessing,
    sigmoid,
)
from promptseg.runtime.engines import Engine
from promptseg.runtime.errors import InputError
from promptseg.runtime.io import Image2D
from promptseg.runtime.orientation import Reorientation, volume_reorientation
from promptseg.runtime.prompt_resolver import PromptResolver, ResolvedPrompt
from promptseg.runtime.slices import logit_cutoff, segment_slices  # noqa: F401 - logit_cutoff re-exported

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


def check_modality(requested: str) -> str:
    """``requested`` if it is a known modality rule, else a one-line InputError."""
    if requested not in MODALITY_CHOICES:
        raise InputError(
            "--modality", f"unknown modality {requested!r}; valid: {', '.join(MODALITY_CHOICES)}"
        )
    return requested


def choose_modality(image: Volume | Image2D, requested: str = "auto") -> str:
    """The normalisation rule for an input (see the module docstring)."""
    check_modality(requested)
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


def resolve_prompt_list(
    prompts: Sequence[str | ResolvedPrompt], resolver: PromptResolver | None
) -> list[ResolvedPrompt]:
    """Resolve string prompts (resolved ones pass through); 1 to 255 prompts in label order."""
    out: list[ResolvedPrompt] = []
    for p in prompts:
        if isinstance(p, ResolvedPrompt):
            out.append(p)
        elif resolver is None:
            raise ValueError("string prompts need a PromptResolver; got resolver=None")
        else:
            out.extend(resolver.expand(p))
    check_prompt_count(len(out))
    return out


def check_prompt_count(n: int) -> None:
    """A uint8 label map holds 1 to 255 prompts; else a one-line InputError."""
    if n < 1:
        raise InputError("--prompt", "no prompt given; expected at least one --prompt TEXT")
    if n > 255:
        raise InputError("--prompt", f"{n} prompts; a uint8 label map holds at most 255")


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

    def add(self, start: int, label: int, logits: np.ndarray, on: np.ndarray | None = None) -> None:
        """Record prompt ``label``'s logits (n, H, W) on the input grid for slices from ``start``.

        ``on`` is the prompt's mask there (default: ``logits >= cutoff``; the presence gate of
        :func:`promptseg.runtime.slices.segment_slices` may have emptied some slices).

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
        on = logits >= self.cutoff if on is None else on
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


@dataclass(frozen=True)
class Options:
    """Inference options of ``promptseg-run``, checked once by :meth:`check`.

    Attributes:
        batch: Slices per engine call.
        threshold: Probability above which a pixel belongs to the target.
        modality: "auto", "ct" or "mr" (see the module docstring).
        postprocess: "largest" keeps the largest 3D connected component of each single-organ
            target (liver, spleen, each kidney) in a volume, per prompt before the prompts
            compete for voxels; "none" keeps every component.
        presence_threshold: One tau for every prompt, overriding the manifest's
            ``presence_thresholds`` (None: the manifest's).
        presence_gate: False keeps every slice's mask whatever the presence output says.
    """

    batch: int = 16
    threshold: float = 0.5
    modality: str = "auto"
    postprocess: str = "largest"
    presence_threshold: float | None = None
    presence_gate: bool = True

    def check(self) -> Options:
        """Raise a one-line :class:`InputError` naming the first bad option; return self."""
        if isinstance(self.batch, bool) or int(self.batch) < 1:
            raise InputError("--batch", f"must be at least 1, got {self.batch}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise InputError(
                "--threshold", f"must be between 0 and 1 (exclusive), got {self.threshold}"
            )
        check_modality(self.modality)
        if self.postprocess not in POSTPROCESS_MODES:
            raise InputError(
                "--postprocess",
                f"unknown mode {self.postprocess!r}; valid: {', '.join(POSTPROCESS_MODES)}",
            )
        tau = self.presence_threshold
        if tau is not None and not 0.0 <= float(tau) <= 1.0:
            raise InputError("--presence-threshold", f"must be between 0 and 1, got {tau}")
        return self

    def presence_taus(
        self, targets: Sequence[str], manifest_taus: dict[str, float] | None
    ) -> list[float | None]:
        """Per target the presence threshold to apply (None: no gate for that target)."""
        if not self.presence_gate:
            return [None] * len(targets)
        if self.presence_threshold is not None:
            return [float(self.presence_threshold)] * len(targets)
        taus = manifest_taus or {}
        return [None if taus.get(t) is None else float(taus[t]) for t in targets]


def _slices_of(
    image: Volume | Image2D, axcodes: str
) -> tuple[np.ndarray, Reorientation | None, float | None, list[str]]:
    """(Z, H, W) slices in the training orientation, the transform, voxel ml and warnings."""
    if isinstance(image, Image2D):
        return image.data[None], None, None, []  # (1, H, W)
    return _volume_slices(image, axcodes)


def segment_checked(
    image: Volume | Image2D,
    resolved: Sequence[ResolvedPrompt],
    engine: Engine,
    preprocessing: Preprocessing,
    options: Options,
    *,
    axcodes: str = "LAS",
    presence_thresholds: dict[str, float] | None = None,
    progress: Callable[[int], Callable[[int], None] | None] | None = None,
) -> SegmentationResult:
    """:func:`segment` for already checked options, prompts and engine (:class:`Segmenter`).

    ``progress`` is called once with the number of slices and returns the per-batch callback
    (or None).
    """
    t0 = time.perf_counter()
    mod = choose_modality(image, options.modality)
    slices, reo, voxel_ml, warn = _slices_of(image, axcodes)
    n_slices, height, width = slices.shape
    seconds = {"preprocess": time.perf_counter() - t0, "infer": 0.0, "postprocess": 0.0}
    votes = LabelVotes((n_slices, height, width), options.threshold)
    targets = [rp.target for rp in resolved]
    run = segment_slices(
        engine,
        slices,
        [rp.film for rp in resolved],
        preprocessing,
        mod,
        batch=options.batch,
        threshold=options.threshold,
        presence_thresholds=options.presence_taus(targets, presence_thresholds),
        sink=lambda start, k, logits, on: votes.add(start, k + 1, logits, on),
        progress=progress(n_slices) if progress is not None else None,
    )
    for key in seconds:
        seconds[key] += run.seconds.get(key, 0.0)
    warn += run.warnings
    t = time.perf_counter()
    is_volume = reo is not None and n_slices > 1
    reduce = [
        k
        for k, rp in enumerate(resolved, start=1)
        if not run.constant and applies(rp.target, options.postprocess, is_volume=is_volume)
    ]
    labels_zhw = votes.labels(reduce)
    counts = np.bincount(labels_zhw.ravel(), minlength=len(resolved) + 1)
    per_slice = [np.any(labels_zhw == k, axis=(1, 2)) for k in range(1, len(resolved) + 1)]
    labels = labels_zhw[0] if reo is None else reo.undo(labels_zhw.transpose(1, 2, 0))
    seconds["postprocess"] += time.perf_counter() - t
    stats = []
    for k, (rp, gate) in enumerate(zip(resolved, run.presence), start=1):
        voxels = int(counts[k])
        if gate.slices_gated and not gate.present:
            warn.append(
                f"{rp.target!r} is absent: the presence gate emptied all {gate.slices_gated} "
                f"slices (highest presence probability {gate.max_probability:.3f}, threshold "
                f"{gate.threshold:g}); its mask is empty"
            )
        stats.append(
            {
                **rp.summary(),
                "label": k,
                "voxels": voxels,
                "volume_ml": None if voxel_ml is None else round(voxels * voxel_ml, 3),
                "slices_with_target": int(per_slice[k - 1].sum()),
                "seconds_infer": round(run.seconds.get(f"infer:{k - 1}", 0.0), 4),
                "present": voxels > 0,
                "presence_max_probability": None
                if gate.max_probability is None
                else round(gate.max_probability, 6),
                "slices_gated": gate.slices_gated,
            }
        )
    return SegmentationResult(labels, list(resolved), stats, mod, seconds, warn, reo)


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
    presence_thresholds: dict[str, float] | None = None,
    presence_threshold: float | None = None,
    presence_gate: bool = True,
) -> SegmentationResult:
    """Segment a volume or 2-D image for one or several prompts (checks everything first).

    Args:
        image: A :class:`~promptseg.data.readers.Volume` (X, Y, Z) or an :class:`Image2D` (H, W).
        prompts: Prompt strings (resolved with ``resolver``) or already resolved prompts.
        engine: Any engine of :mod:`promptseg.runtime.engines`.
        resolver: Resolves string prompts (may be None when all are resolved).
        preprocessing: The engine's normalisation settings.
        batch, threshold, modality, postprocess, presence_threshold, presence_gate: See
            :class:`Options`.
        axcodes: Training orientation of (rows, columns, slices).
        progress: Called with the number of slices finished after every batch.
        postprocess: "largest" keeps the largest 3D connected component of each single-organ
            target (liver, spleen, each kidney) in a volume, after the prompts have
            competed for voxels; "none" keeps every component.
        presence_thresholds: Per target tau of the presence gate (the manifest's
            ``presence_thresholds``); used when the engine has a ``presence`` output.

    Returns:
        The :class:`SegmentationResult`; an all-constant input gives an empty mask and a warning.
    """
    options = Options(
        batch, threshold, modality, postprocess, presence_threshold, presence_gate
    ).check()
    resolved = resolve_prompt_list(prompts, resolver)
    check_engine(engine, preprocessing, int(resolved[0].film.shape[-1]))
    return segment_checked(
        image,
        resolved,
        engine,
        preprocessing,
        options,
        axcodes=axcodes,
        presence_thresholds=presence_thresholds,
        progress=None if progress is None else (lambda n: progress),
    )
