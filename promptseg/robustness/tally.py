"""Scores gathered case by case: prompt sets, wrong targets, kidney sides, free-form prompts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from promptseg.checkpoint import LoadedCheckpoint
from promptseg.data.bank import DOMAIN
from promptseg.data.datasets import Case
from promptseg.evaluate import case_metrics
from promptseg.robustness.free_form import FreeForm
from promptseg.robustness.phrasings import draw_phrasings

SETS = ("canonical", "train", "heldout")
KIDNEYS = ("left kidney", "right kidney")
KIDNEY_DATASETS = ("chaos-mr", "btcv-ct")


def _metrics(case: Case, pred: np.ndarray, truth: np.ndarray) -> dict:
    """Dice, IoU and HD95 with evaluate's case rule (3D for volumes, 2D for slices)."""
    m = case_metrics(case, pred, truth)
    return {k: float(m[k]) for k in ("dice", "iou", "hd95")}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _sd(values: Sequence[float]) -> float | None:
    """Population standard deviation (ddof=0), as labelled in report.md; the committed
    results were computed with it (the studies report the sample sd, ddof=1)."""
    return float(np.std(values)) if len(values) else None


class _Tally:
    """Everything gathered case by case."""

    def __init__(self, free_form: FreeForm) -> None:
        self.rows: list[dict] = []  # scored (case, prompt) rows: sets and free-form
        self.absent: dict[tuple[str, str, str], list[float]] = {}  # (ds, target, domain)
        self.kidney: dict[str, dict[str, dict]] = {}
        self.off: dict[tuple[int, str], list[int]] = {}  # (index, ds) -> [empty, n]
        self.free_form = free_form

    def requests(
        self, case: Case, loaded: LoadedCheckpoint, phrasings: int, seed: int
    ) -> dict[str, list[tuple]]:
        """prompt -> its uses on this case (one prediction serves every use)."""
        vocab = loaded.vocabulary
        req: dict[str, list[tuple]] = {}

        def add(prompt: str, use: tuple) -> None:
            req.setdefault(prompt, []).append(use)

        annotated = [t for t in case.masks if t in vocab.targets]
        present = [t for t in annotated if case.masks[t].any()]
        for t in present:
            add(vocab.canonical(t), ("set", "canonical", t))
            for mode in ("train", "heldout"):
                for p in draw_phrasings(loaded, mode, t, case.case_id, phrasings, seed):
                    add(p, ("set", mode, t))
        for t in annotated:
            add(vocab.canonical(t), ("absent", t))
        if case.dataset in KIDNEY_DATASETS and all(k in annotated for k in KIDNEYS):
            for t in KIDNEYS:
                add(vocab.canonical(t), ("kidney", t))
        for i, (p, t) in enumerate(self.free_form.targeted):
            if t in present:
                add(p, ("free", i, t))
        for i, p in enumerate(self.free_form.off_topic):
            add(p, ("off", i))
        return req

    def use(self, case: Case, prompt: str, pred: np.ndarray, use: tuple) -> None:
        kind = use[0]
        ds = case.dataset
        if kind in ("set", "free"):
            target = use[2]
            m = _metrics(case, pred, case.masks[target])
            self.rows.append(
                {
                    "dataset": ds,
                    "case": case.case_id,
                    "set": use[1] if kind == "set" else "free-form",
                    "target": target,
                    "prompt": prompt,
                    **m,
                    "pred_voxels": int(pred.sum()),
                    "truth_voxels": int(case.masks[target].sum()),
                }
            )
        elif kind == "absent":
            target = use[1]
            truth = case.masks[target]
            empty_truth = ~truth.reshape(truth.shape[0], -1).any(1)
            answered = pred.reshape(pred.shape[0], -1)
            domain = "same" if target in DOMAIN[ds] else "cross"
            acc = self.absent.setdefault((ds, target, domain), [0, 0, 0.0])
            for z in np.flatnonzero(empty_truth):
                n_pred = int(answered[z].sum())
                acc[0] += int(n_pred == 0)
                acc[1] += 1
                acc[2] += n_pred / answered.shape[1]
        elif kind == "kidney":
            target = use[1]
            left, right = case.masks["left kidney"], case.masks["right kidney"]
            acc = self.kidney.setdefault(ds, {}).setdefault(
                target,
                {"pred": 0, "in_left": 0, "in_right": 0, "dice_left": [], "dice_right": []},
            )
            acc["pred"] += int(pred.sum())
            acc["in_left"] += int((pred & left).sum())
            acc["in_right"] += int((pred & right).sum())
            for side, truth in (("left", left), ("right", right)):
                if truth.any():
                    acc[f"dice_{side}"].append(_metrics(case, pred, truth)["dice"])
        elif kind == "off":
            flat = pred.reshape(pred.shape[0], -1)
            acc = self.off.setdefault((use[1], ds), [0, 0])
            acc[0] += int((~flat.any(1)).sum())
            acc[1] += flat.shape[0]


def kidney_confusion_row(acc: dict) -> dict:
    """Fractions of predicted voxels in the left / right truth / elsewhere, and the Dice means.

    ``acc`` holds pooled counts ``pred, in_left, in_right`` and per-case Dice lists
    ``dice_left, dice_right``. With no predicted voxel at all, the fractions are ``None``.
    """
    total = acc["pred"]
    fractions = (
        {
            "in_left": acc["in_left"] / total,
            "in_right": acc["in_right"] / total,
            "elsewhere": (total - acc["in_left"] - acc["in_right"]) / total,
        }
        if total
        else {"in_left": None, "in_right": None, "elsewhere": None}
    )
    return {
        **fractions,
        "pred_voxels": int(total),
        "dice_left": _mean(acc["dice_left"]),
        "dice_left_n": len(acc["dice_left"]),
        "dice_right": _mean(acc["dice_right"]),
        "dice_right_n": len(acc["dice_right"]),
    }
