"""Binary segmentation metrics on numpy masks (numpy + SciPy only, no torch).

Masks are bool arrays (H, W) or (D, H, W); ``spacing`` gives the voxel size in mm per axis,
so surface distances (``hd``, ``hd95``) are in mm.

Definitions:

* ``hd``: symmetric Hausdorff distance between the boundary voxels of the two masks.
* ``hd95``: ``max(P95(d(pred -> truth)), P95(d(truth -> pred)))``, the maximum of the two
  directed 95th percentiles of boundary-to-boundary distances (MedPy / MONAI definition,
  linear interpolation of ``np.percentile``).
* Boundary voxels: mask minus its binary erosion with full connectivity; voxels on the image
  border count as boundary.
* ``kappa``: Cohen's kappa of the two masks seen as per-pixel binary ratings.
* ``ap``: area under the pixel precision-recall curve, step-wise as in scikit-learn's
  ``average_precision_score``.

Empty masks (``nan`` = undefined, so aggregate with ``np.nanmean``, see :func:`aggregate`):

=========================  ==============  =====  =========  ======  ======  ======
case                       dice, iou, f1   prec.  recall     hd      hd95    kappa
=========================  ==============  =====  =========  ======  ======  ======
truth and pred empty       1               1      1          0       0       1
truth empty, pred not      0               0      nan        nan     nan     0
truth not, pred empty      0               nan    0          nan     nan     0
=========================  ==============  =====  =========  ======  ======  ======

``correctly_empty`` is True only in the first row. ``ap`` is nan whenever the truth is empty.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "aggregate",
    "average_precision",
    "cohen_kappa",
    "confusion",
    "hausdorff",
    "hausdorff95",
    "segmentation_metrics",
    "surface_distances",
]

NAN = float("nan")


# --------------------------------------------------------------------------- validation


def _as_mask(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` as a bool array (H, W) or (D, H, W); numeric arrays must hold only 0/1."""
    arr = np.asarray(x)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D or 3D mask, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be a bool mask or contain only 0/1, got dtype {arr.dtype}")
    return arr.astype(bool)


def _as_mask_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate two masks of equal shape and return them as bool arrays."""
    pred, truth = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(
            f"pred and truth must have the same shape, got pred {pred.shape} and "
            f"truth {truth.shape}"
        )
    return pred, truth


def _as_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Return the voxel spacing (mm per axis), defaulting to 1.0 for every axis."""
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(f"spacing must have one value per axis ({ndim}), got {len(values)}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing values must be finite and > 0, got {values}")
    return values


# --------------------------------------------------------------------------- counts


def confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """Pixel confusion counts of two bool masks (H, W) or (D, H, W) of equal shape.

    Returns:
        ``(tp, fp, fn, tn)`` as Python ints.

    Raises:
        ValueError: Shapes differ, masks are not 2D/3D, or values are not 0/1.
    """
    pred, truth = _as_mask_pair(pred, truth)
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    return tp, fp, fn, pred.size - tp - fp - fn


def cohen_kappa(tp: int, fp: int, fn: int, tn: int) -> float:
    """Cohen's kappa of a binary pixel confusion matrix, in [-1, 1].

    ``kappa = (p_o - p_e) / (1 - p_e)`` with observed agreement ``p_o`` and chance agreement
    ``p_e``. Computed with exact integer arithmetic. When ``p_e = 1`` (both masks constant and
    identical: all foreground or all background) kappa is undefined; 1.0 is returned.

    Raises:
        ValueError: A count is negative or all counts are zero.
    """
    counts = (tp, fp, fn, tn)
    if any(int(c) != c or c < 0 for c in counts):
        raise ValueError(f"counts must be non-negative integers, got (tp, fp, fn, tn)={counts}")
    tp, fp, fn, tn = (int(c) for c in counts)
    n = tp + fp + fn + tn
    if n == 0:
        raise ValueError("cohen_kappa needs at least one pixel, got all counts zero")
    chance = (tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)  # p_e * n**2
    if chance == n * n:
        return 1.0
    return (n * (tp + tn) - chance) / (n * n - chance)


