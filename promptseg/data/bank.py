"""In-memory sample bank at model resolution: slices, masks and (slice, target, mask) samples.

Negatives are prompts for targets known to be absent from a slice (empty mask). "Hard"
negatives come from the slice's own domain (spleen on an abdominal slice without spleen,
meningioma on a glioma image, liver tumour on a healthy liver); "easy" ones cross domains
(liver on a brain slice).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptseg.data.datasets import ABDOMEN, BRAIN, DATASET_FOLDERS, Case, load_cases
from promptseg.preprocess import Preprocessing, normalize, resize_bilinear, resize_nearest
from promptseg.prompts import TARGETS

# Per-image target state in :attr:`Bank.state`.
PRESENT, ABSENT, UNKNOWN = 1, 0, -1

DOMAIN = {
    "brain-tumor": set(BRAIN),
    "chaos-mr": set(ABDOMEN) | {"liver tumour"},
    "btcv-ct": set(ABDOMEN),
    "lits-ct": {"liver", "liver tumour"},
}


@dataclass(frozen=True)
class Sample:
    """One (slice, prompt target, mask) training or validation item."""

    image: int  # index into Bank.images
    target: str
    mask: int  # index into Bank.masks, -1 for an empty mask (absent target)
    dataset: str
    hard: bool  # negative from the slice's own domain (always True for positives)

    @property
    def positive(self) -> bool:
        return self.mask >= 0


class Bank:
    """Slices (N, R, R) float32 in [0, 1], masks (M, R, R) bool and the sample list.

    Per image and target (columns in :data:`TARGETS` order): ``state`` (N, T) int8 is
    :data:`PRESENT`, :data:`ABSENT` or :data:`UNKNOWN` (not annotated, or too small to survive
    the resize), ``mask_index`` (N, T) int32 the row of ``masks`` (-1 if not present), and
    ``image_dataset`` / ``image_case`` name each image's dataset and case.
    """

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution
        self._images: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._state: list[np.ndarray] = []
        self._mask_index: list[np.ndarray] = []
        self.samples: list[Sample] = []
        self.images = np.zeros((0, resolution, resolution), np.float32)
        self.masks = np.zeros((0, resolution, resolution), bool)
        self.state = np.zeros((0, len(TARGETS)), np.int8)
        self.mask_index = np.zeros((0, len(TARGETS)), np.int32)
        self.image_dataset: list[str] = []
        self.image_case: list[str] = []

    def add_case(self, case: Case, pre: Preprocessing) -> None:
        size = (self.resolution, self.resolution)
        slices = resize_bilinear(normalize(case.image, case.modality, pre), size)
        for z in range(slices.shape[0]):
            img_idx = len(self._images)
            self._images.append(slices[z])
            state = np.full(len(TARGETS), UNKNOWN, np.int8)
            index = np.full(len(TARGETS), -1, np.int32)
            for target, mask in case.masks.items():
                column = TARGETS.index(target)
                m = resize_nearest(mask[z], size)
                if m.any():
                    self._masks.append(m)
                    state[column], index[column] = PRESENT, len(self._masks) - 1
                    self.samples.append(
                        Sample(img_idx, target, len(self._masks) - 1, case.dataset, True)
                    )
                elif not mask[z].any():
                    state[column] = ABSENT
                    hard = target in DOMAIN[case.dataset]
                    self.samples.append(Sample(img_idx, target, -1, case.dataset, hard))
            self._state.append(state)
            self._mask_index.append(index)
            self.image_dataset.append(case.dataset)
            self.image_case.append(case.case_id)

    def finalize(self) -> Bank:
        if self._images:
            self.images = np.stack(self._images)
        if self._masks:
            self.masks = np.stack(self._masks)
        if self._state:
            self.state = np.stack(self._state)
            self.mask_index = np.stack(self._mask_index)
        return self

    def positives(self) -> list[Sample]:
        return [s for s in self.samples if s.positive]

    def negatives(self, hard: bool) -> list[Sample]:
        return [s for s in self.samples if not s.positive and s.hard == hard]


def build_bank(
    data_root: Path, datasets: list[str], split: str, pre: Preprocessing, progress: bool = True
) -> Bank:
    """Load and preprocess the ``split`` of each dataset into one bank."""
    from tqdm import tqdm

    bank = Bank(pre.resolution)
    for kind in datasets:
        cases = load_cases(kind, Path(data_root) / DATASET_FOLDERS[kind], split)
        for case in tqdm(cases, desc=f"load {kind}/{split}", disable=not progress, leave=False):
            bank.add_case(case, pre)
    return bank.finalize()
