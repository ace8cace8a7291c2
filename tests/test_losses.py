"""Tests for promptseg.losses on tiny (2, 1, 16, 16) inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from promptseg.losses import (
    LOSSES,
    BoundaryLoss,
    DiceBCELoss,
    DiceLoss,
    FocalLoss,
    HausdorffDTLoss,
    JaccardLoss,
    TverskyLoss,
    WeightedSumLoss,
    build_loss,
    signed_distance_map,
    unsigned_distance_map,
)

ALL_NAMES = sorted(LOSSES)
OVERLAP_NAMES = ["dice", "jaccard", "tversky"]
SHAPE = (2, 1, 16, 16)


def _target() -> torch.Tensor:
    """(2, 1, 16, 16) target: an 8x8 square and a disk of radius 5."""
    target = torch.zeros(SHAPE)
    target[0, 0, 4:12, 4:12] = 1.0
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    target[1, 0] = (((yy - 8) ** 2 + (xx - 7) ** 2) <= 25).float()
    return target


def _confident(mask: torch.Tensor) -> torch.Tensor:
    """Logits of +20 on the mask and -20 elsewhere."""
    return 40.0 * mask - 20.0


def _random_logits(seed: int = 0) -> torch.Tensor:
    """Logits with magnitude in [1, 2] and random sign, shape (2, 1, 16, 16)."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = 1.0 + torch.rand(SHAPE, generator=gen)
    sign = torch.where(torch.rand(SHAPE, generator=gen) < 0.5, -1.0, 1.0)
    return magnitude * sign


@pytest.mark.parametrize("name", ALL_NAMES)
def test_perfect_prediction_gives_zero(name: str) -> None:
    target = _target()
    loss = build_loss(name)(_confident(target), target)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_empty_target_and_empty_prediction_gives_zero(name: str) -> None:
    target = torch.zeros(SHAPE)
    loss = build_loss(name)(_confident(target), target)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("name", OVERLAP_NAMES)
@pytest.mark.parametrize("prediction", ["empty", "complement"])
def test_total_miss_gives_about_one(name: str, prediction: str) -> None:
    target = _target()
    pred = torch.zeros(SHAPE) if prediction == "empty" else 1.0 - target
    loss = build_loss(name)(_confident(pred), target)
    # The smoothing constant keeps it just below 1: 1 - 1 / (0.3 * 64 + 1) ~ 0.95 for Tversky.
    assert 0.94 < loss.item() <= 1.0


@pytest.mark.parametrize("name", ALL_NAMES)
def test_one_sgd_step_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)
    target = _target()
    logits = _random_logits().requires_grad_(True)
    loss_fn = build_loss(name)
    before = loss_fn(logits, target)
    before.backward()
    grad = logits.grad
    assert grad is not None and grad.abs().max() > 0
    optimizer = torch.optim.SGD([logits], lr=0.1 / grad.abs().max().item())
    optimizer.step()  # every logit moves by at most 0.1: no sign flips
    with torch.no_grad():
        after = loss_fn(logits, target)
    assert after.item() < before.item()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_gradient_signs_on_false_positive_and_false_negative(name: str) -> None:
    target = _target()
    logits = _random_logits()
    logits[0, 0, 0, 0] = 1.5  # corner: background in the target -> false positive
    logits[0, 0, 8, 8] = -1.5  # centre of the square -> false negative
    logits.requires_grad_(True)
    build_loss(name)(logits, target).backward()
    assert logits.grad[0, 0, 0, 0] > 0
    assert logits.grad[0, 0, 8, 8] < 0


@pytest.mark.parametrize("smooth", [0.0, 1.0, 3.0])
def test_tversky_half_half_equals_dice(smooth: float) -> None:
    target, logits = _target(), _random_logits(3)
    tversky = TverskyLoss(alpha=0.5, beta=0.5, smooth=smooth / 2.0)(logits, target)
    dice = DiceLoss(smooth=smooth)(logits, target)
    torch.testing.assert_close(tversky, dice)


def test_tversky_alpha_weights_false_positives() -> None:
    target = torch.zeros(SHAPE)
    target[:, 0, 4:12, 4:12] = 1.0
    over = target.clone()
    over[:, 0, 2:4, 4:12] = 1.0  # 16 false positives
    under = target.clone()
    under[:, 0, 4:6, 4:12] = 0.0  # 16 false negatives
    loss_fn = TverskyLoss(alpha=0.7, beta=0.3)
    assert loss_fn(_confident(over), target) > loss_fn(_confident(under), target)


@pytest.mark.parametrize(
    ("loss_fn", "kind"),
    [
        (DiceLoss(), "dice"),
        (JaccardLoss(), "jaccard"),
        (TverskyLoss(), "tversky"),
        (DiceBCELoss(), "dice_bce"),
        (FocalLoss(), "focal"),
        (FocalLoss(gamma=0.0, alpha=0.25), "focal"),
        (BoundaryLoss(), "boundary"),
        (HausdorffDTLoss(), "hausdorff"),
    ],
)
def test_tiny_inputs_give_finite_scalars(loss_fn: nn.Module, kind: str) -> None:
    assert isinstance(loss_fn, LOSSES[kind])
    loss = loss_fn(_random_logits(1), _target())
    assert loss.shape == ()
    assert torch.isfinite(loss)
    assert loss.item() >= 0.0


