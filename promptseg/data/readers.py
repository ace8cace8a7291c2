"""Readers for medical volumes and 2-D images (the atomic writers live in :mod:`promptseg.runtime.writers`).

Only numpy and the standard library are imported at module level. nibabel, pydicom, mrcfile,
PIL and tifffile are imported inside the functions that need them, so the torch-free runtime can
import this module with a minimal install.

Every bad input raises :class:`InputError` with a one-line message that starts with the path.

Axis conventions (all readers return a :class:`Volume` with ``data`` of shape (X, Y, Z)):

* NIfTI: the file's own voxel order, ``affine`` is nibabel's voxel -> RAS+ mm matrix.
* DICOM: ``data[i, j, k]`` with i = column index, j = row index (the transposed
  ``pixel_array``), k = slice index ordered by position along the slice normal
  ``cross(row cosine, column cosine)``. The affine maps (i, j, k) to RAS+ mm like nibabel's
  (and dcm2niix's output) does, so a DICOM series and its NIfTI conversion agree.
* MRC: ``data[x, y, z]`` (mrcfile's ``data[z, y, x]`` transposed); the affine is a diagonal
  scaling by the voxel size since MRC stores no patient orientation.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from promptseg.runtime.errors import InputError, PathLike, first_line
from promptseg.runtime.writers import (  # noqa: F401 - their old home; import them from there
    atomic_write as _atomic_write,
)
from promptseg.runtime.writers import (  # noqa: F401
    write_nifti_atomic,
    write_png_atomic,
    write_text_atomic,
)

_EXTRAS: dict[str, str] = {
    "nibabel": "promptseg",
    "PIL": "promptseg",
    "pydicom": "promptseg[dicom]",
    "highdicom": "promptseg[dicom]",
    "mrcfile": "promptseg[train]",
    "tifffile": "promptseg[train]",
}
_SUFFIXES: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".dcm": "dicom",
    ".mrc": "mrc",
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
    ".tif": "image",
    ".tiff": "image",
}
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"II*\x00", "a TIFF image"),
    (0, b"MM\x00*", "a TIFF image"),
    (128, b"DICM", "a DICOM file"),
    (0, b"\x1f\x8b", "gzip data"),
)
_DICOM_SPACING_RTOL = 0.01


@dataclass
class Volume:
    """A 3-D scan with its geometry.

    Attributes:
        data: float32 array (X, Y, Z) in the file's voxel order (see module docstring).
        affine: float64 (4, 4) voxel index -> RAS+ world mm.
        spacing: Voxel size (mm) along X, Y, Z.
        source: Path the volume was read from.
        kind: "nifti", "dicom" or "mrc".
        meta: Extra facts (e.g. "modality", "series_uid", "nifti_header").
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _import_optional(module: str) -> ModuleType:
    """Import an optional dependency or raise ImportError naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = _EXTRAS.get(top, "promptseg")
        raise ImportError(
            f"reading this file needs the '{top}' package: pip install '{extra}'"
        ) from exc


def _sniff(path: Path) -> str | None:
    """Guess what a file really holds from its magic bytes (None if unknown)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    for offset, magic, what in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return what
    return None


def _check_file(path: PathLike, expected: str) -> Path:
    """Return ``Path(path)`` after checking it is an existing, non-empty file."""
    p = Path(path)
    if not p.exists():
        raise InputError(path, f"file not found; expected {expected}")
    if p.is_dir():
        raise InputError(path, f"is a folder; expected {expected} file")
    if p.stat().st_size == 0:
        raise InputError(path, f"empty file (0 bytes); expected {expected}")
    return p


def _check_finite(path: PathLike, data: np.ndarray) -> None:
    """Raise InputError if ``data`` holds NaN or Inf values."""
    n_nan = int(np.count_nonzero(np.isnan(data)))
    n_inf = int(np.count_nonzero(np.isinf(data)))
    if n_nan or n_inf:
        raise InputError(
            path,
            f"contains {n_nan} NaN and {n_inf} Inf voxels out of {data.size}; "
            "expected finite intensities",
        )


