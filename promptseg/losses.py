"""Binary segmentation losses on logits.

Every loss is an ``nn.Module`` whose ``forward(logits, target)`` takes

* ``logits``: float tensor (B, 1, H, W) (or (B, 1, D, H, W)), raw network outputs;
* ``target``: float tensor of the same shape with values in {0, 1};

and returns a scalar tensor. The sigmoid is applied inside the losses.

Soft overlap losses (Dice, Jaccard, Tversky) are computed per sample (sum over C, H, W),
smoothed so that an empty target with an empty prediction gives ~0 and a non-empty target
with an empty prediction gives ~1, then averaged over the batch.

The distance-based terms ("boundary", "hausdorff") carry little signal on their own early in
training and are usually combined with a region loss, e.g. ``build_loss("dice_bce+0.5*boundary")``.
Their distance maps are computed with SciPy on CPU, without gradient.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

__all__ = [
    "LOSSES",
    "BoundaryLoss",
    "DiceBCELoss",
    "DiceLoss",
    "FocalLoss",
    "HausdorffDTLoss",
    "JaccardLoss",
    "TverskyLoss",
    "WeightedSumLoss",
    "build_loss",
    "signed_distance_map",
    "unsigned_distance_map",
]


# --------------------------------------------------------------------------- helpers


def _check_inputs(logits: torch.Tensor, target: torch.Tensor) -> None:
    """Validate that ``logits`` and ``target`` are float tensors (B, C, *spatial) of equal shape."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"expected logits and target as torch.Tensor, got {type(logits).__name__} "
            f"and {type(target).__name__}"
        )
    if logits.shape != target.shape:
        raise ValueError(
            f"logits and target must have the same shape (B, 1, H, W), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if logits.ndim < 3:
        raise ValueError(
            f"expected logits of shape (B, 1, H, W) or (B, 1, D, H, W), got {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"expected floating-point logits, got dtype {logits.dtype}")


def _check_non_negative(name: str, value: float) -> float:
    """Return ``value`` as float if it is finite and >= 0, else raise ValueError."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum (B, C, *spatial) over all but the batch dimension, giving (B,)."""
    return x.flatten(1).sum(dim=1)


def _soft_counts(
    logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft per-sample (tp, fp, fn), each of shape (B,), from logits and target (B, 1, H, W)."""
    _check_inputs(logits, target)
    prob = torch.sigmoid(logits)
    target = target.to(prob.dtype)
    tp = _per_sample_sum(prob * target)
    fp = _per_sample_sum(prob * (1.0 - target))
    fn = _per_sample_sum((1.0 - prob) * target)
    return tp, fp, fn


def _diagonal(spatial_shape: tuple[int, ...]) -> float:
    """Length of the image diagonal in pixels, used to make distances scale-free."""
    return math.sqrt(sum(s * s for s in spatial_shape))


def _target_masks(target: torch.Tensor) -> np.ndarray:
    """Binarise a (B, C, *spatial) tensor at 0.5 into a bool numpy array on CPU."""
    return (target.detach().to("cpu", torch.float32) > 0.5).numpy()


def _map_per_channel(
    masks: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], like: torch.Tensor
) -> torch.Tensor:
    """Apply ``fn`` to every (sample, channel) mask of (B, C, *spatial); same device and dtype."""
    out = np.empty(masks.shape, dtype=np.float32)
    for b in range(masks.shape[0]):
        for c in range(masks.shape[1]):
            out[b, c] = fn(masks[b, c])
    return torch.from_numpy(out).to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------- region losses


class DiceLoss(nn.Module):
    """Soft Dice loss: ``1 - (2 tp + smooth) / (2 tp + fp + fn + smooth)`` per sample, batch mean.

    Args:
        smooth: Additive smoothing; makes empty target + empty prediction give loss 0.
    """

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = _check_non_negative("smooth", smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits and target (B, 1, H, W)."""
        tp, fp, fn = _soft_counts(logits, target)
        dice = (2.0 * tp + self.smooth) / (2.0 * tp + fp + fn + self.smooth)
        return (1.0 - dice).mean()


class JaccardLoss(nn.Module):
    """Soft Jaccard (IoU) loss: ``1 - (tp + smooth) / (tp + fp + fn + smooth)``, batch mean.

    Args:
        smooth: Additive smoothing; makes empty target + empty prediction give loss 0.
    """

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = _check_non_negative("smooth", smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits and target (B, 1, H, W)."""
        tp, fp, fn = _soft_counts(logits, target)
        iou = (tp + self.smooth) / (tp + fp + fn + self.smooth)
        return (1.0 - iou).mean()


class TverskyLoss(nn.Module):
    """Soft Tversky loss: ``1 - (tp + smooth) / (tp + alpha fp + beta fn + smooth)``, batch mean.

    Convention: ``alpha`` weights false positives and ``beta`` false negatives, so the default
    ``alpha=0.7, beta=0.3`` penalises over-segmentation more. With ``alpha = beta = 0.5`` the
    index is the Dice coefficient: ``TverskyLoss(0.5, 0.5, smooth=s / 2)`` equals
    ``DiceLoss(smooth=s)`` exactly (with equal ``smooth`` they differ only by the smoothing).

    Args:
        alpha: Weight of false positives, >= 0.
        beta: Weight of false negatives, >= 0.
        smooth: Additive smoothing; makes empty target + empty prediction give loss 0.
    """

    def __init__(self, alpha: float = 0.7, beta: float = 0.3, smooth: float = 1.0) -> None:
        super().__init__()
        self.alpha = _check_non_negative("alpha", alpha)
        self.beta = _check_non_negative("beta", beta)
        self.smooth = _check_non_negative("smooth", smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits and target (B, 1, H, W)."""
        tp, fp, fn = _soft_counts(logits, target)
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        return (1.0 - index).mean()


class DiceBCELoss(nn.Module):
    """Weighted sum ``dice_weight * Dice + bce_weight * BCE`` (BCE on logits, pixel mean).

    Args:
        dice_weight: Weight of the soft Dice term.
        bce_weight: Weight of the binary cross-entropy term.
        smooth: Smoothing of the Dice term.
    """

    def __init__(
        self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0
    ) -> None:
        super().__init__()
        self.dice_weight = _check_non_negative("dice_weight", dice_weight)
        self.bce_weight = _check_non_negative("bce_weight", bce_weight)
        self.dice = DiceLoss(smooth=smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits and target (B, 1, H, W)."""
        dice = self.dice(logits, target)
        bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
        return self.dice_weight * dice + self.bce_weight * bce


class PositiveDiceBCELoss(nn.Module):
    """Dice on the samples whose target is non-empty, plus BCE on every sample.

    For prompted training with absent-target prompts (empty masks): per-sample soft Dice on an
    empty target is ~1 as soon as any probability mass appears, so a batch with negatives pulls
    the network into the trivial "predict nothing" minimum before it has learned to read the
    prompt. Here the empty samples are taught by BCE alone. Registered as ``dice_bce_pos``.
    """

    def __init__(self, bce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        self.bce_weight = _check_non_negative("bce_weight", bce_weight)
        self.smooth = _check_non_negative("smooth", smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits and target (B, 1, H, W)."""
        tp, fp, fn = _soft_counts(logits, target)
        positive = _per_sample_sum(target) > 0
        bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
        if not bool(positive.any()):
            return self.bce_weight * bce
        dice = (2.0 * tp + self.smooth) / (2.0 * tp + fp + fn + self.smooth)
        return (1.0 - dice[positive]).mean() + self.bce_weight * bce


class FocalLoss(nn.Module):
    """Binary focal loss (Lin et al. 2017) on logits, pixel mean.

    ``FL = alpha_t * (1 - p_t) ** gamma * BCE``, where ``p_t`` is the probability given to the
    true class. The BCE comes from ``F.binary_cross_entropy_with_logits`` (numerically stable)
    and ``p_t = exp(-BCE)``.

    Args:
        gamma: Focusing parameter, >= 0 (0 gives plain BCE).
        alpha: Weight of the foreground class in [0, 1] (background gets ``1 - alpha``), or
            None for no class weighting.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None) -> None:
        super().__init__()
        self.gamma = _check_non_negative("gamma", gamma)
        if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be None or in [0, 1], got {alpha}")
        self.alpha = None if alpha is None else float(alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits and target (B, 1, H, W)."""
        _check_inputs(logits, target)
        target = target.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = torch.exp(-bce)
        loss = (1.0 - p_t).pow(self.gamma) * bce
        if self.alpha is not None:
            loss = (self.alpha * target + (1.0 - self.alpha) * (1.0 - target)) * loss
        return loss.mean()


# --------------------------------------------------------------------------- distance losses


def signed_distance_map(mask: np.ndarray) -> np.ndarray:
    """Signed distance map of a bool mask (H, W) or (D, H, W), normalised by the image diagonal.

    Convention (Kervadec et al. 2019): outside the object the value is the Euclidean distance
    to the nearest foreground pixel (> 0); inside it is ``-(distance to the nearest background
    pixel - 1)``, i.e. 0 on the inner contour and negative deeper inside. Distances are divided
    by the diagonal length so the values lie in about [-1, 1] at any resolution.

    Degenerate masks: an empty mask gives a constant +1 map (any foreground is penalised), a
    full mask a constant -1 map (any background is penalised).
    """
    if not mask.any():
        return np.ones(mask.shape, dtype=np.float32)
    if mask.all():
        return -np.ones(mask.shape, dtype=np.float32)
    outside = ndimage.distance_transform_edt(~mask)
    inside = ndimage.distance_transform_edt(mask)
    sdm = np.where(mask, -(inside - 1.0), outside)
    return (sdm / _diagonal(mask.shape)).astype(np.float32)


def unsigned_distance_map(mask: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the object boundary (Karimi & Salcudean 2019), normalised.

    Foreground pixels get their distance to the nearest background pixel, background pixels
    their distance to the nearest foreground pixel, both divided by the image diagonal. An
    empty or full mask has no boundary and gives zeros.
    """
    if not mask.any() or mask.all():
        return np.zeros(mask.shape, dtype=np.float32)
    field = ndimage.distance_transform_edt(mask) + ndimage.distance_transform_edt(~mask)
    return (field / _diagonal(mask.shape)).astype(np.float32)


class BoundaryLoss(nn.Module):
    """Boundary loss of Kervadec et al. (2019) with a per-sample signed distance map.

    ``loss = mean((sigmoid(logits) - target) * sdm)`` with ``sdm`` from
    :func:`signed_distance_map` (negative inside, positive outside, 0 on the inner contour,
    divided by the image diagonal so the loss is scale-free). This is the paper's
    ``mean(sigmoid(logits) * sdm)`` minus the constant ``mean(target * sdm)``: same gradient,
    but the loss is >= 0 and exactly 0 for a perfect prediction. Empty targets use a constant
    +1 map, full targets a constant -1 map. Usually combined with a region loss.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits and target (B, 1, H, W)."""
        _check_inputs(logits, target)
        with torch.no_grad():
            sdm = _map_per_channel(_target_masks(target), signed_distance_map, logits)
        prob = torch.sigmoid(logits)
        return ((prob - target.to(prob.dtype)) * sdm).mean()


class HausdorffDTLoss(nn.Module):
    """Distance-transform Hausdorff loss of Karimi & Salcudean (2019).

    ``loss = mean((p - g) ** 2 * (dt_p ** alpha + dt_g ** alpha))`` where ``p = sigmoid(logits)``,
    ``g`` the target, and ``dt_p``, ``dt_g`` the unsigned distance-to-boundary maps of the
    prediction thresholded at 0.5 and of the target (no gradient), divided by the image
    diagonal (see :func:`unsigned_distance_map`). Usually combined with a region loss.

    Args:
        alpha: Exponent of the distance maps, > 0.
    """

    def __init__(self, alpha: float = 2.0) -> None:
        super().__init__()
        self.alpha = _check_non_negative("alpha", alpha)
        if self.alpha == 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits and target (B, 1, H, W)."""
        _check_inputs(logits, target)
        prob = torch.sigmoid(logits)
        with torch.no_grad():
            dt_p = _map_per_channel(_target_masks(prob), unsigned_distance_map, logits)
            dt_g = _map_per_channel(_target_masks(target), unsigned_distance_map, logits)
            weight = dt_p.pow(self.alpha) + dt_g.pow(self.alpha)
        return ((prob - target.to(prob.dtype)).pow(2) * weight).mean()


# --------------------------------------------------------------------------- combination


class WeightedSumLoss(nn.Module):
    """Weighted sum of losses, ``sum(w_i * loss_i(logits, target))``.

    Args:
        terms: Non-empty list of ``(weight, loss_module)`` pairs; weights finite and >= 0.
    """

    def __init__(self, terms: list[tuple[float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("WeightedSumLoss needs at least one (weight, loss) term, got none")
        for weight, module in terms:
            if not isinstance(module, nn.Module):
                raise TypeError(f"expected an nn.Module in each term, got {type(module).__name__}")
            _check_non_negative("loss weight", weight)
        self.weights = [float(w) for w, _ in terms]
        self.losses = nn.ModuleList([m for _, m in terms])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the weighted sum of the term losses for logits and target (B, 1, H, W)."""
        total = self.weights[0] * self.losses[0](logits, target)
        for weight, loss in zip(self.weights[1:], self.losses[1:]):
            total = total + weight * loss(logits, target)
        return total

    def extra_repr(self) -> str:
        """Show the weights next to the term modules."""
        return f"weights={self.weights}"


LOSSES: dict[str, type[nn.Module]] = {
    "dice": DiceLoss,
    "jaccard": JaccardLoss,
    "tversky": TverskyLoss,
    "dice_bce": DiceBCELoss,
    "dice_bce_pos": PositiveDiceBCELoss,
    "focal": FocalLoss,
    "boundary": BoundaryLoss,
    "hausdorff": HausdorffDTLoss,
}

_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TERM_RE = re.compile(rf"^\s*(?:(?P<weight>{_NUMBER})\s*\*\s*)?(?P<name>[A-Za-z_]\w*)\s*$")


def _make(name: str) -> nn.Module:
    """Instantiate the registered loss ``name`` with default arguments."""
    key = name.strip().lower()
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[key]()


def _parse_terms(spec: str) -> list[tuple[float | None, str]]:
    """Parse ``"dice_bce+0.5*boundary"`` into ``[(None, "dice_bce"), (0.5, "boundary")]``."""
    terms = []
    for part in spec.split("+"):
        match = _TERM_RE.match(part)
        if match is None:
            raise ValueError(
                f"malformed loss spec {spec!r}: expected 'name' or a sum of '[weight*]name' "
                f"terms such as 'dice_bce+0.5*boundary'"
            )
        weight = match.group("weight")
        terms.append((None if weight is None else float(weight), match.group("name")))
    return terms


def build_loss(spec: str | Mapping[str, float]) -> nn.Module:
    """Build a loss from a name, a weighted-sum string or a ``{name: weight}`` mapping.

    Examples: ``"dice"``, ``"dice_bce+0.5*boundary"``, ``"0.7*dice + 0.3*focal"``,
    ``{"dice": 1.0, "boundary": 0.5}``. A bare name returns the loss itself; anything else
    returns a :class:`WeightedSumLoss`. Every term uses its default arguments.

    Raises:
        ValueError: Unknown loss name (the message lists the valid names) or malformed spec.
        TypeError: ``spec`` is neither a string nor a mapping.
    """
    if isinstance(spec, str):
        parsed = _parse_terms(spec)
        if len(parsed) == 1 and parsed[0][0] is None:
            return _make(parsed[0][1])
        terms = [(1.0 if w is None else w, name) for w, name in parsed]
    elif isinstance(spec, Mapping):
        if not spec:
            raise ValueError("loss spec mapping is empty; expected e.g. {'dice': 1.0}")
        terms = [(_mapping_weight(name, w), name) for name, w in spec.items()]
    else:
        raise TypeError(f"expected a loss spec as str or dict, got {type(spec).__name__}")
    return WeightedSumLoss([(weight, _make(name)) for weight, name in terms])


def _mapping_weight(name: object, weight: object) -> float:
    """Validate one ``name: weight`` entry of a mapping spec and return the weight."""
    if not isinstance(name, str):
        raise TypeError(f"loss names must be str, got {type(name).__name__}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"weight of loss {name!r} must be a number, got {weight!r}")
    return _check_non_negative(f"weight of loss {name!r}", weight)
