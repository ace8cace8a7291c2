"""Tests for promptseg.preprocess (numpy only), checked against torch where torch defines it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from promptseg.preprocess import (
    MODALITIES,
    Preprocessing,
    intensity_bounds,
    logits_to_probability,
    normalize,
    resize_bilinear,
    resize_nearest,
    sigmoid,
)

PRE = Preprocessing()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- normalize


@pytest.mark.parametrize(
    ("modality", "values", "expected"),
    [
        ("ct", [-1000.0, -150.0, 50.0, 150.0, 250.0, 3000.0], [0, 0, 0.5, 0.75, 1, 1]),
        ("uint8", [0, 51, 102, 255], [0, 0.2, 0.4, 1]),
    ],
)
def test_normalize_fixed_windows(modality, values, expected):
    dtype = np.uint8 if modality == "uint8" else np.float64
    volume = np.array(values, dtype=dtype).reshape(1, 1, -1)
    out = normalize(volume, modality, PRE)
    assert out.dtype == np.float32
    assert out.shape == volume.shape
    np.testing.assert_allclose(out.ravel(), expected, atol=1e-6)


def test_normalize_ct_custom_window():
    pre = Preprocessing(ct_window=(-1000.0, 1000.0))
    out = normalize(np.array([[-1000.0, 0.0, 500.0]]), "ct", pre)
    np.testing.assert_allclose(out, [[0.0, 0.5, 0.75]], atol=1e-6)


def test_normalize_mr_uses_volume_percentiles():
    volume = np.arange(1001, dtype=np.float64).reshape(7, 11, 13)  # 0 .. 1000
    lo, hi = intensity_bounds(volume, "mr", PRE)
    assert (lo, hi) == pytest.approx((5.0, 995.0))  # 0.5th and 99.5th percentiles
    out = normalize(volume, "mr", PRE)
    assert out.shape == volume.shape and out.dtype == np.float32
    assert out[0, 0, 0] == 0.0 and out.max() == 1.0
    assert out.ravel()[500] == pytest.approx((500 - 5) / 990, abs=1e-6)
    # The percentiles ignore non-finite voxels.
    with_nan = volume.copy()
    with_nan[0, 0, 0] = np.nan
    assert intensity_bounds(with_nan, "mr", PRE) == pytest.approx(
        tuple(np.percentile(volume.ravel()[1:], PRE.mr_percentiles))
    )


@pytest.mark.parametrize("value", [0.0, 7.5, 1200.0])
def test_normalize_constant_mr_gives_zeros(value):
    out = normalize(np.full((3, 8, 8), value), "mr", PRE)
    assert out.dtype == np.float32 and out.shape == (3, 8, 8)
    assert not out.any()


def test_normalize_constant_in_a_fixed_window_keeps_its_value():
    # ct and uint8 windows do not depend on the data: a constant maps through the window.
    np.testing.assert_allclose(normalize(np.full((4, 4), 50.0), "ct", PRE), 0.5)
    np.testing.assert_allclose(normalize(np.zeros((4, 4), np.uint8), "uint8", PRE), 0.0)


@pytest.mark.parametrize("modality", ["pet", "CT", ""])
def test_normalize_unknown_modality(modality):
    with pytest.raises(ValueError, match="unknown modality") as info:
        normalize(np.zeros((2, 2)), modality, PRE)
    for valid in MODALITIES:
        assert valid in str(info.value)


# --------------------------------------------------------------------------- resizing


RESIZE_CASES = [
    ((37, 53), (16, 20)),  # down, non-integer factors
    ((64, 64), (32, 32)),  # down by 2
    ((257, 257), (64, 64)),  # BTCV slice to model resolution
    ((16, 20), (40, 33)),  # up, non-integer factors
    ((32, 32), (128, 128)),  # up by 4
    ((30, 40), (30, 40)),  # same size
    ((1, 7), (5, 3)),  # degenerate height
]


@pytest.mark.parametrize(("src", "dst"), RESIZE_CASES)
def test_resize_bilinear_matches_torch(src, dst):
    rng = np.random.default_rng(sum(src) + sum(dst))
    images = rng.standard_normal((2, 3, *src)).astype(np.float32)
    ours = resize_bilinear(images, dst)
    ref = F.interpolate(
        torch.from_numpy(images), size=dst, mode="bilinear", align_corners=False
    ).numpy()
    assert ours.shape == (2, 3, *dst) and ours.dtype == np.float32
    # float32 rounding only: torch derives the source coordinates in float32, we in float64.
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_resize_bilinear_any_leading_axes_and_dtypes():
    img = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = resize_bilinear(img, (4, 4))
    assert out.shape == (4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(resize_bilinear(img[None, None, None], (4, 4))[0, 0, 0], out)
    # Averages of 2x2 blocks for an exact factor-2 downsampling.
    blocks = img.reshape(4, 2, 4, 2).astype(np.float32).mean(axis=(1, 3))
    np.testing.assert_allclose(out, blocks, atol=1e-5)


@pytest.mark.parametrize(("src", "dst"), RESIZE_CASES)
@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int16])
def test_resize_nearest_preserves_labels_and_shape(src, dst, dtype):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=(2, *src)).astype(dtype)
    out = resize_nearest(labels, dst)
    assert out.shape == (2, *dst)
    assert out.dtype == labels.dtype
    assert set(np.unique(out)) <= set(np.unique(labels))


def test_resize_nearest_integer_factors_are_exact():
    labels = np.random.default_rng(0).integers(0, 4, size=(3, 8, 6))
    up = resize_nearest(labels, (24, 12))
    np.testing.assert_array_equal(up, labels.repeat(3, axis=-2).repeat(2, axis=-1))
    np.testing.assert_array_equal(resize_nearest(up, (8, 6)), labels)
    np.testing.assert_array_equal(resize_nearest(labels, (8, 6)), labels)


def test_resize_nearest_keeps_a_small_structure_near_its_place():
    mask = np.zeros((256, 256), bool)
    mask[40:60, 200:230] = True
    small = resize_nearest(mask, (64, 64))
    rows, cols = np.nonzero(small)
    assert 40 / 4 - 1 <= rows.min() and rows.max() <= 60 / 4
    assert 200 / 4 - 1 <= cols.min() and cols.max() <= 230 / 4
    assert small.sum() == pytest.approx(mask.sum() / 16, rel=0.25)


# --------------------------------------------------------------------------- post-processing


def test_logits_to_probability_shape_and_range():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 32, 32)) * 20).astype(np.float32)
    prob = logits_to_probability(logits, (100, 90))
    assert prob.shape == (3, 100, 90) and prob.dtype == np.float32
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    ref = torch.sigmoid(
        F.interpolate(torch.from_numpy(logits)[None], size=(100, 90), mode="bilinear")
    )[0].numpy()
    np.testing.assert_allclose(prob, ref, atol=1e-4)


def test_sigmoid_is_stable_for_extreme_logits():
    x = np.array([-1e4, -50.0, 0.0, 50.0, 1e4], np.float32)
    with np.errstate(over="raise", invalid="raise"):
        out = sigmoid(x)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)
    assert out.dtype == np.float32


# --------------------------------------------------------------------------- Preprocessing


@pytest.mark.parametrize(
    "pre",
    [Preprocessing(), Preprocessing(resolution=64, ct_window=(-100.0, 300.0))],
    ids=["default", "custom"],
)
def test_preprocessing_round_trip(pre):
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    restored = Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert restored == pre
    assert isinstance(restored.ct_window, tuple) and isinstance(restored.modalities, tuple)


def test_preprocessing_defaults():
    pre = Preprocessing()
    assert pre.orientation == "LAS"
    assert pre.modalities == MODALITIES
    old = pre.to_dict()
    del old["modalities"]  # dicts written before the field existed still load
    assert Preprocessing.from_dict(old) == pre
