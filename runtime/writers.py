"""Atomic writers: every file the project writes goes through :func:`atomic_write`.

A file is written to a temporary name beside its target (``.tmp-<random>-<name>``, so
suffix-sniffing writers such as nibabel, PIL or matplotlib keep the format), given the usual
permissions (``0o666`` less the umask) and renamed into place with ``os.replace``. On any
failure the temporary file is removed and the target is left untouched. nibabel and PIL are
imported inside the writers that need them.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.runtime.errors import InputError, PathLike, first_line


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(
    path: PathLike,
    write: Callable[[Path], Any],
    error: Callable[[Path, str], Exception] = InputError,
) -> Path:
    """Write a file through ``write(tmp)`` into a temp file, then rename it to ``path``.

    Args:
        path: Final file path.
        write: Writes the complete file to the path it is given.
        error: Builds the exception raised on an OS error, from the target and the reason
            (default :class:`InputError`, one line naming the file).

    Returns:
        The final path.

    Raises:
        InputError (or what ``error`` builds): the folder is missing or not writable.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise error(target, f"cannot write: folder {target.parent} does not exist")
    tmp = target.parent / f".tmp-{secrets.token_hex(6)}-{target.name}"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as exc:
        raise error(target, f"cannot write ({exc.strerror or first_line(exc)})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_text_atomic(text: str, path: PathLike) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(obj: Any, path: PathLike, indent: int = 2, **dumps: Any) -> Path:
    """Write ``obj`` as JSON (indented, newline-terminated) atomically."""
    return write_text_atomic(json.dumps(obj, indent=indent, **dumps) + "\n", path)


def write_figure_atomic(fig: Any, path: PathLike, **savefig: Any) -> Path:
    """Save a matplotlib figure atomically (the format follows the suffix of ``path``)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, **savefig))


def _check_dtype(data: np.ndarray, dtype: Any) -> np.ndarray:
    """Cast numeric ``data`` to ``dtype``; raise TypeError for non-numeric data."""
    arr = np.asarray(data)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"cannot write array of dtype {arr.dtype}; expected bool, int or float")
    return arr.astype(dtype, copy=False)


def nifti_image(
    data: np.ndarray, affine: np.ndarray, header: Any = None, dtype: Any = np.uint8
) -> Any:
    """A nibabel Nifti1Image of ``data`` cast to ``dtype`` (scale slope 1, intercept 0)."""
    nib = importlib.import_module("nibabel")
    arr = _check_dtype(data, dtype)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    return img


def write_nifti_atomic(
    data: np.ndarray,
    affine: np.ndarray,
    path: PathLike,
    header: Any = None,
    dtype: Any = np.uint8,
) -> Path:
    """Write a NIfTI file atomically (.nii.gz is gzip-compressed).

    Args:
        data: Array (X, Y, Z) (any numeric dtype; cast to ``dtype``).
        affine: (4, 4) voxel -> RAS+ mm.
        path: Target .nii or .nii.gz path.
        header: Optional nibabel header to reuse (e.g. ``Volume.meta["nifti_header"]``).
        dtype: On-disk data type.

    Returns:
        The written path.
    """
    nib = importlib.import_module("nibabel")
    img = nifti_image(data, affine, header, dtype)
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def write_png_atomic(array: np.ndarray, path: PathLike) -> Path:
    """Write a uint8 (H, W) array as a greyscale PNG atomically.

    Raises:
        TypeError: ``array`` is not uint8.
        ValueError: ``array`` is not 2-D.
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise TypeError(f"write_png_atomic needs uint8 data, got {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"write_png_atomic needs a 2-D (H, W) array, got shape {arr.shape}")
    pil = importlib.import_module("PIL.Image")
    image = pil.fromarray(arr)
    return atomic_write(path, lambda tmp: image.save(str(tmp), format="PNG"))
