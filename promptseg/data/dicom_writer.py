"""Write a real DICOM series from a volume (test support; numpy-only at import time).

The series uses the same axis convention as :func:`promptseg.data.readers.read_dicom_series`:
``volume_xyz[i, j, k]`` with i = column index, j = row index and k = slice index, so slice k is
stored as ``volume_xyz[:, :, k].T`` (rows, columns) and reading the files back returns the same
array. Slice k lies at ``origin + k * spacing[2] * normal`` (LPS mm) with
``normal = cross(row cosine, column cosine)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.data.readers import PathLike, _import_optional

_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
_INT16_MIN, _INT16_MAX = -32768, 32767


def _ds(value: float) -> str:
    """Format a number as a DICOM decimal string (at most 16 characters)."""
    return f"{float(value):.10g}"


def _rescale(volume: np.ndarray) -> tuple[float, float]:
    """Choose (slope, intercept) so the volume fits int16; exact for int16-range integers.

    Returns:
        Slope and intercept as they will be stored (already rounded to DS precision).
    """
    vmin, vmax = float(volume.min()), float(volume.max())
    integral = bool(np.all(np.equal(np.round(volume), volume)))
    if integral and vmin >= _INT16_MIN and vmax <= _INT16_MAX:
        return 1.0, 0.0
    slope = (vmax - vmin) / (_INT16_MAX - _INT16_MIN) if vmax > vmin else 1.0
    slope = float(_ds(slope))
    intercept = float(_ds(vmin - _INT16_MIN * slope))
    return slope, intercept


def _to_int16(plane: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Quantise float values (rows, cols) to stored int16 pixels."""
    stored = np.round((plane.astype(np.float64) - intercept) / slope)
    return np.clip(stored, _INT16_MIN, _INT16_MAX).astype("<i2")


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of range(n) that is not the identity (for n > 1)."""
    perm = rng.permutation(n)
    if n > 1 and np.array_equal(perm, np.arange(n)):
        perm = np.roll(perm, 1)
    return perm


def _file_meta(pydicom: Any, sop_class: str, sop_uid: str) -> Any:
    """Build the Part 10 file meta information (explicit VR little endian)."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    return meta


def _slice_dataset(pydicom: Any, common: dict[str, Any], pixels: np.ndarray) -> Any:
    """Build one slice's dataset from the shared attributes and its int16 (rows, cols) pixels."""
    sop_uid = pydicom.uid.generate_uid()
    ds = pydicom.dataset.FileDataset(
        "", {}, file_meta=_file_meta(pydicom, common["SOPClassUID"], sop_uid), preamble=b"\0" * 128
    )
    for key, value in common.items():
        setattr(ds, key, value)
    ds.SOPInstanceUID = sop_uid
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.PixelData = pixels.tobytes()
    return ds


def _save(pydicom: Any, ds: Any, path: Path) -> None:
    """Save a dataset as a DICOM Part 10 file on pydicom 2.x or 3.x."""
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)


def _common_attributes(
    modality: str,
    series_uid: str,
    spacing: Sequence[float],
    orientation: Sequence[float],
    description: str,
    uid_factory: Any,
) -> dict[str, Any]:
    """Attributes shared by every slice of the series."""
    return {
        "SOPClassUID": _SOP_CLASS[modality],
        "Modality": modality,
        "PatientName": "PROMPTSEG^TEST",
        "PatientID": "PROMPTSEG-TEST",
        "PatientPosition": "HFS",
        "StudyInstanceUID": uid_factory(),
        "FrameOfReferenceUID": uid_factory(),
        "SeriesInstanceUID": series_uid,
        "SeriesNumber": 1,
        "SeriesDescription": description,
        "ImageOrientationPatient": [_ds(v) for v in orientation],
        "PixelSpacing": [_ds(spacing[1]), _ds(spacing[0])],
        "SliceThickness": _ds(spacing[2]),
        "SpacingBetweenSlices": _ds(spacing[2]),
    }


def write_dicom_series(
    volume_xyz: np.ndarray,
    folder: PathLike,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 2.0),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (0, 0, 0),
    modality: str = "MR",
    series_uid: str | None = None,
    shuffle_files: bool = True,
    seed: int = 0,
    description: str = "promptseg test series",
) -> list[Path]:
    """Write a volume as a DICOM series, one file per slice.

    Args:
        volume_xyz: Array (columns, rows, slices) of intensities.
        folder: Output folder (created if missing).
        spacing: (column spacing along a row, row spacing, slice spacing) in mm.
        orientation: ImageOrientationPatient (row cosine, column cosine), LPS.
        origin: ImagePositionPatient of slice 0 (LPS mm).
        modality: "MR" or "CT".
        series_uid: SeriesInstanceUID (a new one if None).
        shuffle_files: Shuffle file names and scramble InstanceNumber so that neither gives the
            slice order.
        seed: Seed for the shuffling.
        description: SeriesDescription.

    Returns:
        The written files, in slice order (index k of the volume).
    """
    pydicom = _import_optional("pydicom")
    volume = np.asarray(volume_xyz)
    if volume.ndim != 3:
        raise ValueError(f"volume_xyz must be 3-D (X, Y, Z), got shape {volume.shape}")
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be one of {sorted(_SOP_CLASS)}, got {modality!r}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    uid = series_uid or pydicom.uid.generate_uid()
    common = _common_attributes(
        modality, uid, spacing, orientation, description, pydicom.uid.generate_uid
    )
    cos = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(cos[:3], cos[3:])
    slope, intercept = _rescale(volume)
    n = volume.shape[2]
    rng = np.random.default_rng(seed)
    names = _derangement(n, rng) if shuffle_files else np.arange(n)
    numbers = _derangement(n, rng) if shuffle_files else np.arange(n)
    tag = hashlib.sha1(uid.encode()).hexdigest()[:8]
    files: list[Path] = []
    for k in range(n):
        ds = _slice_dataset(pydicom, common, _to_int16(volume[:, :, k].T, slope, intercept))
        position = np.asarray(origin, dtype=np.float64) + k * float(spacing[2]) * normal
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.InstanceNumber = int(numbers[k]) + 1
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        path = out / f"IM_{tag}_{int(names[k]):04d}.dcm"
        if path.exists():
            raise FileExistsError(f"{path} already exists")
        _save(pydicom, ds, path)
        files.append(path)
    return files
