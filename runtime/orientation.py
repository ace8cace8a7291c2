"""Bring volumes to the training orientation and masks back, exactly.

The model was trained on arrays whose (row, column, slice) axes have the nibabel axis codes in
the manifest (``"LAS"``: rows run from the patient's right to left, columns from posterior to
anterior, slices from inferior to superior). A volume is reoriented with the
``nibabel.orientations`` functions, which only permute and flip axes (no resampling), so the
inverse transform returns the mask onto exactly the input's voxel grid.

The orientation comes from the voxel-to-world affine: nibabel's for NIfTI files, and for DICOM
series the affine :func:`promptseg.data.readers.read_dicom_series` builds from
ImageOrientationPatient / ImagePositionPatient. Oblique volumes are mapped to the closest
axis-aligned orientation (``io_orientation``). Volumes that store no orientation (MRC) are
used as they are, with a warning. 2-D images (PNG/JPEG/TIFF) carry no orientation
and are used as they are: a 2-D image is assumed to be already in the training convention (the
brain and BTCV slices of the training data are).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _orientations():  # noqa: ANN202 - nibabel is a runtime dependency, imported lazily
    from nibabel import orientations

    return orientations


@dataclass(frozen=True)
class Reorientation:
    """A permutation/flip between an input grid and the training orientation.

    Attributes:
        forward: nibabel orientation transform (3, 2), input -> canonical.
        inverse: canonical -> input.
        input_shape: Spatial shape of the input (X, Y, Z).
        canonical_affine: Voxel -> world affine of the reoriented array (4, 4).
        input_axcodes: Axis codes of the input, e.g. ``"LPS"``.
        axcodes: Target axis codes, e.g. ``"LAS"``.
    """

    forward: np.ndarray
    inverse: np.ndarray
    input_shape: tuple[int, int, int]
    canonical_affine: np.ndarray
    input_axcodes: str
    axcodes: str

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.forward, [[0, 1], [1, 1], [2, 1]]))

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Input-grid array (X, Y, Z, ...) -> canonical (rows, columns, slices, ...)."""
        if tuple(data.shape[:3]) != self.input_shape:
            raise ValueError(
                f"expected an array of spatial shape {self.input_shape}, got {data.shape}"
            )
        return np.ascontiguousarray(_orientations().apply_orientation(data, self.forward))

    def undo(self, data: np.ndarray) -> np.ndarray:
        """Canonical array (rows, columns, slices, ...) -> input grid (X, Y, Z, ...)."""
        out = np.ascontiguousarray(_orientations().apply_orientation(data, self.inverse))
        if tuple(out.shape[:3]) != self.input_shape:
            raise ValueError(f"undo gave shape {out.shape}; expected {self.input_shape}")
        return out


def identity_reorientation(
    affine: np.ndarray, shape: tuple[int, ...], axcodes: str = "LAS"
) -> Reorientation:
    """A no-op transform for volumes that store no patient orientation (e.g. MRC)."""
    ident = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    return Reorientation(
        forward=ident,
        inverse=ident.copy(),
        input_shape=tuple(int(s) for s in shape[:3]),  # type: ignore[arg-type]
        canonical_affine=np.asarray(affine, dtype=np.float64),
        input_axcodes="unknown",
        axcodes=axcodes,
    )


def reorientation(
    affine: np.ndarray, shape: tuple[int, ...], axcodes: str = "LAS"
) -> Reorientation:
    """The transform taking a volume with ``affine`` to ``axcodes``.

    Args:
        affine: Voxel -> RAS+ world (4, 4).
        shape: Spatial shape (X, Y, Z) of the volume.
        axcodes: Target axis codes of (rows, columns, slices).

    Returns:
        The :class:`Reorientation` (apply / undo).
    """
    o = _orientations()
    if len(axcodes) != 3:
        raise ValueError(f"axcodes must name 3 axes, got {axcodes!r}")
    affine = np.asarray(affine, dtype=np.float64)
    source = o.io_orientation(affine)
    target = o.axcodes2ornt(tuple(axcodes))
    forward = o.ornt_transform(source, target)
    inverse = o.ornt_transform(target, source)
    shape3 = tuple(int(s) for s in shape[:3])
    canonical_affine = affine @ o.inv_ornt_aff(forward, shape3)
    return Reorientation(
        forward=forward,
        inverse=inverse,
        input_shape=shape3,  # type: ignore[arg-type]
        canonical_affine=canonical_affine,
        input_axcodes="".join(str(c) for c in o.ornt2axcodes(source)),
        axcodes=axcodes,
    )
