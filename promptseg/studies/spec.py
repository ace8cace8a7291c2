"""Study configuration: a study is arms x tasks x seeds; each cell is one :class:`RunSpec`.

A run is identified by the hash of everything that changes its result, so two studies that
ask for the same run (the ablation's full model is the loss study's Dice arm) share it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from promptseg.data.datasets import ABDOMEN, BRAIN, KINDS
from promptseg.losses import build_loss

# Task name -> (training datasets, test datasets, targets). Studies may override datasets.
TASKS: dict[str, dict] = {
    "brain": {"train": ["brain-tumor"], "test": ["brain-tumor"], "targets": list(BRAIN)},
    "abdomen": {
        "train": ["chaos-mr", "btcv-ct"],
        "test": ["chaos-mr", "btcv-ct"],
        "targets": list(ABDOMEN),
    },
}
MODALITY = {"chaos-mr": "MR", "btcv-ct": "CT", "lits-ct": "CT", "brain-tumor": "MR"}


@dataclass(frozen=True)
class RunSpec:
    """One training + evaluation run (every field changes the result)."""

    task: str
    train_datasets: tuple[str, ...]
    test_datasets: tuple[str, ...]
    targets: tuple[str, ...]
    loss: str
    fusion: str = "film+cbn"
    se: bool = True
    cbam: bool = True
    seed: int = 0
    widths: tuple[int, ...] = (8, 16, 32, 64)
    resolution: int = 64
    steps: int = 300
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    neg_ratio: float = 0.5
    data_root: str = "../shared/data"

    def key(self) -> str:
        """Stable short hash of the spec (data_root excluded: same data, other path)."""
        d = asdict(self)
        d.pop("data_root")
        text = json.dumps(d, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StudyConfig:
    """A study file: which arms vary, on which tasks, with which seeds and budget."""

    name: str
    kind: str  # "loss", "ablation" or "cross-modality"
    out: str
    arms: dict[str, dict]  # arm name -> RunSpec field overrides (loss, fusion, se, cbam, ...)
    tasks: list[str] = field(default_factory=lambda: ["brain", "abdomen"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    base: dict = field(default_factory=dict)  # RunSpec overrides common to every run
    task_base: dict[str, dict] = field(default_factory=dict)  # per-task overrides (e.g. loss)
    task_arms: dict[str, list[str]] = field(default_factory=dict)  # optional arm subset per task
    claims: list[dict] = field(default_factory=list)
    scaled_down: str = ""

    @classmethod
    def load(cls, path: Path) -> StudyConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: study config not found")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected some of {known}")
        cfg = cls(**values)
        cfg.validate(path)
        return cfg

    def validate(self, source: Path | str = "study") -> None:
        if self.kind not in ("loss", "ablation", "cross-modality"):
            raise ValueError(f"{source}: kind must be loss, ablation or cross-modality")
        if not self.arms or not self.seeds:
            raise ValueError(f"{source}: needs at least one arm and one seed")
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"{source}: unknown task {task!r}; expected one of {list(TASKS)}")
        spec_fields = set(RunSpec.__dataclass_fields__)
        overrides = {"base": self.base, **self.arms}
        overrides.update({f"task_base {t}": v for t, v in self.task_base.items()})
        for arm, over in overrides.items():
            bad = set(over) - spec_fields
            if bad:
                raise ValueError(f"{source}: arm {arm!r} sets unknown fields {sorted(bad)}")
            for ds in list(over.get("train_datasets", [])) + list(over.get("test_datasets", [])):
                if ds not in KINDS:
                    raise ValueError(f"{source}: arm {arm!r}: unknown dataset {ds!r}")
            if "loss" in over:
                build_loss(over["loss"])  # raises with the valid names

    def arms_for(self, task: str) -> list[str]:
        return self.task_arms.get(task, list(self.arms))

    def runs(self, data_root: str | None = None) -> list[tuple[str, str, RunSpec]]:
        """Every (task, arm, spec) of the study, seeds innermost-last for early coverage."""
        out = []
        for seed in self.seeds:
            for task in self.tasks:
                for arm in self.arms_for(task):
                    values = {
                        "task": task,
                        "train_datasets": TASKS[task]["train"],
                        "test_datasets": TASKS[task]["test"],
                        "targets": TASKS[task]["targets"],
                        "loss": "dice",
                        **self.base,
                        **self.task_base.get(task, {}),
                        **self.arms[arm],
                        "seed": seed,
                    }
                    if data_root:
                        values["data_root"] = data_root
                    for k in ("train_datasets", "test_datasets", "targets", "widths"):
                        if k in values:
                            values[k] = tuple(values[k])
                    out.append((task, arm, RunSpec(**values)))
        return out
