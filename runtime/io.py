"""Inputs and outputs of ``promptseg-run``: reading, output naming and write checks.

Inputs are NIfTI files, DICOM series (a folder, or one .dcm file inside it), MRC volumes or 2-D
images (PNG, JPEG, TIFF); reading goes through :mod:`promptseg.data.readers`, which raises
:class:`InputError` with a one-line message naming the file. Output paths are planned and
checked (not the input, writable folder, right suffix, no two inputs on one output) before any
inference, so a bad run leaves no partial output.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.data.readers import Volume, detect_kind, read_image_2d, read_volume
from promptseg.runtime.errors import InputError, PathLike, first_line

VOLUME_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png",)
_STRIP_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".mrc", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class Image2D:
    """A 2-D greyscale image.

    Attributes:
        data: (H, W) float32 in the file's value range.
        info: Reader facts: bit_depth, mode, was_rgb.
        source: The path it was read from.
    """

    data: np.ndarray
    info: dict[str, Any]
    source: str
    kind: str = "image"
    meta: dict[str, Any] = field(default_factory=dict)


def input_kind(path: PathLike) -> str:
    """ "nifti", "dicom", "mrc" or "image" (raises InputError for unknown or missing paths)."""
    p = Path(path)
    if not p.exists():
        raise InputError(
            path, "file or folder not found; expected a NIfTI file, a DICOM folder or a 2-D image"
        )
    return detect_kind(p)


def read_input(
    path: PathLike, *, volume_index: int | None = None, series_uid: str | None = None
) -> tuple[Volume | Image2D, list[str]]:
    """Read one input fully (so truncation and NaN/Inf are caught).

    Returns:
        The volume or image, and the warnings the readers raised (as one-line strings).

    Raises:
        InputError: Any bad input (one line naming the file).
    """
    kind = input_kind(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # record every note, whatever -W / PYTHONWARNINGS say
        try:
            result = _read(path, kind, volume_index, series_uid)
        except ImportError as exc:  # an optional reader (mrcfile, tifffile) is not installed
            raise InputError(path, first_line(exc)) from exc
    notes = [" ".join(str(w.message).split()) for w in caught]
    return result, notes


def _read(
    path: PathLike, kind: str, volume_index: int | None, series_uid: str | None
) -> Volume | Image2D:
    """Dispatch to the reader of ``kind``."""
    if kind == "image":
        if volume_index is not None:
            raise InputError(path, "--volume only applies to 4-D NIfTI files; this is a 2-D image")
        if series_uid is not None:
            raise InputError(path, "--series only applies to DICOM input; this is a 2-D image")
        data, info = read_image_2d(path)
        return Image2D(data, info, str(path))
    return read_volume(path, volume_index=volume_index, series_uid=series_uid)


def input_stem(path: PathLike) -> str:
    """Name an output after its input: file name without its suffix, or the DICOM folder name."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name or "series"
    if p.name.lower().endswith(".dcm"):
        return p.resolve().parent.name or "series"
    name = p.name
    for suffix in _STRIP_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def default_output(path: PathLike, is_2d: bool, folder: Path | None = None) -> Path:
    """``<stem>_mask.nii.gz`` / ``<stem>_mask.png`` in ``folder`` (default: beside the input)."""
    p = Path(path)
    if folder is None:
        base = p.resolve().parent
        if p.name.lower().endswith(".dcm"):  # the series is the folder: write beside it
            base = base.parent
        folder = base
    return folder / f"{input_stem(p)}_mask{'.png' if is_2d else '.nii.gz'}"


def labels_sidecar(output: Path) -> Path:
    """``<output without suffix>.labels.json`` beside a label-map output."""
    name = output.name
    for suffix in (".nii.gz", ".nii", ".png"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(f"{name}.labels.json")


def _probe_writable(folder: Path, target: PathLike) -> None:
    """Raise InputError unless a file can be created in ``folder`` (works as root too)."""
    if not folder.exists():
        raise InputError(target, f"cannot write: folder {folder} does not exist")
    if not folder.is_dir():
        raise InputError(target, f"cannot write: {folder} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".promptseg-probe-"):
            pass
    except OSError as exc:
        raise InputError(
            target, f"cannot write to folder {folder} ({exc.strerror or exc})"
        ) from exc


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(output: Path, inputs: list[Path], is_2d: bool, what: str = "output") -> None:
    """Check one output path before inference.

    Raises:
        InputError: Same path as an input, inside a path that is not a writable folder, a
            folder given where a file is expected, or the wrong suffix for the input kind.
    """
    for inp in inputs:
        if _same_path(output, inp) or any(_same_path(output, Path(f)) for f in _files_of(inp)):
            raise InputError(output, f"{what} path is the input itself; choose another -o path")
    if output.is_dir():
        raise InputError(output, f"is a folder; expected an {what} file path")
    if what == "output":
        name = output.name.lower()
        suffixes = IMAGE_SUFFIXES if is_2d else VOLUME_SUFFIXES
        if not name.endswith(suffixes):
            kind = "a 2-D image input needs a PNG mask" if is_2d else "a volume needs a NIfTI mask"
            raise InputError(output, f"unsupported output suffix; {kind} ({' or '.join(suffixes)})")
    _probe_writable(output.parent, output)


def _files_of(inp: Path) -> list[Path]:
    """A DICOM folder's files (an output must not replace one of them)."""
    if inp.is_dir():
        return [f for f in inp.iterdir() if f.is_file()]
    return []


def plan_outputs(inputs: list[Path], output: PathLike | None, kinds: list[str]) -> list[Path]:
    """Output path of each input.

    One input: ``output`` is the file (default beside the input). Several inputs: ``output``
    is a folder (created if missing, its parent must exist), outputs named after the inputs.

    Raises:
        InputError: A bad or colliding output path.
    """
    is_2d = [k == "image" for k in kinds]
    if len(inputs) == 1:
        out = Path(output) if output is not None else default_output(inputs[0], is_2d[0])
        check_output(out, inputs, is_2d[0])
        return [out]
    folder: Path | None = None
    if output is not None:
        folder = Path(output)
        if folder.exists() and not folder.is_dir():
            raise InputError(
                folder, "with several inputs -o must be a folder, got an existing file"
            )
        if not folder.exists():
            _probe_writable(folder.parent, folder)
    outs = [default_output(p, d, folder) for p, d in zip(inputs, is_2d)]
    seen: dict[Path, Path] = {}
    for out, inp, d in zip(outs, inputs, is_2d):
        key = out.resolve()
        if key in seen:
            raise InputError(
                inp, f"its output {out} collides with the output of {seen[key]}; rename one input"
            )
        seen[key] = inp
        if folder is None or folder.exists():
            check_output(out, inputs, d)
        else:
            for other in inputs:
                if _same_path(out, other):
                    raise InputError(
                        out, "output path is the input itself; choose another -o folder"
                    )
    return outs
