"""Tests for promptseg.metrics (numpy + SciPy only)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist, directed_hausdorff

from promptseg.metrics import (
    aggregate,
    average_precision,
    cohen_kappa,
    confusion,
    hausdorff,
    hausdorff95,
    segmentation_metrics,
    surface_distances,
)

NAN = float("nan")


def _mask(rows: list[str]) -> np.ndarray:
    """Bool mask from strings of '1'/'0'."""
    return np.array([[c == "1" for c in row] for row in rows], dtype=bool)


def _blob(seed: int, shape: tuple[int, int] = (40, 48)) -> np.ndarray:
    """Random smooth 2D blob (bool), guaranteed non-empty and not full."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=4)
    mask = field > np.quantile(field, 0.6)
    assert mask.any() and not mask.all()
    return mask


def _boundary_points(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Physical coordinates (N, ndim) of mask minus its full-connectivity erosion."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    border = mask & ~ndimage.binary_erosion(mask, structure=structure)
    return np.argwhere(border) * np.asarray(spacing)


def _assert_metrics(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(actual[key]), f"{key}: expected nan, got {actual[key]}"
        else:
            assert actual[key] == pytest.approx(value), f"{key}: {actual[key]} != {value}"


# --------------------------------------------------------------------------- hand cases

ROWS_VS_COLUMNS = (
    _mask(["1111", "1111", "0000", "0000"]),
    _mask(["1100", "1100", "1100", "1100"]),
)
INSIDE = (
    _mask(["1100", "1100", "0000", "0000"]),
    _mask(["1110", "1110", "0000", "0000"]),
)


@pytest.mark.parametrize(
    ("pred", "truth", "counts", "expected"),
    [
        (
            *ROWS_VS_COLUMNS,
            (4, 4, 4, 4),
            dict(
                dice=0.5,
                iou=1 / 3,
                precision=0.5,
                recall=0.5,
                f1=0.5,
                pixel_accuracy=0.5,
                kappa=0.0,
            ),
        ),
        (
            *INSIDE,
            (4, 0, 2, 10),
            dict(
                dice=0.8,
                iou=4 / 6,
                precision=1.0,
                recall=4 / 6,
                f1=0.8,
                pixel_accuracy=14 / 16,
                kappa=5 / 7,
                hd=1.0,
            ),
        ),
        (
            INSIDE[0],
            INSIDE[0],
            (4, 0, 0, 12),
            dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0, kappa=1.0, hd=0.0, hd95=0.0),
        ),
    ],
)
def test_hand_computed_4x4_cases(
    pred: np.ndarray, truth: np.ndarray, counts: tuple[int, ...], expected: dict
) -> None:
    assert confusion(pred, truth) == counts
    result = segmentation_metrics(pred, truth)
    _assert_metrics(result, expected)
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == counts


def test_confusion_accepts_0_1_integers_and_3d() -> None:
    pred = np.zeros((2, 3, 3), dtype=np.uint8)
    pred[1, 1, 1] = 1
    assert confusion(pred, pred.astype(bool)) == (1, 0, 0, 17)


@pytest.mark.parametrize(
    ("pred", "truth", "match"),
    [
        (np.zeros((4, 4), bool), np.zeros((4, 5), bool), r"pred \(4, 4\) and truth \(4, 5\)"),
        (np.zeros(4, bool), np.zeros(4, bool), r"2D or 3D.*\(4,\)"),
        (np.full((4, 4), 0.5), np.zeros((4, 4), bool), "only 0/1"),
    ],
)
def test_confusion_rejects_bad_masks(pred: np.ndarray, truth: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        confusion(pred, truth)


# --------------------------------------------------------------------------- empty masks

EMPTY = np.zeros((6, 6), dtype=bool)
SQUARE = np.zeros((6, 6), dtype=bool)
SQUARE[1:4, 2:5] = True


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        (
            EMPTY,
            EMPTY,
            dict(
                dice=1.0,
                iou=1.0,
                f1=1.0,
                precision=1.0,
                recall=1.0,
                hd=0.0,
                hd95=0.0,
                kappa=1.0,
                pixel_accuracy=1.0,
                truth_empty=True,
                pred_empty=True,
                correctly_empty=True,
            ),
        ),
        (
            SQUARE,
            EMPTY,
            dict(
                dice=0.0,
                iou=0.0,
                f1=0.0,
                precision=0.0,
                recall=NAN,
                hd=NAN,
                hd95=NAN,
                kappa=0.0,
                truth_empty=True,
                pred_empty=False,
                correctly_empty=False,
            ),
        ),
        (
            EMPTY,
            SQUARE,
            dict(
                dice=0.0,
                iou=0.0,
                f1=0.0,
                precision=NAN,
                recall=0.0,
                hd=NAN,
                hd95=NAN,
                kappa=0.0,
                truth_empty=False,
                pred_empty=True,
                correctly_empty=False,
            ),
        ),
    ],
    ids=["both-empty", "truth-empty", "pred-empty"],
)
def test_empty_mask_conventions(pred: np.ndarray, truth: np.ndarray, expected: dict) -> None:
    _assert_metrics(segmentation_metrics(pred, truth), expected)


