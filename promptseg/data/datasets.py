"""The four shared datasets as cases: (slices, per-target masks), in the training orientation.

A :class:`Case` is a stack of axial slices (Z, H, W) at its native grid with one mask per
target. ``masks[target]`` is a bool (Z, H, W) array (all False when the target is known to be
absent: a true negative), and a target that the dataset does not annotate is missing from
``masks`` (never used as a negative). Rows run from the patient's right to left (liver at
low row index), as the CHAOS arrays and BTCV PNGs do.

Dataset kinds: ``brain-tumor``, ``chaos-mr``, ``btcv-ct``, ``lits-ct``.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptseg.prompts import TARGETS

KINDS = ("brain-tumor", "chaos-mr", "btcv-ct", "lits-ct")
# Licence: nothing from these may ship; per-case outputs about them stay in a folder of their
# name, which .gitignore keeps local (results/**/btcv-ct/*.csv, results/**/lits-ct/*.csv).
LOCAL_ONLY = ("btcv-ct", "lits-ct")
ABDOMEN = ("liver", "spleen", "left kidney", "right kidney")
BRAIN = ("glioma", "meningioma", "pituitary tumour")
BRAIN_LABELS = {1: "meningioma", 2: "glioma", 3: "pituitary tumour"}
CHAOS_LABELS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
BTCV_ORGANS = {
    "liver": "liver",
    "spleen": "spleen",
    "kidney_left": "left kidney",
    "kidney_right": "right kidney",
}
# Split of the datasets whose ids must be listed (brain tumour file numbers, CHAOS patients):
# written by make_splits, pinned in the package. BTCV and LiTS splits are rules, kept here.
SPLITS_FILE = Path(__file__).with_name("partition.json")
RULE_SPLITS = {
    "btcv-ct": {"train": [1, 5, 7, 9, 20], "val": [15]},  # volume 15 held out; 9, 20 in -extra
    "lits-ct": {"train": {"slices": [0, 88]}, "val": {"slices": [96, 128]}},  # 8-slice gap
}


@dataclass
class Case:
    """One evaluation/training unit: (Z, H, W) slices with per-target bool masks."""

    case_id: str
    dataset: str
    modality: str  # "ct", "mr" or "uint8" (how to normalise ``image``)
    image: np.ndarray  # (Z, H, W) float32, raw intensities
    masks: dict[str, np.ndarray]
    spacing: tuple[float, float, float]  # (slice, row, column) mm
    is_volume: bool
    meta: dict = field(default_factory=dict)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32)


def _missing(root: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{root}: expected {what} (see the dataset layout in the README)")


# ---------------------------------------------------------------- brain tumour (Cheng et al.)


def brain_ids(root: Path) -> list[int]:
    """File numbers N of every row of labels.csv, sorted."""
    return sorted(int(Path(r["file"]).stem) for r in _brain_rows(root))


def _brain_rows(root: Path) -> list[dict]:
    table = root / "labels.csv"
    if not table.is_file():
        raise _missing(root, "labels.csv with columns file,mask,label,label_name")
    with open(table, newline="") as fh:
        return list(csv.DictReader(fh))


def load_brain(root: Path, ids: set[int] | None = None) -> Iterator[Case]:
    """Brain tumour MRI slices: one case per slice, absent tumour classes are negatives."""
    for row in _brain_rows(root):
        n = int(Path(row["file"]).stem)
        if ids is not None and n not in ids:
            continue
        image = _read_png(root / row["file"])
        mask = _read_png(root / row["mask"]) > 127
        label = BRAIN_LABELS[int(row["label"])]
        masks = {t: np.zeros((1, *mask.shape), bool) for t in TARGETS}
        masks[label] = mask[None]
        yield Case(
            f"brain/{n}",
            "brain-tumor",
            "uint8",
            image[None],
            masks,
            (1.0, 1.0, 1.0),
            False,
            {"label": label},
        )


# ---------------------------------------------------------------- CHAOS MR T2-SPIR


def chaos_ids(root: Path) -> list[int]:
    ids = sorted(
        int(m.group(1))
        for p in root.glob("image_*.nii*")
        if (m := re.match(r"image_(\d+)\.nii", p.name))
    )
    if not ids:
        raise _missing(root, "image_<pid>.nii.gz and label_<pid>.nii.gz files")
    return ids


def load_chaos(root: Path, ids: set[int] | None = None) -> Iterator[Case]:
    """CHAOS MR volumes: slices along the third axis, (X, Y) in-plane as rows, columns."""
    import nibabel as nib

    for pid in chaos_ids(root):
        if ids is not None and pid not in ids:
            continue
        img = nib.load(str(root / f"image_{pid}.nii.gz"))
        lab = np.asarray(nib.load(str(root / f"label_{pid}.nii.gz")).dataobj).astype(np.int16)
        data = np.asarray(img.dataobj, dtype=np.float32)
        zooms = img.header.get_zooms()[:3]
        image = np.ascontiguousarray(np.transpose(data, (2, 0, 1)))
        lab = np.transpose(lab, (2, 0, 1))
        masks = {t: np.zeros(image.shape, bool) for t in TARGETS}
        for value, name in CHAOS_LABELS.items():
            masks[name] = lab == value
        # CHAOS subjects are healthy: no liver tumour, no brain tumour.
        yield Case(
            f"chaos/{pid}",
            "chaos-mr",
            "mr",
            image,
            masks,
            (float(zooms[2]), float(zooms[0]), float(zooms[1])),
            True,
            {"affine": img.affine},
        )


# ---------------------------------------------------------------- BTCV CT slices


_BTCV_NAME = re.compile(r"image_SABS_(\d+)_slice(\d+)_(liver|spleen|kidney_left|kidney_right)\.png")


def _btcv_index(root: Path) -> dict[tuple[int, int], dict[str, Path]]:
    index: dict[tuple[int, int], dict[str, Path]] = {}
    for p in sorted((root / "img").glob("image_SABS_*.png")):
        m = _BTCV_NAME.fullmatch(p.name)
        if m:
            key = (int(m.group(1)), int(m.group(2)))
            index.setdefault(key, {})[BTCV_ORGANS[m.group(3)]] = p
    if not index:
        raise _missing(root, "img/image_SABS_<vol>_slice<k>_<organ>.png and label/ files")
    return index


def btcv_ids(root: Path) -> list[int]:
    return sorted({vol for vol, _ in _btcv_index(root)})


def load_btcv(root: Path, ids: set[int] | None = None) -> Iterator[Case]:
    """BTCV CT slices: one case per (volume, slice); organs without a file are negatives."""
    for (vol, k), files in sorted(_btcv_index(root).items()):
        if ids is not None and vol not in ids:
            continue
        image = _read_png(next(iter(files.values())))
        masks = {t: np.zeros((1, *image.shape), bool) for t in TARGETS if t != "liver tumour"}
        for organ, path in files.items():
            label = root / "label" / path.name.replace("image_", "label_", 1)
            masks[organ] = (_read_png(label) > 0)[None]
        yield Case(
            f"btcv/{vol}/{k}",
            "btcv-ct",
            "uint8",
            image[None],
            masks,
            (1.0, 1.0, 1.0),
            False,
            {"volume": vol, "slice": k},
        )


# ---------------------------------------------------------------- LiTS CT volume


def lits_ids(root: Path) -> list[int]:
    ids = sorted(
        int(m.group(1))
        for p in root.glob("img_*.mrc")
        if (m := re.match(r"img_(\d+)\.mrc", p.name))
    )
    if not ids:
        raise _missing(root, "img_<id>.mrc and lab_<id>.mrc files")
    return ids


def load_lits(
    root: Path, ids: set[int] | None = None, slices: tuple[int, int] | None = None
) -> Iterator[Case]:
    """LiTS CT (HU) volumes, slices along the first axis; label 1 liver, 2 tumour.

    The crop's in-plane orientation is not recorded, so only the non-lateral targets
    (liver, liver tumour; brain tumours as negatives) are used, with orientation augmentation.
    Kidneys and spleen are not annotated and are therefore left out of ``masks``.
    """
    import mrcfile

    for vid in lits_ids(root):
        if ids is not None and vid not in ids:
            continue
        with mrcfile.open(root / f"img_{vid}.mrc", permissive=True) as m:
            image = np.asarray(m.data, dtype=np.float32).copy()
        with mrcfile.open(root / f"lab_{vid}.mrc", permissive=True) as m:
            lab = np.asarray(m.data).astype(np.int16)
        if slices is not None:
            image, lab = image[slices[0] : slices[1]], lab[slices[0] : slices[1]]
        masks = {"liver": lab > 0, "liver tumour": lab == 2}
        masks.update({t: np.zeros(image.shape, bool) for t in BRAIN})
        yield Case(
            f"lits/{vid}",
            "lits-ct",
            "ct",
            image,
            masks,
            (1.0, 1.0, 1.0),
            True,
            {"orientation_known": False},
        )


# ---------------------------------------------------------------- splits


def make_splits(data_root: Path) -> dict:
    """Deterministic leakage-free train/val splits (``partition.json`` plus :data:`RULE_SPLITS`).

    brain-tumor: file numbers sorted and cut into 20 contiguous blocks; blocks 3, 8, 13, 18
    are validation (neighbouring numbers share patients). chaos-mr: patients 1, 19, 36 are
    validation. btcv-ct: volume 15 is validation. lits-ct (one volume): axial slices 0-87
    train, 96-127 validation (8-slice gap).
    """
    ids = brain_ids(data_root / "brain-tumor-cheng")
    blocks = np.array_split(np.array(ids), 20)
    val = sorted(int(n) for b in (3, 8, 13, 18) for n in blocks[b])
    return {
        "brain-tumor": {"train": sorted(set(ids) - set(val)), "val": val},
        "chaos-mr": {
            "train": [p for p in chaos_ids(data_root / "chaos-mr-t2spir") if p not in (1, 19, 36)],
            "val": [1, 19, 36],
        },
        **RULE_SPLITS,
    }


def load_splits() -> dict:
    """Every dataset's split: the pinned id lists of ``partition.json`` and :data:`RULE_SPLITS`."""
    with open(SPLITS_FILE) as fh:
        return {**json.load(fh), **json.loads(json.dumps(RULE_SPLITS))}