def _spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) as the column norms of the affine's 3x3 part."""
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


# --------------------------------------------------------------------------- NIfTI


def _nifti_reason(path: Path, exc: BaseException) -> str:
    """Explain why nibabel could not read a file."""
    if isinstance(exc, EOFError) or "end-of-stream" in str(exc):
        return "truncated gzip stream"
    what = _sniff(path)
    if what is not None and what != "gzip data":
        return f"the file holds {what}"
    if "not a gzip file" in str(exc).lower():
        return "not gzip-compressed although the name ends in .gz"
    if "bytes from file" in str(exc):
        return f"truncated data: {first_line(exc)}"
    return first_line(exc).replace(str(path), "file")


def _load_nifti(path: Path) -> tuple[Any, np.ndarray]:
    """Load a NIfTI image and force a full read of its voxels.

    Returns:
        The nibabel image and its voxel array (any shape, scaled by nibabel).
    """
    nib = _import_optional("nibabel")
    try:
        img = nib.load(str(path), mmap=False)
        if not isinstance(img, nib.Nifti1Image):
            raise InputError(path, f"is a {type(img).__name__}, not a NIfTI file")
        kind = img.get_data_dtype().kind
        if kind not in "biuf":
            raise InputError(path, f"unsupported NIfTI data type {img.get_data_dtype()}")
        arr = np.asanyarray(img.dataobj)
    except InputError:
        raise
    except Exception as exc:  # nibabel/gzip/zlib raise many unrelated types
        raise InputError(path, f"not a valid NIfTI file ({_nifti_reason(path, exc)})") from exc
    return img, arr


def _pick_volume(path: Path, arr: np.ndarray, volume_index: int | None) -> np.ndarray:
    """Reduce a NIfTI array to 3-D, picking ``volume_index`` from a 4-D series.

    Args:
        path: Source path (for messages).
        arr: Array of shape (X, Y, Z) or (X, Y, Z, T).
        volume_index: Which of the T volumes to keep (needed when T > 1).

    Returns:
        Array (X, Y, Z).
    """
    shape = tuple(int(s) for s in arr.shape)
    if arr.ndim not in (3, 4):
        raise InputError(path, f"got a {arr.ndim}-D image of shape {shape}; expected a 3-D volume")
    if arr.ndim == 3:
        if volume_index not in (None, 0):
            raise InputError(path, f"--volume {volume_index} given but the image is 3-D {shape}")
        return arr
    n = shape[3]
    if volume_index is None and n == 1:
        return arr[..., 0]
    if volume_index is None:
        raise InputError(
            path,
            f"4-D image of shape {shape} holds {n} volumes; "
            f"pick one with --volume N (0 to {n - 1})",
        )
    if not 0 <= volume_index < n:
        raise InputError(
            path, f"--volume {volume_index} is out of range for shape {shape}; use 0 to {n - 1}"
        )
    return arr[..., volume_index]


def read_nifti(path: PathLike, volume_index: int | None = None) -> Volume:
    """Read a NIfTI-1/2 volume (.nii or .nii.gz).

    Args:
        path: The file.
        volume_index: Volume to take from a 4-D file whose 4th axis is longer than 1.

    Returns:
        Volume with float32 data (X, Y, Z) and nibabel's voxel -> RAS+ affine;
        ``meta["orientation_known"]`` is False when the header's qform_code and sform_code are
        both 0 (no patient orientation stored; nibabel's affine only scales by the voxel size).

    Raises:
        InputError: Missing, empty, truncated or non-NIfTI file; not 3-D; NaN/Inf voxels.
    """
    p = _check_file(path, "a NIfTI volume")
    img, arr = _load_nifti(p)
    return nifti_volume(img, path, volume_index, arr)


