"""Segment one volume or 2-D image with one engine: the runtime's core loop (numpy only).

Steps (docs/engine_format.md, "Using it"):

1. Volumes are brought to the manifest's axis codes (:mod:`promptseg.runtime.orientation`);
   2-D images are used as they are (assumed to be in the training convention already).
2. Intensities are normalised with the training arithmetic (:func:`promptseg.preprocess.normalize`)
   using bounds computed once over the whole volume, then each slice is resized to R x R.
3. Slices go through the engine in batches, the prompt's FiLM vector repeated per slice.
4. Logits are resized to the input grid, passed through the sigmoid and thresholded
   (:func:`promptseg.preprocess.logits_to_probability`); with several prompts the label of the
   most probable prompt wins where more than one exceeds the threshold (labels 1..K).
5. Post-processing (``postprocess="largest"``, the default): in a volume, each single-organ
   target (liver, spleen, either kidney) keeps only its largest 3D connected component
   (:mod:`promptseg.postprocess`); tumour masks are never reduced.
6. The label map goes back to the input orientation.

Modality ``auto``: a DICOM series uses its Modality tag (CT or MR). Otherwise a volume is CT
when its minimum is below -500 and its values look like Hounsfield units (minimum >= -3100,
the lowest scanner padding value, and maximum <= 32767); anything else is MR (percentile
window). 8-bit 2-D images use the ``uint8`` rule (divide by 255); other 2-D images use the MR
percentile rule unless ``--modality ct`` says they hold HU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from promptseg.data.readers import InputError, Volume
from promptseg.postprocess import POSTPROCESS_MODES, applies, largest_component
from promptseg.preprocess import (
    Preprocessing,
    intensity_bounds,
    logits_to_probability,
    normalize,
    resize_bilinear,
)
from promptseg.runtime.engines import Engine
from promptseg.runtime.io import Image2D
from promptseg.runtime.orientation import Reorientation, identity_reorientation, reorientation
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
            out.append(resolver.resolve(p))
    if not out:
        raise InputError("--prompt", "no prompt given; expected at least one --prompt TEXT")
    if len(out) > 255:
        raise InputError("--prompt", f"{len(out)} prompts; a uint8 label map holds at most 255")
    return out


def _check_engine(engine: Engine, pre: Preprocessing, film_dim: int) -> int:
    """Model resolution R from the engine's image input, checked against the preprocessing."""
    spec = {s.name: s for s in engine.inputs}
    res = spec["image"].shape[-1]
    if not isinstance(res, int) or res != pre.resolution:
        raise ValueError(
            f"engine image input {spec['image'].describe()} does not match resolution {pre.resolution}"
        )
    p = spec["film"].shape[-1]
    if isinstance(p, int) and p != film_dim:
        raise ValueError(f"prompt FiLM vectors have {film_dim} values; the engine expects {p}")
    return res


def _have_scipy() -> bool:
    try:
        import scipy.ndimage  # noqa: F401
    except ImportError:
        return False
    return True


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
            target (liver, spleen, each kidney) in a volume; "none" keeps every component.

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
    res = _check_engine(engine, preprocessing, int(resolved[0].film.shape[-1]))
    t0 = time.perf_counter()
    mod = choose_modality(image, modality)
    reo: Reorientation | None = None
    warn: list[str] = []
    if isinstance(image, Image2D):
        slices = image.data[None]  # (1, H, W)
        voxel_ml = None
    else:
        if image.meta.get("orientation_known", True):
            reo = reorientation(image.affine, image.data.shape, axcodes)
        else:
            reo = identity_reorientation(image.affine, image.data.shape, axcodes)
            warn.append(
                f"the file stores no patient orientation; used as it is (assumed {axcodes}, "
                "left/right targets are unreliable)"
            )
        slices = reo.apply(image.data).transpose(2, 0, 1)  # (Z, H, W) view, rows x columns
        voxel_ml = voxel_volume_ml(image.affine)
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
    labels_zhw = np.zeros((n_slices, height, width), dtype=np.uint8)
    per_prompt_infer = [0.0] * len(resolved)
    if not constant:
        for start in range(0, n_slices, batch):
            t = time.perf_counter()
            chunk = normalize(
                slices[start : start + batch], "ct", window
            )  # same arithmetic as training
            small = resize_bilinear(chunk, (res, res))[:, None]  # (n, 1, R, R)
            n = small.shape[0]
            seconds["preprocess"] += time.perf_counter() - t
            best = np.zeros((n, height, width), dtype=np.float32)
            lab = labels_zhw[start : start + n]
            for k, rp in enumerate(resolved, start=1):
                film = np.ascontiguousarray(
                    np.broadcast_to(rp.film.astype(np.float32), (n, rp.film.shape[-1]))
                )
                t = time.perf_counter()
                logits = engine.infer({"image": small, "film": film})["logits"]
                dt = time.perf_counter() - t
                seconds["infer"] += dt
                per_prompt_infer[k - 1] += dt
                t = time.perf_counter()
                prob = logits_to_probability(logits[:, 0], (height, width))
                win = (prob > threshold) & (prob > best)
                lab[win] = k
                best[win] = prob[win]
                seconds["postprocess"] += time.perf_counter() - t
            if progress is not None:
                progress(n)
    elif progress is not None:
        progress(n_slices)
    t = time.perf_counter()
    if reo is not None and not constant and postprocess != "none" and not _have_scipy():
        warn.append("SciPy is not installed: organ masks keep every connected component")
        postprocess = "none"
    if reo is not None and not constant:
        for k, rp in enumerate(resolved, start=1):
            if applies(rp.target, postprocess, is_volume=n_slices > 1):
                mine = labels_zhw == k
                labels_zhw[mine & ~largest_component(mine)] = 0
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
