"""Intensity normalisation, resizing and post-processing shared by training and the runtime.

numpy only: the torch-free runtime imports this module, so training and deployment apply the
exact same arithmetic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

MODALITIES = ("ct", "mr", "uint8")


@dataclass(frozen=True)
class Preprocessing:
    """Per-modality normalisation and model resolution (stored in checkpoints and manifests).

    ct: clip HU to ``ct_window`` and scale to [0, 1].
    mr: clip to the volume's ``mr_percentiles`` and scale to [0, 1].
    uint8: already windowed 8-bit images (PNG/JPEG), divided by 255.
    The in-plane orientation convention (``orientation``) is the nibabel axis code of the
    (row, column, slice) axes of the training arrays: rows run from the patient's right to left,
    columns from posterior to anterior, slices inferior to superior.
    """

    resolution: int = 128
    ct_window: tuple[float, float] = (-150.0, 250.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    orientation: str = "LAS"
    resize: str = "bilinear (align_corners=False) for images, nearest for masks"
    modalities: tuple[str, ...] = field(default=MODALITIES)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        d["ct_window"] = tuple(d["ct_window"])
        d["mr_percentiles"] = tuple(d["mr_percentiles"])
        d["modalities"] = tuple(d.get("modalities", MODALITIES))
        return cls(**d)


def intensity_bounds(volume: np.ndarray, modality: str, pre: Preprocessing) -> tuple[float, float]:
    """(low, high) intensities mapped to 0 and 1 for a whole volume or image."""
    if modality == "ct":
        return pre.ct_window
    if modality == "mr":
        finite = volume[np.isfinite(volume)]
        if finite.size == 0:
            return 0.0, 1.0
        lo, hi = np.percentile(finite, pre.mr_percentiles)
        return float(lo), float(hi)
    if modality == "uint8":
        return 0.0, 255.0
    raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


def normalize(volume: np.ndarray, modality: str, pre: Preprocessing) -> np.ndarray:
    """Scale intensities to [0, 1] (float32, same shape). A constant MR input gives zeros."""
    lo, hi = intensity_bounds(volume, modality, pre)
    if hi <= lo:
        return np.zeros(volume.shape, dtype=np.float32)
    out = (volume.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights for 1D linear resampling, align_corners=False."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes: (..., H, W) -> (..., h, w), float32."""
    h, w = size
    x = images.astype(np.float32, copy=False)
    r0, r1, wr = _linear_weights(x.shape[-2], h)
    x = x[..., r0, :] * (1 - wr)[:, None] + x[..., r1, :] * wr[:, None]
    c0, c1, wc = _linear_weights(x.shape[-1], w)
    return (x[..., c0] * (1 - wc) + x[..., c1] * wc).astype(np.float32)


def resize_nearest(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes (any dtype): (..., H, W) -> (..., h, w)."""
    h, w = size
    rows = np.minimum((np.arange(h) + 0.5) * masks.shape[-2] / h, masks.shape[-2] - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) * masks.shape[-1] / w, masks.shape[-1] - 1).astype(int)
    return masks[..., rows, :][..., cols]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float32."""
    x = x.astype(np.float32, copy=False)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def logits_to_probability(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Model logits (N, h, w) -> probabilities on the input grid (N, H, W).

    Logits are resized bilinearly (smoother edges than resizing a binary mask) before the
    sigmoid.
    """
    return sigmoid(resize_bilinear(logits, size))