def nifti_volume(
    img: Any, source: PathLike, volume_index: int | None = None, arr: np.ndarray | None = None
) -> Volume:
    """A :class:`Volume` of an in-memory nibabel NIfTI image (checked like :func:`read_nifti`).

    Args:
        img: A nibabel ``Nifti1Image`` (or ``Nifti2Image``).
        source: What to name in messages and ``Volume.source``.
        volume_index: Volume of a 4-D image.
        arr: The image's voxel array when already read (default: ``img.dataobj``).
    """
    if arr is None:
        arr = np.asanyarray(img.dataobj)
    arr = _pick_volume(Path(source), arr, volume_index)
    data = np.asarray(arr, dtype=np.float32)
    _check_finite(source, data)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(source, "invalid voxel-to-world affine (singular or non-finite)")
    nib = _import_optional("nibabel")
    meta = {
        "nifti_header": img.header,
        "orig_dtype": str(img.get_data_dtype()),
        "axcodes": "".join(nib.aff2axcodes(affine)),
        "volume_index": volume_index,
        "orientation_known": _nifti_orientation_known(img.header),
    }
    return Volume(data, affine, _spacing_from_affine(affine), str(source), "nifti", meta)


def _nifti_orientation_known(header: Any) -> bool:
    """False when qform_code and sform_code are both 0 (nibabel's affine is then a guess)."""
    return int(header["qform_code"]) != 0 or int(header["sform_code"]) != 0


# --------------------------------------------------------------------------- DICOM


@dataclass
class _Slice:
    """Header facts of one DICOM image file."""

    path: Path
    series_uid: str
    description: str
    orientation: np.ndarray  # (6,) row cosine then column cosine, LPS
    position: np.ndarray  # (3,) ImagePositionPatient, LPS mm
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    shape: tuple[int, int]  # (rows, columns)
    modality: str
    thickness: float  # SpacingBetweenSlices or SliceThickness (mm), for one-slice series


def _slice_header(path: Path) -> _Slice | None:
    """Read one file's DICOM header; None if it is not a DICOM image slice."""
    pydicom = _import_optional("pydicom")
    errors = _import_optional("pydicom.errors")
    try:
        ds = pydicom.dcmread(str(path), force=False, stop_before_pixels=True)
    except errors.InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise InputError(path, f"corrupt DICOM file ({first_line(exc)})") from exc
    needed = ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient")
    if not all(name in ds for name in needed):
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(path, "multi-frame DICOM is not supported; expected one slice per file")
    spacing = ds.get("PixelSpacing", [1.0, 1.0])
    return _Slice(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        description=str(ds.get("SeriesDescription", "")),
        orientation=np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64),
        position=np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        shape=(int(ds.Rows), int(ds.Columns)),
        modality=str(ds.get("Modality", "")),
        thickness=float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 1.0),
    )


def _scan_folder(folder: Path) -> dict[str, list[_Slice]]:
    """Group the DICOM image files directly inside ``folder`` by SeriesInstanceUID."""
    series: dict[str, list[_Slice]] = {}
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        if file.stat().st_size == 0:
            continue
        header = _slice_header(file)
        if header is not None:
            series.setdefault(header.series_uid, []).append(header)
    return series


def _choose_series(
    folder: PathLike, series: dict[str, list[_Slice]], series_uid: str | None
) -> list[_Slice]:
    """Return the slices of the requested series, or raise listing the choices."""
    if not series:
        raise InputError(folder, "no DICOM image slices found; expected a DICOM series folder")
    listing = "; ".join(
        f"{uid} '{s[0].description}' ({len(s)} slices)" for uid, s in sorted(series.items())
    )
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(folder, f"series {series_uid} not found; available: {listing}")
        return series[series_uid]
    if len(series) > 1:
        raise InputError(
            folder, f"holds {len(series)} DICOM series; pick one with --series UID: {listing}"
        )
    return next(iter(series.values()))


