"""Pictures of segmentation masks: a 3-D surface view from two viewpoints plus an axial overlay.

``promptseg render`` and ``promptseg-run --render`` both end here. The picture is one PNG of
:data:`FIG_SIZE` inches at :data:`DPI` (1500 x 560 pixels): the masks' surfaces (marching cubes
from scikit-image, on the voxel grid scaled by the voxel size, so anisotropic scans keep their
true proportions) seen from the front (anterior view: the patient's right on the viewer's left)
and from the patient's left side, then the axial slice with the largest labelled area with the
masks drawn over it (radiological convention: anterior up, patient's right on the left). One
colour per label, the same in every panel, with a legend giving each label's volume.

Everything is first brought to the closest RAS+ voxel order with the file's affine (nibabel's
``io_orientation``), so the side labels are read from the file, never guessed; a file without
patient orientation (MRC) is drawn in its array order and the picture says so. An oblique
scan is drawn along its closest anatomical axes.

Only numpy and nibabel are imported at module level (no torch); matplotlib and scikit-image are
imported when a picture is drawn and, when missing, raise ImportError naming the
``promptseg[render]`` extra. Bad input raises :class:`~promptseg.data.readers.InputError` (one
line naming the file) before anything is written; the PNG is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.data.readers import Volume, read_volume
from promptseg.runtime.errors import InputError, PathLike
from promptseg.runtime.writers import atomic_write as _atomic_write

FIG_SIZE = (15.0, 5.6)
DPI = 100
MAX_LABELS = 20
FACE_BUDGET = 60_000  # triangles per picture; coarser marching-cubes steps beyond it
EXTRA = "promptseg[render]"
# (title, elevation, azimuth, side letters left/right/top/bottom) of matplotlib's camera in
# RAS+ millimetres: azimuth 90 puts the camera on +A (in front of the patient), 180 on -R (the
# patient's left side); the low elevation keeps the side letters true.
VIEWS = (
    ("anterior view", 10.0, 90.0, "RLSI"),
    ("left lateral view", 10.0, 180.0, "APSI"),
)


@dataclass
class Mask:
    """One labelled structure.

    Attributes:
        name: Legend text (prompt target, sidecar name or file name).
        data: bool (X, Y, Z) on the volume's voxel grid.
    """

    name: str
    data: np.ndarray


def check_available() -> None:
    """Raise ImportError naming the extra unless matplotlib and scikit-image import."""
    for module, package in (
        ("matplotlib", "matplotlib"),
        ("scipy.ndimage", "scipy"),
        ("skimage.measure", "scikit-image"),
    ):
        try:
            __import__(module)
        except ImportError as exc:
            raise ImportError(
                f"drawing pictures needs {package}; install it with pip install '{EXTRA}'"
            ) from exc


# --------------------------------------------------------------------------- reading


def _names_from_json(path: PathLike) -> dict[int, str]:
    """Label names from a ``promptseg-run`` sidecar or a plain ``{"1": "liver"}`` mapping."""
    p = Path(path)
    if not p.is_file():
        raise InputError(path, "labels file not found; expected a JSON file naming the labels")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    table = doc.get("labels", doc) if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        raise InputError(
            path, 'expected {"labels": {"1": {"target": ...}}} (promptseg-run) or {"1": "name"}'
        )
    names: dict[int, str] = {}
    for key, value in table.items():
        if not str(key).isdigit() or int(key) < 1:
            if table is doc and key in ("format", "version", "input", "mask", "background"):
                continue
            raise InputError(path, f"label key {key!r} is not a positive integer")
        if isinstance(value, dict):
            value = value.get("target") or value.get("name") or value.get("prompt")
        if not isinstance(value, str) or not value.strip():
            raise InputError(path, f"label {key} has no name (got {value!r})")
        names[int(key)] = value.strip()
    return names


def _sidecar_of(mask_path: Path) -> Path | None:
    """``<mask>.labels.json`` beside a label map, as ``promptseg-run`` writes it, if present."""
    name = mask_path.name
    for suffix in (".nii.gz", ".nii", ".mrc"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    side = mask_path.with_name(f"{name}.labels.json")
    return side if side.is_file() else None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mrc", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_grid(mask: Volume, volume: Volume, path: PathLike) -> None:
    if mask.data.shape != volume.data.shape:
        raise InputError(
            path,
            f"mask shape {tuple(mask.data.shape)} does not match the volume's "
            f"{tuple(volume.data.shape)} ({volume.source}); expected a mask on the volume's grid",
        )
    if not np.allclose(mask.affine, volume.affine, atol=1e-2, rtol=1e-4):
        raise InputError(
            path,
            f"voxel-to-world affine differs from the volume's ({volume.source}); "
            "resample the mask onto the volume's grid first",
        )


def _integer_labels(data: np.ndarray, path: PathLike) -> np.ndarray:
    if data.min() < 0 or not np.array_equal(data, np.round(data)):
        raise InputError(
            path, "not a mask: expected integer values, 0 background and 1..K (or 255) labels"
        )
    return data.astype(np.int64)


def read_masks(
    volume: Volume, mask_paths: Sequence[PathLike], labels_json: PathLike | None = None
) -> list[Mask]:
    """Masks on ``volume``'s grid, one per label.

    One file: every non-zero value is a label, named by ``labels_json``, else by the
    ``<mask>.labels.json`` sidecar beside it, else by the file name (one label) or
    ``label <k>``. Several files: each file's non-zero voxels are one structure named after
    the file (overlaps allowed).

    Raises:
        InputError: A missing or unreadable file, a mask on another grid, non-integer values,
            more than :data:`MAX_LABELS` labels, or a bad labels file.
    """
    paths = [Path(p) for p in mask_paths]
    if not paths:
        raise InputError("MASK", "no mask given; expected one label map or several mask files")
    if labels_json is not None and len(paths) > 1:
        raise InputError(labels_json, "a labels file names the values of one label map only")
    masks: list[Mask] = []
    for p in paths:
        if not p.exists():
            raise InputError(p, "mask file not found")
        mask = read_volume(p)
        _check_grid(mask, volume, p)
        data = _integer_labels(mask.data, p)
        if len(paths) > 1:
            masks.append(Mask(_stem(p), data > 0))
            continue
        values = [int(v) for v in np.unique(data) if v != 0]
        side = labels_json if labels_json is not None else _sidecar_of(p)
        names = _names_from_json(side) if side is not None else {}
        if len(set(values) | set(names)) > MAX_LABELS:
            raise InputError(p, f"{len(values)} labels; at most {MAX_LABELS} can be drawn")
        if names:
            # Named labels absent from the map are drawn as "(empty)" in the legend.
            masks += [Mask(names[k], data == k) for k in sorted(names)]
            masks += [Mask(f"label {k}", data == k) for k in values if k not in names]
        elif len(values) <= 1:
            masks.append(Mask(_stem(p), data > 0))
        else:
            masks += [Mask(f"label {k}", data == k) for k in values]
    return masks


def read_inputs(
    volume_path: PathLike, mask_paths: Sequence[PathLike], labels_json: PathLike | None = None
) -> tuple[Volume, list[Mask]]:
    """Read the volume and its masks (see :func:`read_masks`); InputError on bad input."""
    if not Path(volume_path).exists():
        raise InputError(volume_path, "volume file not found")
    volume = read_volume(volume_path)
    return volume, read_masks(volume, mask_paths, labels_json)


# --------------------------------------------------------------------------- geometry


def _to_ras(
    volume: Volume, masks: list[Mask]
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """Volume and masks in the closest RAS+ voxel order, voxel size (mm) and the orientation.

    Returns:
        image (X, Y, Z), masks, spacing (3,) and nibabel's (3, 2) orientation array: row i
        holds the file axis that became axis i and whether it was flipped (-1).
    """
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(volume.affine)
    image = apply_orientation(volume.data, ornt)
    data = [apply_orientation(m.data, ornt) for m in masks]
    zooms = np.sqrt((volume.affine[:3, :3] ** 2).sum(0))
    # apply_orientation moves file axis i to position ornt[i, 0].
    spacing = np.empty(3)
    for i in range(3):
        spacing[int(ornt[i, 0])] = zooms[i]
    return image, data, spacing, ornt


def _surface(mask: np.ndarray, spacing: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes triangles (F, 3, 3) in mm and their unit normals (F, 3).

    The cropped mask is smoothed (about 1.5 mm, at least 0.6 voxel) and linearly resampled
    towards isotropic voxels (at most 4x per axis), so thick slices give sloped surfaces
    instead of stairs; a structure thinner than the smoothing keeps a lower iso-level.
    """
    from scipy.ndimage import gaussian_filter, zoom
    from skimage.measure import marching_cubes

    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, mask.shape)
    crop = np.pad(mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], 2).astype(np.float32)
    crop = gaussian_filter(crop, sigma=np.maximum(0.6, 1.5 / spacing))
    coarse = np.array(crop.shape)
    factor = np.clip(np.round(spacing / spacing.min()), 1, 4)
    if np.any(factor > 1):
        crop = zoom(crop, factor, order=1)
    fine = spacing / factor
    level = min(0.5, float(crop.max()) / 2)
    step = 1
    while True:
        verts, faces, _, _ = marching_cubes(crop, level, spacing=tuple(fine), step_size=step)
        if len(faces) <= budget or step >= 8:
            break
        step *= 2
    # The zoom maps sample 0 to voxel 0 and the last sample to the last voxel.
    scale = (coarse - 1) / np.maximum(np.array(crop.shape) - 1, 1) * factor
    verts = verts * scale + (lo - 2) * spacing
    tris = verts[faces]
    normals = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return tris, normals


