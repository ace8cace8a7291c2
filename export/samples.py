"""Real slices for the FP16 range audit and the export self-verification.

CHAOS MR validation patients (slices through the abdominal organs) and brain tumour validation
slices (every tumour class), normalised with the checkpoint's numpy preprocessing and resized to
the model resolution exactly as the runtime does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptseg.export.files import ExportInputError
from promptseg.preprocess import Preprocessing, normalize, resize_bilinear

DATA_ENV = "PROMPTSEG_DATA_ROOT"


@dataclass
class SliceSet:
    """Preprocessed real slices: ``images`` (S, 1, R, R) float32 and where each came from."""

    images: np.ndarray
    sources: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def resolve_data_root(data_root: str | os.PathLike[str] | None = None) -> Path:
    """The shared data folder: argument, ``$PROMPTSEG_DATA_ROOT``, or ``../shared/data``.

    ``../shared/data`` is tried beside the source checkout, then relative to the working folder.

    Raises:
        ExportInputError: none of them holds the CHAOS and brain tumour folders.
    """
    import promptseg

    candidates: list[Path] = []
    if data_root is not None:
        candidates.append(Path(data_root))
    elif os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    else:
        repo = Path(promptseg.__file__).resolve().parents[1]
        candidates += [repo.parent / "shared" / "data", Path("../shared/data")]
    for root in candidates:
        if (root / "chaos-mr-t2spir").is_dir() and (root / "brain-tumor-cheng").is_dir():
            return root
    raise ExportInputError(
        f"{candidates[0]}: real data for the FP16 audit and verification not found (expected "
        f"chaos-mr-t2spir/ and brain-tumor-cheng/ inside); pass --data-root or set {DATA_ENV}, "
        f"or export with --no-verify and without --fp16"
    )


def _chaos_slices(
    root: Path, pre: Preprocessing, per_case: int, cases: int
) -> tuple[list[np.ndarray], list[str]]:
    from promptseg.data.datasets import load_cases, load_splits

    ids = list(load_splits()["chaos-mr"]["val"][:cases])
    images: list[np.ndarray] = []
    sources: list[str] = []
    for case in load_cases("chaos-mr", root / "chaos-mr-t2spir", "val"):
        if int(case.case_id.split("/")[1]) not in ids:
            continue
        volume = normalize(case.image, case.modality, pre)
        organ = np.zeros(case.image.shape[0], dtype=np.int64)
        for target in ("liver", "spleen", "left kidney", "right kidney"):
            organ += case.masks[target].reshape(case.image.shape[0], -1).sum(1)
        present = np.flatnonzero(organ > 0)
        if present.size == 0:
            present = np.arange(case.image.shape[0])
        picks = sorted(
            {
                int(present[i])
                for i in np.linspace(0, present.size - 1, per_case).round().astype(int)
            }
        )
        for k in picks:
            images.append(volume[k])
            sources.append(f"{case.case_id}/slice{k}")
        ids.remove(int(case.case_id.split("/")[1]))
        if not ids:
            break
    return images, sources


def _brain_slices(root: Path, pre: Preprocessing, per_class: int) -> tuple[list, list[str]]:
    from promptseg.data.datasets import BRAIN, load_cases

    counts = dict.fromkeys(BRAIN, 0)
    images: list[np.ndarray] = []
    sources: list[str] = []
    for case in load_cases("brain-tumor", root / "brain-tumor-cheng", "val"):
        label = case.meta["label"]
        if counts[label] >= per_class:
            continue
        counts[label] += 1
        images.append(normalize(case.image, case.modality, pre)[0])
        sources.append(f"{case.case_id} ({label})")
        if all(n >= per_class for n in counts.values()):
            break
    return images, sources


def load_slices(
    data_root: Path,
    pre: Preprocessing,
    resolution: int,
    *,
    chaos_per_case: int = 4,
    chaos_cases: int = 2,
    brain_per_class: int = 2,
) -> SliceSet:
    """CHAOS validation slices through the organs plus brain slices of every tumour class.

    Returns:
        Slices (S, 1, R, R), float32 in [0, 1], each resized bilinearly from its native grid.
    """
    chaos, chaos_src = _chaos_slices(data_root, pre, chaos_per_case, chaos_cases)
    brain, brain_src = _brain_slices(data_root, pre, brain_per_class)
    images = [resize_bilinear(img, (resolution, resolution)) for img in chaos + brain]
    if not images:
        raise ExportInputError(f"{data_root}: no CHAOS or brain validation slices found")
    stack = np.stack(images)[:, None].astype(np.float32)
    return SliceSet(images=np.ascontiguousarray(stack), sources=chaos_src + brain_src)