def _sort_slices(folder: PathLike, slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """Order slices by position along the normal; check they share one geometry.

    Returns:
        The sorted slices and their positions (n,) along the normal in mm.
    """
    first = slices[0]
    for s in slices[1:]:
        if s.shape != first.shape or not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise InputError(
                folder, f"{s.path.name} differs in size or orientation from {first.path.name}"
            )
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    pos = np.asarray([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    if len(pos) > 1 and np.min(np.diff(pos)) < 1e-3:
        raise InputError(
            folder,
            "several slices share one position; the series may hold several echoes, "
            "phases or time points; expected one slice per position",
        )
    return [slices[i] for i in order], pos


def _check_spacing(folder: PathLike, pos: np.ndarray) -> float:
    """Slice spacing (mm) from sorted positions; warn if it is not uniform."""
    if len(pos) < 2:
        return float("nan")
    gaps = np.diff(pos)
    step = float(np.median(gaps))
    if np.max(np.abs(gaps - step)) > _DICOM_SPACING_RTOL * step + 1e-3:
        warnings.warn(
            f"{folder}: slice spacing is not uniform ({gaps.min():.3f} to {gaps.max():.3f} mm); "
            "missing slices? the volume is treated as evenly spaced",
            stacklevel=3,
        )
    return step


def _dicom_affine(slices: list[_Slice]) -> np.ndarray:
    """Voxel (column i, row j, slice k) -> RAS+ mm affine of sorted slices (4, 4)."""
    first = slices[0]
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    row_spacing, col_spacing = first.pixel_spacing
    if len(slices) > 1:
        slice_vec = (slices[-1].position - first.position) / (len(slices) - 1)
    else:
        slice_vec = np.cross(row_cos, col_cos) * first.thickness
    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing  # i moves along a row: one column per step
    lps[:3, 1] = col_cos * row_spacing  # j moves down a column: one row per step
    lps[:3, 2] = slice_vec
    lps[:3, 3] = first.position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _slice_pixels(path: Path) -> tuple[np.ndarray, Any]:
    """Read one slice's rescaled pixels as float32 (columns, rows) and its dataset."""
    pydicom = _import_optional("pydicom")
    try:
        ds = pydicom.dcmread(str(path), force=False)
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # missing decoders raise RuntimeError/NotImplementedError
        raise InputError(path, f"cannot decode DICOM pixel data ({first_line(exc)})") from exc
    if pixels.ndim != 2:
        raise InputError(path, f"pixel data of shape {pixels.shape}; expected one 2-D slice")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    values = pixels.astype(np.float64) * slope + intercept
    return values.T.astype(np.float32), ds


def read_dicom_series(folder: PathLike, series_uid: str | None = None) -> Volume:
    """Read one DICOM series from the files directly inside a folder.

    Non-DICOM files (README, DICOMDIR, ...) are skipped. Slices are ordered by their position
    along the slice normal (not by InstanceNumber or file name) and rescaled with
    RescaleSlope/RescaleIntercept.

    Args:
        folder: Folder holding the series' files.
        series_uid: SeriesInstanceUID to read when the folder holds several series.

    Returns:
        Volume with data (columns, rows, slices) float32 and a voxel -> RAS+ affine built from
        ImageOrientationPatient, PixelSpacing and ImagePositionPatient (LPS, first two rows
        negated).

    Raises:
        InputError: Missing folder, no images, several series without ``series_uid``,
            inconsistent or duplicate slices, undecodable pixels.
    """
    p = Path(folder)
    if not p.is_dir():
        raise InputError(folder, "folder not found; expected a folder of DICOM files")
    slices = _choose_series(folder, _scan_folder(p), series_uid)
    slices, pos = _sort_slices(folder, slices)
    step = _check_spacing(folder, pos)
    planes: list[np.ndarray] = []
    ds: Any = None
    for s in slices:
        plane, ds = _slice_pixels(s.path)
        planes.append(plane)
    data = np.stack(planes, axis=-1)
    _check_finite(folder, data)
    affine = _dicom_affine(slices)
    meta = {
        "modality": slices[0].modality,
        "series_uid": slices[0].series_uid,
        "series_description": slices[0].description,
        "files": [str(s.path) for s in slices],
        "patient_position": str(ds.get("PatientPosition", "")),
        "slice_spacing": step,
    }
    return Volume(data, affine, _spacing_from_affine(affine), str(folder), "dicom", meta)


# --------------------------------------------------------------------------- MRC


def _mrc_xyz(data: np.ndarray, header: Any) -> np.ndarray:
    """Reorder mrcfile's (sections, rows, columns) array to (X, Y, Z)."""
    crs = data.transpose(2, 1, 0)
    axes = [int(header.mapc), int(header.mapr), int(header.maps)]
    if sorted(axes) != [1, 2, 3]:
        return crs
    return crs.transpose([axes.index(a) for a in (1, 2, 3)])


def read_mrc(path: PathLike) -> Volume:
    """Read a 3-D MRC volume.

    Args:
        path: The .mrc file.

    Returns:
        Volume with float32 data (X, Y, Z) and a diagonal affine of the voxel size; a zero voxel
        size (not stored) becomes 1.0 mm with ``meta["voxel_size_missing"] = True``.

    Raises:
        InputError: Missing, empty or invalid file; not 3-D; NaN/Inf voxels.
    """
    p = _check_file(path, "an MRC volume")
    mrcfile = _import_optional("mrcfile")
    try:
        with mrcfile.open(str(p), mode="r", permissive=False) as mrc:
            raw = np.asarray(mrc.data)
            xyz = _mrc_xyz(raw, mrc.header) if raw.ndim == 3 else raw
            data = np.array(xyz, dtype=np.float32)
            vox = mrc.voxel_size
            size = (float(vox.x), float(vox.y), float(vox.z))
    except Exception as exc:  # mrcfile raises ValueError/OSError/EOFError for bad files
        raise InputError(path, f"not a valid MRC file ({first_line(exc)})") from exc
    if data.ndim != 3:
        shape = tuple(int(s) for s in data.shape)
        raise InputError(path, f"got a {data.ndim}-D MRC of shape {shape}; expected a 3-D volume")
    _check_finite(path, data)
    missing = any(s <= 0 for s in size)
    spacing = (1.0, 1.0, 1.0) if missing else size
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    meta = {"voxel_size_missing": missing, "orientation_known": False}
    return Volume(data, affine, spacing, str(path), "mrc", meta)


# --------------------------------------------------------------------------- 2-D images


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luminance of (H, W, C>=3) -> (H, W) float32."""
    weights = np.array([0.299, 0.587, 0.114])
    return (rgb[..., :3].astype(np.float64) @ weights).astype(np.float32)


def _pil_bit_depth(mode: str) -> int:
    """Bits per sample of a PIL mode."""
    if mode.startswith("I;16"):
        return 16
    return 32 if mode in ("I", "F") else 8


def _read_pil(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an image with PIL; returns (H, W) float32 and info."""
    pil = _import_optional("PIL.Image")
    with pil.open(str(path)) as img:
        img.load()
        mode = img.mode
        if mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif mode == "1":
            img = img.convert("L")
        arr = np.asarray(img)
    was_rgb = arr.ndim == 3 and arr.shape[2] >= 3
    if arr.ndim == 3:
        arr = _luminance(arr) if was_rgb else arr[..., 0]
    info = {"bit_depth": _pil_bit_depth(mode), "mode": mode, "was_rgb": was_rgb}
    return np.asarray(arr, dtype=np.float32), info


def _read_tifffile(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a TIFF PIL cannot handle (float, 16-bit RGB, ...) with tifffile."""
    tifffile = _import_optional("tifffile")
    arr = np.asarray(tifffile.imread(str(path), key=0))
    was_rgb = arr.ndim == 3 and arr.shape[2] in (3, 4)
    if was_rgb:
        gray = _luminance(arr)
    elif arr.ndim == 2:
        gray = arr.astype(np.float32)
    else:
        raise InputError(path, f"TIFF page of shape {arr.shape}; expected a 2-D image")
    info = {
        "bit_depth": arr.dtype.itemsize * 8,
        "mode": f"tifffile:{arr.dtype}",
        "was_rgb": was_rgb,
    }
    return gray, info


def read_image_2d(path: PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a PNG, JPEG or TIFF image as greyscale.

    Args:
        path: The image file.

    Returns:
        (H, W) float32 in the file's own value range (RGB/RGBA become BT.601 luminance) and
        info {"bit_depth": 8 | 16 | 32, "mode": str, "was_rgb": bool}.

    Raises:
        InputError: Missing, empty, truncated or unreadable image; NaN/Inf pixels.
    """
    p = _check_file(path, "a PNG, JPEG or TIFF image")
    pil = _import_optional("PIL.Image")
    is_tiff = p.name.lower().endswith((".tif", ".tiff"))
    try:
        try:
            image, info = _read_pil(p)
        except (pil.UnidentifiedImageError, OSError, ValueError, TypeError):
            if not is_tiff:
                raise
            image, info = _read_tifffile(p)
    except (InputError, ImportError):
        raise
    except Exception as exc:  # PIL/tifffile raise many types for corrupt files
        what = _sniff(p)
        reason = f"the file holds {what}" if what else first_line(exc).replace(str(p), "file")
        raise InputError(path, f"not a readable PNG/JPEG/TIFF image ({reason})") from exc
    _check_finite(path, image)
    return image, info


def read_mask_2d(path: PathLike) -> np.ndarray:
    """Read a 2-D mask image as a boolean (H, W) array (pixels > 0 are foreground)."""
    image, _ = read_image_2d(path)
    return image > 0


# --------------------------------------------------------------------------- dispatch


def detect_kind(path: PathLike) -> str:
    """Tell the input kind from the path: "nifti", "dicom", "image" or "mrc".

    A folder is a DICOM series; files are recognised by suffix.

    Raises:
        InputError: Unknown suffix (or a missing path without a known suffix).
    """
    p = Path(path)
    if p.is_dir():
        return "dicom"
    name = p.name.lower()
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    if not p.exists():
        raise InputError(path, "file or folder not found")
    supported = ", ".join(_SUFFIXES) + " or a DICOM folder"
    raise InputError(path, f"unknown file type; supported: {supported}")


def read_volume(
    path: PathLike, *, volume_index: int | None = None, series_uid: str | None = None
) -> Volume:
    """Read a 3-D volume of any supported kind.

    Args:
        path: NIfTI file, MRC file, DICOM folder, or one .dcm file (its folder's series is read,
            the file's own series unless ``series_uid`` is given).
        volume_index: Volume of a 4-D NIfTI.
        series_uid: Series to read from a DICOM folder holding several.

    Returns:
        The Volume.

    Raises:
        InputError: Bad input, or a 2-D image where a volume is expected.
    """
    kind = detect_kind(path)
    if volume_index is not None and kind != "nifti":
        raise InputError(path, "--volume only applies to 4-D NIfTI files")
    if series_uid is not None and kind != "dicom":
        raise InputError(path, "--series only applies to DICOM input")
    if kind == "nifti":
        return read_nifti(path, volume_index)
    if kind == "mrc":
        return read_mrc(path)
    if kind == "image":
        raise InputError(path, "is a 2-D image; expected a 3-D volume (NIfTI, DICOM or MRC)")
    p = Path(path)
    if p.is_dir():
        return read_dicom_series(p, series_uid)
    header = _slice_header(_check_file(path, "a DICOM file"))
    if header is None:
        raise InputError(path, "not a DICOM image slice")
    return read_dicom_series(p.parent, series_uid or header.series_uid)