# --------------------------------------------------------------------------- surface distances


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its erosion with full connectivity."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return mask & ~ndimage.binary_erosion(mask, structure=structure)


def _directed_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from pred boundary voxels to truth boundary and vice versa.

    Both masks must be non-empty (checked by the callers).
    """
    spacing = _as_spacing(spacing, pred.ndim)
    pred_border, truth_border = _boundary(pred), _boundary(truth)
    to_truth = ndimage.distance_transform_edt(~truth_border, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=spacing)
    return to_truth[pred_border], to_pred[truth_border]


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Symmetric surface distances (mm) between the boundaries of two masks.

    Args:
        pred: Bool mask (H, W) or (D, H, W).
        truth: Bool mask of the same shape.
        spacing: Voxel size in mm, one value per axis (default 1.0 each).

    Returns:
        1D float array: distances from every pred boundary voxel to the truth boundary,
        followed by those from every truth boundary voxel to the pred boundary. Empty if
        either mask is empty (the distance is then undefined).
    """
    pred, truth = _as_mask_pair(pred, truth)
    if not pred.any() or not truth.any():
        _as_spacing(spacing, pred.ndim)
        return np.empty(0, dtype=np.float64)
    return np.concatenate(_directed_distances(pred, truth, spacing))


def _empty_distance(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """0.0 if both masks are empty, nan if exactly one is, None if neither is."""
    pred_any, truth_any = bool(pred.any()), bool(truth.any())
    if pred_any and truth_any:
        return None
    return 0.0 if pred_any == truth_any else NAN


def hausdorff_pair(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[float, float]:
    """(``hd``, ``hd95``) from one pair of distance transforms (see :func:`hausdorff`)."""
    pred, truth = _as_mask_pair(pred, truth)
    empty = _empty_distance(pred, truth)
    if empty is not None:
        _as_spacing(spacing, pred.ndim)
        return empty, empty
    d_pred, d_truth = _directed_distances(pred, truth, spacing)
    hd = float(max(d_pred.max(), d_truth.max()))
    return hd, float(max(np.percentile(d_pred, 95), np.percentile(d_truth, 95)))


def hausdorff(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric Hausdorff distance (mm) between mask boundaries.

    Returns 0.0 when both masks are empty and nan when exactly one is.
    """
    return hausdorff_pair(pred, truth, spacing)[0]


def hausdorff95(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> float:
    """95th-percentile Hausdorff distance (mm): max of the two directed 95th percentiles.

    Same definition as MedPy's ``hd95`` and MONAI's ``compute_hausdorff_distance(...,
    percentile=95)``. Returns 0.0 when both masks are empty and nan when exactly one is.
    """
    return hausdorff_pair(pred, truth, spacing)[1]


# --------------------------------------------------------------------------- ranking


def average_precision(prob: np.ndarray, truth: np.ndarray) -> float:
    """Area under the pixel precision-recall curve (step-wise, as scikit-learn).

    ``AP = sum_k (R_k - R_{k-1}) * P_k`` over decreasing distinct score thresholds, with
    ``R_0 = 0``; tied scores form a single threshold.

    Args:
        prob: Pixel probabilities (or any finite scores) of the same shape as ``truth``.
        truth: Bool mask (H, W) or (D, H, W).

    Returns:
        AP in [0, 1]; nan when ``truth`` is empty (recall undefined).
    """
    truth = _as_mask(truth, "truth")
    scores = np.asarray(prob, dtype=np.float64)
    if scores.shape != truth.shape:
        raise ValueError(
            f"prob and truth must have the same shape, got prob {scores.shape} and "
            f"truth {truth.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("prob must contain only finite values, got nan or inf")
    if not truth.any():
        return NAN
    order = np.argsort(-scores.ravel(), kind="mergesort")
    sorted_scores, hits = scores.ravel()[order], truth.ravel()[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), hits.size - 1]
    tps = np.cumsum(hits)[last_of_tie]
    precision = tps / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, tps]) / tps[-1]
    return float(np.sum(recall_gain * precision))


# --------------------------------------------------------------------------- summary


def _ratio(num: int, den: int, if_zero: float) -> float:
    """``num / den`` as float, or ``if_zero`` when ``den`` is 0."""
    return num / den if den else if_zero


def segmentation_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    prob: np.ndarray | None = None,
) -> dict[str, float | int | bool]:
    """All metrics of one predicted mask against the truth (empty cases: module docstring).

    Args:
        pred: Bool mask (H, W) or (D, H, W).
        truth: Bool mask of the same shape.
        spacing: Voxel size in mm per axis; default ``(1.0,) * ndim``.
        prob: Optional pixel probabilities of the same shape; adds the key ``ap``.

    Returns:
        Floats ``dice, iou, precision, recall, f1, pixel_accuracy, hd, hd95, kappa`` (+ ``ap``),
        ints ``tp, fp, fn, tn`` and bools ``truth_empty, pred_empty, correctly_empty``.
    """
    pred, truth = _as_mask_pair(pred, truth)
    spacing = _as_spacing(spacing, pred.ndim)
    tp, fp, fn, tn = confusion(pred, truth)
    truth_empty, pred_empty = tp + fn == 0, tp + fp == 0
    both_empty = truth_empty and pred_empty
    overlap = _ratio(2 * tp, 2 * tp + fp + fn, 1.0)
    hd, hd95 = hausdorff_pair(pred, truth, spacing)
    out: dict[str, float | int | bool] = {
        "dice": overlap,
        "iou": _ratio(tp, tp + fp + fn, 1.0),
        "precision": _ratio(tp, tp + fp, 1.0 if truth_empty else NAN),
        "recall": _ratio(tp, tp + fn, 1.0 if pred_empty else NAN),
        "f1": overlap,
        "pixel_accuracy": (tp + tn) / pred.size,
        "hd": hd,
        "hd95": hd95,
        "kappa": cohen_kappa(tp, fp, fn, tn),
    }
    if prob is not None:
        out["ap"] = average_precision(prob, truth)
    out.update(tp=tp, fp=fp, fn=fn, tn=tn)
    out.update(truth_empty=truth_empty, pred_empty=pred_empty, correctly_empty=both_empty)
    return out


def _numeric_values(rows: Sequence[Mapping[str, object]], key: str) -> np.ndarray:
    """Values of ``key`` over the rows that have it, as float64 (bools count as 0/1)."""
    values = []
    for row in rows:
        if key not in row:
            continue
        value = row[key]
        if not isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
            raise TypeError(f"metric {key!r} must be numeric or bool, got {value!r}")
        values.append(float(value))
    return np.asarray(values, dtype=np.float64)


def aggregate(
    rows: Sequence[Mapping[str, object]], keys: Iterable[str] | None = None
) -> dict[str, dict[str, float | int]]:
    """Summarise per-case metric rows, ignoring nan values.

    Args:
        rows: Dicts as returned by :func:`segmentation_metrics`.
        keys: Metrics to summarise; default every key seen in ``rows``, in first-seen order.
            Rows without a key are skipped for that key.

    Returns:
        ``{key: {"mean": nanmean, "std": nanstd (ddof=0), "count": number of non-nan values}}``;
        mean and std are nan when count is 0. Bools give the fraction of True.
    """
    if keys is None:
        keys = list(dict.fromkeys(k for row in rows for k in row))
    summary: dict[str, dict[str, float | int]] = {}
    for key in keys:
        values = _numeric_values(rows, key)
        valid = values[~np.isnan(values)]
        if valid.size == 0:
            summary[key] = {"mean": NAN, "std": NAN, "count": 0}
        else:
            summary[key] = {
                "mean": float(valid.mean()),
                "std": float(valid.std()),
                "count": int(valid.size),
            }
    return summary