def _camera(elev: float, azim: float) -> np.ndarray:
    e, a = np.radians(elev), np.radians(azim)
    return np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])


# --------------------------------------------------------------------------- drawing


def _colours(n: int) -> list[tuple[float, float, float]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [tuple(cmap(i % cmap.N)[:3]) for i in range(n)]


def _draw_3d(
    ax: Any,
    surfaces: list[tuple[np.ndarray, np.ndarray] | None],
    colours: list[tuple[float, float, float]],
    title: str,
    elev: float,
    azim: float,
    lo: np.ndarray,
    hi: np.ndarray,
    letters: str,
) -> None:
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    eye = _camera(elev, azim)
    light = eye + np.array([0.0, 0.0, 0.6])
    light /= np.linalg.norm(light)
    # One collection for every structure, so depth sorting is per triangle, not per structure.
    tris, faces = [], []
    for surf, colour in zip(surfaces, colours):
        if surf is not None:
            shade = 0.3 + 0.7 * np.abs(surf[1] @ light)
            faces.append(np.clip(np.asarray(colour)[None, :] * shade[:, None], 0, 1))
            tris.append(surf[0])
    if tris:
        ax.add_collection3d(
            Poly3DCollection(
                np.concatenate(tris), facecolors=np.concatenate(faces), edgecolors="none"
            )
        )
    ax.view_init(elev=elev, azim=azim)
    pad = 0.03 * (hi - lo).max()
    ax.set_xlim(lo[0] - pad, hi[0] + pad)
    ax.set_ylim(lo[1] - pad, hi[1] + pad)
    ax.set_zlim(lo[2] - pad, hi[2] + pad)
    ax.set_box_aspect(tuple(hi - lo + 2 * pad), zoom=1.25)
    ax.set_axis_off()
    if letters:
        _side_letters(ax, letters, "black")
    ax.set_title(title, fontsize=10)


def _side_letters(ax: Any, letters: str, colour: str) -> None:
    """Anatomical direction letters at the left, right, top and bottom edge of a panel."""
    spots = ((0.02, 0.5), (0.98, 0.5), (0.5, 0.97), (0.5, 0.03))
    for (x, y), letter in zip(spots, letters):
        ax.text2D(x, y, letter, transform=ax.transAxes, color=colour, fontsize=11,
                  fontweight="bold", ha="center", va="center")  # fmt: skip


def _axial(
    image: np.ndarray, data: list[np.ndarray], oriented: bool
) -> tuple[int, np.ndarray, list[np.ndarray]]:
    """Slice index with the largest labelled area and that slice in display order."""
    union = np.zeros(image.shape, bool)
    for d in data:
        union |= d
    area = union.reshape(-1, union.shape[2]).sum(0)
    k = int(np.argmax(area)) if area.any() else image.shape[2] // 2

    def show(a: np.ndarray) -> np.ndarray:
        # (X=R+, Y=A+) -> rows anterior first, columns patient's right first (radiological).
        return a[:, :, k].T[::-1, ::-1] if oriented else a[:, :, k].T

    return k, show(image), [show(d) for d in data]


def draw(
    volume: Volume,
    masks: list[Mask],
    out: PathLike,
    *,
    title: str | None = None,
) -> dict[str, Any]:
    """Draw the picture of ``masks`` over ``volume`` and write it atomically as a PNG.

    Args:
        volume: The scan (X, Y, Z) with its affine.
        masks: Structures on the volume's grid (see :func:`read_masks`).
        out: Target .png path (its folder must exist).
        title: Figure title (default: the volume's file name).

    Returns:
        ``path``, ``size`` (width, height in pixels), ``axial_slice`` and ``axial_axis`` (the
        drawn slice's index along the file's axis closest to superior), ``labels`` (name, voxels, volume_ml per mask) and
        ``empty`` (names of masks without voxels; a fully empty picture says so in place of the
        surfaces).

    Raises:
        ImportError: matplotlib or scikit-image is missing (names the extra).
        InputError: A mask not on the volume's grid, too many masks, or an unwritable ``out``.
    """
    check_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _check_masks(volume, masks)
    from promptseg.runtime.orientation import orientation_known

    oriented = orientation_known(volume)
    image, data, spacing, ornt = _to_ras(volume, masks)
    colours = _colours(len(masks))
    counts = [int(d.sum()) for d in data]
    empty = [m.name for m, c in zip(masks, counts) if c == 0]
    surfaces, lo, hi = _surfaces(data, counts, spacing, image.shape)

    fig = plt.figure(figsize=FIG_SIZE, dpi=DPI)
    grid = fig.add_gridspec(1, 3, left=0.01, right=0.99, bottom=0.13, top=0.88, wspace=0.04)
    _draw_views(fig, grid, surfaces, colours, lo, hi, oriented)
    k_file, file_axis = _draw_axial_panel(
        fig.add_subplot(grid[0, 2]), image, data, spacing, ornt, colours, oriented
    )
    labels = _legend(fig, masks, counts, colours, float(np.prod(spacing)) / 1000.0)
    sx, sy, sz = spacing
    fig.suptitle(
        f"{title or Path(volume.source).name}   "
        f"({image.shape[0]}x{image.shape[1]}x{image.shape[2]} voxels of "
        f"{sx:.2f}x{sy:.2f}x{sz:.2f} mm)",
        fontsize=12,
    )

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=DPI)

    try:
        _atomic_write(out, save)
    finally:
        plt.close(fig)
    width, height = (int(round(v * DPI)) for v in FIG_SIZE)
    return {
        "path": str(out),
        "size": [width, height],
        "axial_slice": k_file,
        "axial_axis": file_axis,
        "labels": labels,
        "empty": empty,
    }