def test_surface_distances_of_an_empty_mask_are_empty() -> None:
    assert surface_distances(EMPTY, SQUARE).shape == (0,)
    assert surface_distances(EMPTY, EMPTY).shape == (0,)


def test_keys_and_types() -> None:
    result = segmentation_metrics(SQUARE, SQUARE, prob=SQUARE.astype(float))
    floats = [
        "dice",
        "iou",
        "precision",
        "recall",
        "f1",
        "pixel_accuracy",
        "hd",
        "hd95",
        "kappa",
        "ap",
    ]
    ints, bools = ["tp", "fp", "fn", "tn"], ["truth_empty", "pred_empty", "correctly_empty"]
    assert set(result) == set(floats + ints + bools)
    assert all(type(result[k]) is float for k in floats)
    assert all(type(result[k]) is int for k in ints)
    assert all(type(result[k]) is bool for k in bools)
    assert "ap" not in segmentation_metrics(SQUARE, SQUARE)


# --------------------------------------------------------------------------- distances


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 1.9)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hausdorff_matches_scipy_directed_hausdorff(
    seed: int, spacing: tuple[float, float]
) -> None:
    pred, truth = _blob(seed), _blob(seed + 100)
    a, b = _boundary_points(pred, spacing), _boundary_points(truth, spacing)
    expected = max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])
    assert hausdorff(pred, truth, spacing) == pytest.approx(expected)

    distances = cdist(a, b)
    expected95 = max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))
    assert hausdorff95(pred, truth, spacing) == pytest.approx(expected95)
    assert hausdorff95(pred, truth, spacing) <= hausdorff(pred, truth, spacing)
    pooled = surface_distances(pred, truth, spacing)
    assert pooled.shape == (len(a) + len(b),)
    assert pooled.max() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("axis", "spacing", "expected"),
    [
        (0, (2.5, 1.0, 1.0), 2.5),
        (1, (1.0, 2.5, 0.8), 2.5),
        (2, (2.5, 1.0, 0.8), 0.8),
    ],
)
def test_one_voxel_shift_with_anisotropic_spacing(
    axis: int, spacing: tuple[float, ...], expected: float
) -> None:
    truth = np.zeros((12, 14, 16), dtype=bool)
    truth[3:8, 4:10, 5:11] = True
    pred = np.roll(truth, 1, axis=axis)
    assert hausdorff(pred, truth, spacing) == pytest.approx(expected)
    assert 0.0 < hausdorff95(pred, truth, spacing) <= expected
    assert segmentation_metrics(pred, truth, spacing)["hd"] == pytest.approx(expected)


def test_spacing_must_match_dimensions() -> None:
    with pytest.raises(ValueError, match=r"one value per axis \(2\), got 3"):
        hausdorff(SQUARE, SQUARE, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="> 0"):
        segmentation_metrics(SQUARE, SQUARE, spacing=(1.0, 0.0))


# --------------------------------------------------------------------------- kappa


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ((20, 5, 10, 15), 0.4),  # p_o = 0.7, p_e = 0.5
        ((4, 0, 2, 10), 5 / 7),
        ((0, 8, 8, 0), -1.0),  # perfect disagreement at prevalence 0.5
        ((0, 0, 0, 16), 1.0),  # both all background: defined as 1
        ((16, 0, 0, 0), 1.0),  # both all foreground: defined as 1
        ((0, 16, 0, 0), 0.0),  # pred all foreground, truth all background
    ],
)
def test_kappa_known_values(counts: tuple[int, int, int, int], expected: float) -> None:
    assert cohen_kappa(*counts) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(8))