def splits_sha256() -> str:
    """SHA-256 of the whole split definition (:func:`load_splits` and the extra train folders)."""
    definition = {
        **load_splits(),
        "extra_train_folders": EXTRA_TRAIN_FOLDERS,
        "tune": TUNE_RULES,
    }
    blob = json.dumps(definition, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# Training-only folders beside a dataset's own: every case in them belongs to the train split
# (the brain extras keep clear of the validation blocks; the BTCV extras are whole volumes).
EXTRA_TRAIN_FOLDERS = {
    "brain-tumor": "brain-tumor-cheng-extra",
    "btcv-ct": "btcv-ct-slices-extra",
}

# The ``tune`` split: cases taken out of ``train`` for choices made on training data (the
# checkpoint, the presence thresholds), so that ``val`` stays untouched by them. Brain tumour:
# the extra folder's file numbers in this closed range (glioma, meningioma and pituitary);
# CHAOS: two training patients; BTCV: the extra volume 9.
TUNE_RULES = {
    "brain-tumor": {"extra_file_numbers": [385, 1054]},
    "chaos-mr": [37, 38],
    "btcv-ct": [9],
}
SPLIT_NAMES = ("train", "tune", "val")

DATASET_FOLDERS = {
    "brain-tumor": "brain-tumor-cheng",
    "chaos-mr": "chaos-mr-t2spir",
    "btcv-ct": "btcv-ct-slices",
    "lits-ct": "lits-ct",
}


def load_cases(kind: str, root: Path, split: str | None = None) -> Iterator[Case]:
    """Every case of a dataset folder, or only those of a documented split.

    The ``train`` split also takes the cases of the dataset's training-only folder
    (:data:`EXTRA_TRAIN_FOLDERS`) when it sits beside ``root``; the ``tune`` split is the part of
    the training data set aside by :data:`TUNE_RULES` (never in ``train``).
    """
    root = Path(root)
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {list(KINDS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    sel = None
    if split is not None:
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r} for {kind}; expected one of {SPLIT_NAMES}")
        sel = load_splits()[kind].get(split)
    if split is not None and root.name == EXTRA_TRAIN_FOLDERS.get(kind):
        # the training-only folder itself: its train or tune part, never validation
        return iter(()) if split == "val" else _extra_cases(kind, root, tune=split == "tune")
    if split == "tune" and kind not in TUNE_RULES:
        return iter(())
    if split is None or split == "val" or kind not in TUNE_RULES:
        cases = _load_folder(kind, root, sel)
        if split == "train" and kind in EXTRA_TRAIN_FOLDERS:
            cases = itertools.chain(cases, _load_extra(kind, root, tune=False))
        return cases
    tune = TUNE_RULES[kind]
    if kind == "brain-tumor":
        main = _load_folder(kind, root, sel) if split == "train" else iter(())
        return itertools.chain(main, _load_extra(kind, root, tune=split == "tune"))
    ids = set(load_splits()[kind]["train"]) - set(tune)
    main = _load_folder(kind, root, sorted(ids) if split == "train" else sorted(tune))
    extra = _load_extra(kind, root, tune=split == "tune")
    return itertools.chain(main, extra)


def _load_extra(kind: str, root: Path, tune: bool) -> Iterator[Case]:
    """The cases of ``kind``'s training-only folder that are (``tune``) or are not in ``tune``."""
    extra = root.parent / EXTRA_TRAIN_FOLDERS.get(kind, "-")
    if kind not in EXTRA_TRAIN_FOLDERS or not extra.is_dir():
        return iter(())
    return _extra_cases(kind, extra, tune)


def _extra_cases(kind: str, extra: Path, tune: bool) -> Iterator[Case]:
    """The cases of the training-only folder ``extra`` in (``tune``) or out of the tune split."""
    rule = TUNE_RULES.get(kind, [])
    if kind == "brain-tumor":
        lo, hi = rule["extra_file_numbers"]
        ids = [n for n in brain_ids(extra) if (lo <= n <= hi) == tune]
    else:
        ids = [n for n in btcv_ids(extra) if (n in rule) == tune]
    return _load_folder(kind, extra, ids)


def _load_folder(kind: str, root: Path, sel: list | dict | None) -> Iterator[Case]:
    if kind == "brain-tumor":
        return load_brain(root, set(sel) if sel is not None else None)
    if kind == "chaos-mr":
        return load_chaos(root, set(sel) if sel is not None else None)
    if kind == "btcv-ct":
        return load_btcv(root, set(sel) if sel is not None else None)
    return load_lits(root, None, tuple(sel["slices"]) if sel is not None else None)