def _check_masks(volume: Volume, masks: list[Mask]) -> None:
    """At least one and at most :data:`MAX_LABELS` masks, each on the volume's grid."""
    if not masks:
        raise InputError("MASK", "no mask to draw")
    if len(masks) > MAX_LABELS:
        raise InputError("MASK", f"{len(masks)} masks; at most {MAX_LABELS} can be drawn")
    for m in masks:
        if m.data.shape != volume.data.shape:
            raise InputError(
                m.name, f"mask shape {m.data.shape} does not match the volume's {volume.data.shape}"
            )


def _surfaces(
    data: list[np.ndarray], counts: list[int], spacing: np.ndarray, shape: tuple[int, ...]
) -> tuple[list[tuple[np.ndarray, np.ndarray] | None], np.ndarray, np.ndarray]:
    """Surface meshes of the non-empty masks (X, Y, Z) and the bounds (mm) the views share."""
    budget = FACE_BUDGET // max(1, sum(c > 0 for c in counts))
    surfaces = [_surface(d, spacing, budget) if c else None for d, c in zip(data, counts)]
    if any(s is not None for s in surfaces):
        pts = np.concatenate([s[0].reshape(-1, 3) for s in surfaces if s is not None])
        return surfaces, pts.min(0), pts.max(0)
    return surfaces, np.zeros(3), np.array(shape) * spacing