def test_focal_with_gamma_zero_is_bce() -> None:
    target, logits = _target(), _random_logits(2)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), bce)


def test_signed_distance_map_convention() -> None:
    mask = np.zeros((9, 9), dtype=bool)
    mask[2:7, 2:7] = True
    sdm = signed_distance_map(mask)
    diagonal = np.hypot(9, 9)
    assert sdm[0, 0] == pytest.approx(np.hypot(2, 2) / diagonal)  # outside: > 0
    assert sdm[2, 4] == 0.0  # inner contour
    assert sdm[4, 4] == pytest.approx(-2.0 / diagonal)  # inside: < 0
    np.testing.assert_array_equal(signed_distance_map(np.zeros((4, 4), bool)), 1.0)
    np.testing.assert_array_equal(signed_distance_map(np.ones((4, 4), bool)), -1.0)


def test_unsigned_distance_map_is_zero_without_boundary() -> None:
    np.testing.assert_array_equal(unsigned_distance_map(np.zeros((4, 4), bool)), 0.0)
    np.testing.assert_array_equal(unsigned_distance_map(np.ones((4, 4), bool)), 0.0)


def test_boundary_loss_is_scale_free() -> None:
    def loss_at(scale: int) -> float:
        target = torch.zeros(1, 1, 16 * scale, 16 * scale)
        target[..., 4 * scale : 12 * scale, 4 * scale : 12 * scale] = 1.0
        pred = torch.zeros_like(target)
        pred[..., 6 * scale : 14 * scale, 4 * scale : 12 * scale] = 1.0
        return BoundaryLoss()(_confident(pred), target).item()

    assert loss_at(4) == pytest.approx(loss_at(2), rel=0.15)


@pytest.mark.parametrize(
    "full_target_loss",
    [BoundaryLoss(), FocalLoss(), DiceLoss()],
)
def test_full_target_is_handled(full_target_loss: nn.Module) -> None:
    target = torch.ones(SHAPE)
    perfect = full_target_loss(_confident(target), target).item()
    empty = full_target_loss(_confident(torch.zeros(SHAPE)), target).item()
    assert perfect == pytest.approx(0.0, abs=1e-4)
    assert empty > 0.5


@pytest.mark.parametrize(
    ("spec", "weights", "types"),
    [
        ("dice_bce+0.5*boundary", [1.0, 0.5], [DiceBCELoss, BoundaryLoss]),
        ("0.7*dice + 0.3*focal", [0.7, 0.3], [DiceLoss, FocalLoss]),
        (" 2 * Jaccard ", [2.0], [JaccardLoss]),
        ("1e-1*hausdorff+tversky", [0.1, 1.0], [HausdorffDTLoss, TverskyLoss]),
        ({"dice": 1.0, "boundary": 0.5}, [1.0, 0.5], [DiceLoss, BoundaryLoss]),
        ({"focal": 2}, [2.0], [FocalLoss]),
    ],
)
def test_build_loss_weighted_sums(spec: object, weights: list[float], types: list[type]) -> None:
    loss_fn = build_loss(spec)
    assert isinstance(loss_fn, WeightedSumLoss)
    assert loss_fn.weights == pytest.approx(weights)
    assert [type(m) for m in loss_fn.losses] == types
    target, logits = _target(), _random_logits(4)
    expected = sum(w * t()(logits, target) for w, t in zip(weights, types))
    torch.testing.assert_close(loss_fn(logits, target), expected)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_build_loss_bare_name_returns_the_loss(name: str) -> None:
    assert type(build_loss(name)) is LOSSES[name]


def test_build_loss_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown loss 'dise'") as info:
        build_loss("dice_bce+0.5*dise")
    for name in ALL_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="valid names"):
        build_loss({"lovasz": 1.0})


@pytest.mark.parametrize("spec", ["", "dice+", "0.5*", "dice**2", "dice - focal", "0.5 dice"])
def test_build_loss_malformed_string_is_quoted(spec: str) -> None:
    with pytest.raises(ValueError, match="malformed loss spec") as info:
        build_loss(spec)
    assert repr(spec) in str(info.value)


@pytest.mark.parametrize(
    ("spec", "error"),
    [(3, TypeError), ({}, ValueError), ({"dice": -1.0}, ValueError), ({"dice": "1"}, TypeError)],
)
def test_build_loss_rejects_bad_specs(spec: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        build_loss(spec)


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\) and \(2, 1, 8, 8\)"):
        DiceLoss()(torch.zeros(SHAPE), torch.zeros(2, 1, 8, 8))


def test_weighted_sum_rejects_empty_terms() -> None:
    with pytest.raises(ValueError, match="at least one"):
        WeightedSumLoss([])
