"""Mask post-processing (numpy + SciPy, no torch): keep the largest 3D connected component.

A liver, a spleen or one kidney is a single connected organ, so every other component of its
predicted mask is a false positive (a stray blob in the other flank, a fragment of a
neighbouring organ). Tumours may be multifocal and are never reduced. The rule applies to
volumes only: on one 2D slice an organ may legitimately appear in several pieces.
"""

from __future__ import annotations

import numpy as np

SINGLE_COMPONENT_TARGETS = frozenset({"liver", "spleen", "left kidney", "right kidney"})
POSTPROCESS_MODES = ("largest", "none")


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a bool (Z, H, W) mask: (int labels, 1..n; number n)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D (Z, H, W) mask, got shape {mask.shape}")
    return ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of a bool (Z, H, W) mask (empty stays empty).

    Size is the voxel count. Components tied for the largest size are all kept, so the result
    does not depend on the scan order of the array (a flipped volume gives the flipped mask).
    """
    labels, n = label_components(mask)
    if n <= 1:
        return np.asarray(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (sizes == sizes.max())[labels]


def applies(target: str, mode: str, is_volume: bool) -> bool:
    """Whether ``mode`` reduces ``target``'s mask (organs in volumes with mode "largest")."""
    if mode not in POSTPROCESS_MODES:
        raise ValueError(f"postprocess must be one of {POSTPROCESS_MODES}, got {mode!r}")
    return mode == "largest" and is_volume and target in SINGLE_COMPONENT_TARGETS