def _draw_views(
    fig: Any,
    grid: Any,
    surfaces: list[tuple[np.ndarray, np.ndarray] | None],
    colours: list[tuple[float, float, float]],
    lo: np.ndarray,
    hi: np.ndarray,
    oriented: bool,
) -> None:
    """The two 3-D views of :data:`VIEWS` in the first two columns of ``grid``."""
    for col, (view, elev, azim, letters) in enumerate(VIEWS):
        ax = fig.add_subplot(grid[0, col], projection="3d")
        if not oriented:
            view, letters = f"{view} of the array axes (orientation unknown)", ""
        _draw_3d(ax, surfaces, colours, view, elev, azim, lo, hi, letters)
        if all(s is None for s in surfaces):
            ax.text2D(
                0.5, 0.5, "empty mask: no labelled voxels", transform=ax.transAxes,
                ha="center", va="center", fontsize=12, color="firebrick",
            )  # fmt: skip


def _draw_axial_panel(
    ax: Any,
    image: np.ndarray,
    data: list[np.ndarray],
    spacing: np.ndarray,
    ornt: np.ndarray,
    colours: list[tuple[float, float, float]],
    oriented: bool,
) -> tuple[int, int]:
    """The axial slice with the largest labelled area, masks overlaid.

    Returns:
        The slice index and the axis in the file's own indexing (the file axis that became
        superior, maybe flipped).
    """
    k, plane, planes = _axial(image, data, oriented)
    file_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    k_file = image.shape[2] - 1 - k if ornt[file_axis, 1] < 0 else k
    vmin, vmax = (float(v) for v in np.percentile(image, [1, 99.5]))
    aspect = spacing[1] / spacing[0]
    ax.imshow(plane, cmap="gray", vmin=vmin, vmax=max(vmax, vmin + 1e-6), aspect=aspect)
    for p, colour in zip(planes, colours):
        if p.any():
            rgba = np.zeros((*p.shape, 4))
            rgba[p] = (*colour, 0.4)
            ax.imshow(rgba, aspect=aspect, interpolation="nearest")
            ax.contour(p.astype(float), levels=[0.5], colors=[colour], linewidths=1.0)
    ax.set_axis_off()
    note = "" if any(d.any() for d in data) else " - empty mask"
    where = f"slice {k_file} of {image.shape[2]} along file axis {file_axis}"
    ax.set_title(f"axial {where} (largest labelled area){note}", fontsize=10)
    if oriented:
        for (x, y), letter in zip(((0.03, 0.5), (0.97, 0.5), (0.5, 0.97), (0.5, 0.03)), "RLAP"):
            ax.text(x, y, letter, transform=ax.transAxes, color="yellow", fontsize=11,
                    fontweight="bold", ha="center", va="center")  # fmt: skip
    return k_file, file_axis


