"""Markdown tables from ``promptseg evaluate`` outputs (what the README's tables are made of)."""

from __future__ import annotations

import json
from pathlib import Path


def _cell(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _read_summary(folder: Path) -> dict:
    path = folder / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary.json (run promptseg evaluate first)")
    return json.loads(path.read_text())


def summary_table(eval_dirs: list[Path]) -> str:
    """One row per (dataset, target): Dice mean +/- sd, IoU, HD95, n; then the absent rates."""
    lines = [
        "| dataset | target | Dice (mean ± sd) | IoU | HD95 | n |",
        "|---|---|---|---|---|---|",
    ]
    absent = [
        "| dataset | absent-target prompts answered empty | same-domain only | n | "
        "left-kidney prompt: in left / right truth | right-kidney prompt: in left / right truth |",
        "|---|---|---|---|---|---|",
    ]
    for folder in eval_dirs:
        s = _read_summary(Path(folder))
        for target, row in s["targets"].items():
            lines.append(
                f"| {s['dataset']} ({s['split']}) | {target} | {_cell(row['dice_mean'])} ± "
                f"{_cell(row['dice_std'])} | {_cell(row['iou_mean'])} | "
                f"{_cell(row['hd95_mean'], 1)} | {row['n']} |"
            )
        conf = s.get("kidney_confusion") or {}

        def lr(t: str, conf: dict = conf) -> str:
            c = conf.get(t)
            return "n/a" if not c else f"{c['left']:.3f} / {c['right']:.3f}"

        absent.append(
            f"| {s['dataset']} ({s['split']}) | {_cell(s['absent_empty_rate'])} | "
            f"{_cell(s['absent_same_domain_empty_rate'])} | {s['absent_n']} | "
            f"{lr('left kidney')} | {lr('right kidney')} |"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(absent) + "\n"


# The default model's acceptance goals (README, Default model), checked against evaluate output.
_DICE_TARGETS: list[tuple[str, str, float]] = [
    ("brain-tumor", "meningioma", 0.80),
    ("brain-tumor", "pituitary tumour", 0.80),
    ("brain-tumor", "glioma", 0.65),
    ("btcv-ct", "liver", 0.92),
]
_CHAOS_MEAN_TARGET = 0.85
_ABSENT_TARGET = 0.90
_CROSS_DOMAIN_TARGET = 0.98


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _load_summaries(eval_dirs: list[Path]) -> dict[str, dict]:
    return {(s := _read_summary(Path(folder)))["dataset"]: s for folder in eval_dirs}


def targets_table(eval_dirs: list[Path]) -> str:
    """The acceptance table: each target with the value reached and met / not met.

    Rows whose dataset is not among ``eval_dirs`` are left out. Kidney confusion is the fraction
    of a kidney prompt's mask inside the other kidney's truth (evaluate's mean over cases), the
    larger of the two prompts, to 4 decimals; its goal is exactly 0.
    """
    s = _load_summaries(eval_dirs)
    rows = ["| target | reached | goal | |", "|---|---|---|---|"]
    if "chaos-mr" in s:
        organs = s["chaos-mr"]["targets"]
        parts = ", ".join(f"{t} {_cell(r['dice_mean'])}" for t, r in organs.items())
        mean = s["chaos-mr"]["mean_dice"]
        rows.append(
            f"| CHAOS MR mean 3D Dice ({parts}) | {_cell(mean)} | >= {_CHAOS_MEAN_TARGET:.2f} | "
            f"{_verdict(mean >= _CHAOS_MEAN_TARGET)} |"
        )
    for dataset, target, goal in _DICE_TARGETS:
        row = s.get(dataset, {}).get("targets", {}).get(target)
        if row is not None and row["dice_mean"] is not None:
            rows.append(
                f"| {dataset} {target} Dice | {_cell(row['dice_mean'])} | >= {goal:.2f} | "
                f"{_verdict(row['dice_mean'] >= goal)} |"
            )
    for key, label, goal in [
        ("absent_empty_rate", "absent-target prompts answered empty", _ABSENT_TARGET),
        ("absent_cross_domain_empty_rate", "cross domain", _CROSS_DOMAIN_TARGET),
    ]:
        rates = {d: v[key] for d, v in s.items() if v.get(key) is not None}
        if rates:
            names = " / ".join(rates)
            values = " / ".join(_cell(r) for r in rates.values())
            rows.append(
                f"| {label} ({names}) | {values} | >= {goal:.2f} | "
                f"{_verdict(min(rates.values()) >= goal)} |"
            )
    same = {
        d: v["absent_same_domain_empty_rate"]
        for d, v in s.items()
        if v.get("absent_same_domain_empty_rate") is not None
    }
    if same:
        rows.append(
            f"| same domain only ({' / '.join(same)}) | "
            f"{' / '.join(_cell(r) for r in same.values())} | | |"
        )
    confusion = {
        d: max(c["left kidney"]["right"], c["right kidney"]["left"])
        for d, v in s.items()
        if (c := v.get("kidney_confusion") or {}).get("left kidney") and c.get("right kidney")
    }
    if confusion:
        rows.append(
            f"| kidney prompt in the other kidney's truth ({' / '.join(confusion)}) | "
            f"{' / '.join(_cell(r, 4) for r in confusion.values())} | 0 | "
            f"{_verdict(max(confusion.values()) == 0)} |"
        )
    return "\n".join(rows) + "\n"