def test_kappa_stays_in_range_for_random_masks(seed: int) -> None:
    # The reference paper reports kappa = 5.3, which is impossible: kappa lies in [-1, 1].
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 12, size=rng.integers(2, 4)))
    for _ in range(50):
        pred = rng.random(shape) < rng.random()
        truth = rng.random(shape) < rng.random()
        kappa = cohen_kappa(*confusion(pred, truth))
        assert -1.0 <= kappa <= 1.0
        assert kappa == pytest.approx(cohen_kappa(*confusion(truth, pred)))


@pytest.mark.parametrize("counts", [(0, 0, 0, 0), (-1, 2, 3, 4), (1.5, 2, 3, 4)])
def test_kappa_rejects_bad_counts(counts: tuple) -> None:
    with pytest.raises(ValueError):
        cohen_kappa(*counts)


# --------------------------------------------------------------------------- average precision


def _brute_force_ap(prob: np.ndarray, truth: np.ndarray) -> float:
    """AP from its definition: sum over descending thresholds of delta-recall * precision."""
    ap, previous_recall = 0.0, 0.0
    for threshold in np.unique(prob)[::-1]:
        predicted = prob >= threshold
        tp = np.count_nonzero(predicted & truth)
        recall = tp / np.count_nonzero(truth)
        ap += (recall - previous_recall) * tp / np.count_nonzero(predicted)
        previous_recall = recall
    return ap


@pytest.mark.parametrize(
    ("prob", "truth", "expected"),
    [
        ([[0.1, 0.4], [0.35, 0.8]], [[0, 0], [1, 1]], 5 / 6),  # scikit-learn docstring example
        ([[0.9, 0.8], [0.2, 0.1]], [[1, 1], [0, 0]], 1.0),  # perfect ranking
        ([[0.9, 0.8], [0.7, 0.1]], [[0, 0], [0, 1]], 0.25),  # worst ranking
        ([[0.5, 0.5], [0.5, 0.5]], [[0, 1], [0, 0]], 0.25),  # all tied: prevalence
    ],
)
def test_average_precision_hand_cases(prob: list, truth: list, expected: float) -> None:
    assert average_precision(np.array(prob), np.array(truth, bool)) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_matches_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.random((9, 11)) < 0.3
    prob = np.round(np.clip(truth * 0.3 + rng.random((9, 11)) * 0.7, 0, 1), 1)  # with ties
    assert average_precision(prob, truth) == pytest.approx(_brute_force_ap(prob, truth))


def test_average_precision_of_empty_truth_is_nan() -> None:
    assert math.isnan(average_precision(np.full((4, 4), 0.3), np.zeros((4, 4), bool)))
    assert math.isnan(segmentation_metrics(EMPTY, EMPTY, prob=np.zeros((6, 6)))["ap"])


# --------------------------------------------------------------------------- aggregation


def test_aggregate_ignores_nan_and_missing_values() -> None:
    rows = [
        {"dice": 1.0, "recall": NAN, "correctly_empty": True},
        {"dice": 0.5, "recall": 0.5, "correctly_empty": False, "ap": 0.8},
        {"dice": 0.0, "recall": 1.0, "correctly_empty": False},
    ]
    summary = aggregate(rows, ["dice", "recall", "correctly_empty", "ap", "hd"])
    assert summary["dice"] == {"mean": 0.5, "std": pytest.approx(np.std([1, 0.5, 0])), "count": 3}
    assert summary["recall"] == {"mean": 0.75, "std": 0.25, "count": 2}
    assert summary["correctly_empty"]["mean"] == pytest.approx(1 / 3)
    assert summary["ap"] == {"mean": 0.8, "std": 0.0, "count": 1}
    assert summary["hd"]["count"] == 0 and math.isnan(summary["hd"]["mean"])
    assert list(aggregate(rows)) == ["dice", "recall", "correctly_empty", "ap"]


def test_aggregate_of_metric_rows() -> None:
    rows = [segmentation_metrics(SQUARE, SQUARE), segmentation_metrics(EMPTY, SQUARE)]
    summary = aggregate(rows, ["dice", "hd"])
    assert summary["dice"]["mean"] == pytest.approx(0.5)
    assert summary["hd"] == {"mean": 0.0, "std": 0.0, "count": 1}


def test_metrics_module_does_not_import_torch() -> None:
    code = "import sys, promptseg.metrics; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, check=False, timeout=60)
    assert result.returncode == 0