def _legend(
    fig: Any,
    masks: list[Mask],
    counts: list[int],
    colours: list[tuple[float, float, float]],
    voxel_ml: float,
) -> list[dict[str, Any]]:
    """The legend (name and volume per mask); returns the ``labels`` entries of :func:`draw`."""
    from matplotlib.patches import Patch

    labels = []
    handles = []
    for m, c, colour in zip(masks, counts, colours):
        ml = c * voxel_ml
        labels.append({"name": m.name, "voxels": c, "volume_ml": round(ml, 3)})
        text = f"{m.name}: {ml:.1f} ml" if c else f"{m.name}: empty"
        handles.append(Patch(facecolor=colour, edgecolor="black", label=text))
    fig.legend(
        handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=10,
        frameon=False, bbox_to_anchor=(0.5, 0.01),
    )  # fmt: skip
    return labels


def check_output(out: PathLike, inputs: Sequence[PathLike] = ()) -> Path:
    """Validate a picture path before any work: .png suffix, not an input, existing folder."""
    p = Path(out)
    if not p.name.lower().endswith(".png"):
        raise InputError(out, "picture path must end in .png")
    if p.is_dir():
        raise InputError(out, "is a folder; expected a .png file path")
    for inp in inputs:
        if p.resolve() == Path(inp).resolve():
            raise InputError(out, "picture path is an input file; choose another path")
    if not p.parent.is_dir():
        raise InputError(out, f"cannot write: folder {p.parent} does not exist")
    return p


def render(
    volume_path: PathLike,
    mask_paths: Sequence[PathLike],
    out: PathLike,
    *,
    labels_json: PathLike | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Read a volume and its masks and write the picture (the API of ``promptseg render``).

    Everything is read and checked before the PNG is drawn; bad input raises InputError and
    writes nothing. See :func:`draw` for the returned facts.
    """
    extra = [labels_json] if labels_json is not None else []
    check_output(out, [volume_path, *mask_paths, *extra])
    check_available()
    volume, masks = read_inputs(volume_path, mask_paths, labels_json)
    return draw(volume, masks, out, title=title)
