"""Bring volumes to the training orientation and masks back, exactly.

The model was trained on arrays whose (row, column, slice) axes have the nibabel axis codes in
the manifest (``"LAS"``: rows run from the patient's right to left, columns from posterior to
anterior, slices from inferior to superior). A volume is reoriented with the
``nibabel.orientations`` functions, which only permute and flip axes (no resampling), so the
inverse transform returns the mask onto exactly the input's voxel grid.

The orientation comes from the voxel-to-world affine: nibabel's for NIfTI files, and for DICOM
series the affine :func:`promptseg.data.readers.read_dicom_series` builds from
ImageOrientationPatient / ImagePositionPatient. Oblique volumes are mapped to the closest
axis-aligned orientation (``io_orientation``). Volumes that store no orientation (MRC, NIfTI
with qform_code and sform_code 0) are used as they are, with a warning
(:func:`volume_reorientation`). 2-D images (PNG/JPEG/TIFF) carry no orientation
and are used as they are: a 2-D image is assumed to be already in the training convention (the
brain and BTCV slices of the training data are).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from promptseg.data.readers import Volume


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

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Input-grid array (X, Y, Z, ...) -> canonical (rows, columns, slices, ...)."""
        return np.ascontiguousarray(self._view(data))

    def slices(self, data: np.ndarray) -> np.ndarray:
        """Input-grid volume (X, Y, Z) -> canonical slices (slices, rows, columns), one copy."""
        return np.ascontiguousarray(self._view(data).transpose(2, 0, 1))

    def _view(self, data: np.ndarray) -> np.ndarray:
        """The canonical (rows, columns, slices, ...) view of an input-grid array (no copy)."""
        if tuple(data.shape[:3]) != self.input_shape:
            raise ValueError(
                f"expected an array of spatial shape {self.input_shape}, got {data.shape}"
            )
        return _orientations().apply_orientation(data, self.forward)

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


def orientation_known(volume: Volume) -> bool:
    """Whether a volume's affine carries its patient orientation (MRC files never do)."""
    return bool(volume.meta.get("orientation_known", volume.kind != "mrc"))


def volume_reorientation(volume: Volume, axcodes: str = "LAS") -> tuple[Reorientation, str | None]:
    """The transform of a :class:`~promptseg.data.readers.Volume` to ``axcodes``.

    Returns:
        The :class:`Reorientation` and None, or, for a volume that stores no patient
        orientation (``meta["orientation_known"]`` False; MRC by default), the identity
        transform and a one-line warning saying the volume is used as it is.
    """
    if orientation_known(volume):
        return reorientation(volume.affine, volume.data.shape, axcodes), None
    warning = (
        f"the file stores no patient orientation; used as it is (assumed {axcodes}, "
        "left/right targets are unreliable)"
    )
    return identity_reorientation(volume.affine, volume.data.shape, axcodes), warning
