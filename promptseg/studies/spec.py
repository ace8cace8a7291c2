"""Study configuration: a study is arms x tasks x seeds; each cell is one :class:`RunSpec`.

A run is identified by the hash of everything that changes its result, so two studies that
ask for the same run (the ablation's full model is the loss study's Dice arm) share it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from promptseg.data.datasets import ABDOMEN, BRAIN, KINDS
from promptseg.losses import build_loss
from promptseg.model.film import FUSIONS
from promptseg.prompts import TARGETS

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
METRICS = ("dice", "iou", "f1", "precision", "recall", "hd95", "kappa")
CLAIM_METRICS = (*METRICS, "empty_rate")
KINDS_OF_STUDY = ("loss", "ablation", "cross-modality")
# RunSpec fields each run gets from the study itself, never from base, task_base or an arm.
RUNNER_SET = {"task": "the task loop", "seed": "'seeds'", "data_root": "--data-root"}


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
        """Stable short hash of the spec (data_root excluded: same data, other path).

        Device, splits, preprocessing and text encoder are not in the key (existing results
        are keyed by it); the runner records them as a fingerprint next to each result and
        checks that instead.
        """
        d = asdict(self)
        d.pop("data_root")
        text = json.dumps(d, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- value checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(v: Any, ok, allowed: tuple | None = None) -> bool:
    if not isinstance(v, list) or not v or not all(ok(x) for x in v):
        return False
    return allowed is None or all(x in allowed for x in v)


def _str(v: Any) -> bool:
    return isinstance(v, str)


# RunSpec field -> (check, what it must be).
_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "train_datasets": (lambda v: _list_of(v, _str, KINDS), f"a non-empty list of {list(KINDS)}"),
    "test_datasets": (lambda v: _list_of(v, _str, KINDS), f"a non-empty list of {list(KINDS)}"),
    "targets": (lambda v: _list_of(v, _str, TARGETS), f"a non-empty list of {list(TARGETS)}"),
    "loss": (_str, "a loss name or weighted sum such as 'dice+0.5*boundary'"),
    "fusion": (lambda v: v in FUSIONS, f"one of {list(FUSIONS)}"),
    "se": (lambda v: isinstance(v, bool), "true or false"),
    "cbam": (lambda v: isinstance(v, bool), "true or false"),
    "widths": (lambda v: _list_of(v, lambda x: _is_int(x) and x > 0), "a list of positive ints"),
    "resolution": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "steps": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "batch": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "neg_ratio": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
}


def check_overrides(source: object, where: str, over: Any) -> None:
    """Refuse a RunSpec override dict with unknown or study-set fields, or bad values."""
    if not isinstance(over, dict):
        raise ValueError(f"{source}: {where} must be an object of run fields, got {over!r}")
    for name, value in over.items():
        if name in RUNNER_SET:
            raise ValueError(
                f"{source}: {where} sets {name!r}, which comes from {RUNNER_SET[name]}"
            )
        if name not in _FIELD_CHECKS:
            raise ValueError(
                f"{source}: {where} sets unknown fields [{name!r}]; "
                f"expected some of {sorted(_FIELD_CHECKS)}"
            )
        ok, what = _FIELD_CHECKS[name]
        if not ok(value):
            raise ValueError(f"{source}: {where}: {name!r} must be {what}, got {value!r}")
        if name == "loss":
            _check_loss(source, where, value)


def _check_loss(source: object, where: str, loss: str) -> None:
    try:
        build_loss(loss)
    except (ValueError, KeyError) as exc:
        text = " ".join(str(exc).split())
        raise ValueError(f"{source}: {where}: bad loss {loss!r} ({text})") from exc


# Top-level key -> (check, what it must be); claims and cross references are checked after.
_TOP_CHECKS: dict[str, tuple[Any, str]] = {
    "name": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "kind": (lambda v: v in KINDS_OF_STUDY, "loss, ablation or cross-modality"),
    "out": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty folder path"),
    "arms": (lambda v: isinstance(v, dict) and len(v) > 0, "a non-empty object arm -> fields"),
    "tasks": (lambda v: _list_of(v, _str), "a non-empty list of task names"),
    "seeds": (lambda v: _list_of(v, lambda x: _is_int(x) and x >= 0), "a non-empty int list"),
    "base": (lambda v: isinstance(v, dict), "an object of run fields"),
    "task_base": (lambda v: isinstance(v, dict), "an object task -> run fields"),
    "task_arms": (lambda v: isinstance(v, dict), "an object task -> list of arms"),
    "claims": (lambda v: isinstance(v, list), "a list of claim objects"),
    "scaled_down": (lambda v: isinstance(v, str), "a string"),
    "paired": (lambda v: isinstance(v, bool), "true or false"),
}
REQUIRED = ("name", "kind", "out", "arms")
_CLAIM_KEYS = {"text", "task", "arm", "better", "worse", "metric"}


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
    # False: arms are compared unpaired (Welch's t / Mann-Whitney) instead of paired by seed.
    paired: bool = True

    @classmethod
    def load(cls, path: Path) -> StudyConfig:
        """Read and validate a study file; every problem is a one-line ValueError naming it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: study config not found")
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(values, dict):
            raise ValueError(
                f"{path}: top level must be a JSON object, got {type(values).__name__}"
            )
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected some of {known}")
        missing = [k for k in REQUIRED if k not in values]
        if missing:
            raise ValueError(f"{path}: missing required keys {missing}")
        cfg = cls(**values)  # validate() checks every value, then the cross references
        cfg.validate(path)
        return cfg

    def validate(self, source: Path | str = "study") -> None:
        """Check types, values and every cross reference (arms, tasks, claims)."""
        _check_top(source, asdict(self))
        for key in ("seeds", "tasks"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"{source}: {key!r} has duplicates: {values}")
        for task in self.tasks:
            _check_task_name(source, "tasks", task)
        check_overrides(source, "base", self.base)
        for arm, over in self.arms.items():
            check_overrides(source, f"arm {arm!r}", over)
        for task, over in self.task_base.items():
            _check_task_name(source, "task_base", task)
            check_overrides(source, f"task_base {task!r}", over)
        self._check_task_arms(source)
        for i, claim in enumerate(self.claims):
            self._check_claim(source, i, claim)
        self._check_distinct_runs(source)

    def _check_task_arms(self, source: object) -> None:
        for task, arms in self.task_arms.items():
            _check_task_name(source, "task_arms", task)
            if not _list_of(arms, _str) or len(set(arms)) != len(arms):
                raise ValueError(
                    f"{source}: task_arms {task!r} must be a non-empty list of distinct arm "
                    f"names, got {arms!r}"
                )
            bad = [a for a in arms if a not in self.arms]
            if bad:
                raise ValueError(
                    f"{source}: task_arms {task!r} names unknown arms {bad}; "
                    f"expected some of {list(self.arms)}"
                )

    def _check_claim(self, source: object, i: int, claim: Any) -> None:
        where = f"claims[{i}]"
        if not isinstance(claim, dict):
            raise ValueError(f"{source}: {where} must be an object, got {claim!r}")
        unknown = set(claim) - _CLAIM_KEYS
        if unknown:
            raise ValueError(f"{source}: {where} has unknown keys {sorted(unknown)}")
        if not isinstance(claim.get("text"), str):
            raise ValueError(f"{source}: {where} needs a 'text' string")
        if claim.get("metric", "dice") not in CLAIM_METRICS:
            raise ValueError(f"{source}: {where}: metric must be one of {list(CLAIM_METRICS)}")
        task = claim.get("task")
        if task is not None and task not in self.tasks:
            raise ValueError(f"{source}: {where}: task {task!r} is not one of {self.tasks}")
        if "better" in claim or "worse" in claim:
            names = [claim.get("better"), claim.get("worse")]
            if "arm" in claim or None in names or names[0] == names[1]:
                raise ValueError(
                    f"{source}: {where} needs two different arms 'better' and 'worse' (no 'arm')"
                )
        elif task is None or "arm" not in claim:
            raise ValueError(
                f"{source}: {where} needs 'task' and 'arm' (best arm) or 'better' and 'worse'"
            )
        else:
            names = [claim["arm"]]
        arms = self.arms_for(task) if task is not None else list(self.arms)
        bad = [a for a in names if a not in arms]
        if bad:
            scope = f"task {task!r}" if task is not None else "this study"
            raise ValueError(f"{source}: {where} names arms {bad} not in {scope}: {arms}")

    def _check_distinct_runs(self, source: object) -> None:
        """Two arms of one task that give the same run would compare a run with itself."""
        seen: dict[tuple, str] = {}
        for task, arm, spec in self.runs():
            other = seen.setdefault((task, spec.key()), arm)
            if other != arm:
                raise ValueError(f"{source}: arms {other!r} and {arm!r} give identical {task} runs")

    def arms_for(self, task: str) -> list[str]:
        return self.task_arms.get(task, list(self.arms))

    def runs(self, data_root: str | None = None) -> list[tuple[str, str, RunSpec]]:
        """Every (task, arm, spec) of the study; seeds are the outermost loop (all of seed 0,
        then seed 1, ...) so an interrupted study has complete seeds early."""
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


def _check_top(source: object, values: dict) -> None:
    for key, value in values.items():
        ok, what = _TOP_CHECKS[key]
        if not ok(value):
            raise ValueError(f"{source}: {key!r} must be {what}, got {value!r}")


def _check_task_name(source: object, key: str, task: str) -> None:
    if task not in TASKS:
        raise ValueError(
            f"{source}: {key} names unknown task {task!r}; expected one of {list(TASKS)}"
        )
