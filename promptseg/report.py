"""Markdown tables from ``promptseg evaluate`` outputs (what the README's tables are made of)."""

from __future__ import annotations

import json
from pathlib import Path


def _cell(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


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
        path = Path(folder) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no summary.json (run promptseg evaluate first)")
        s = json.loads(path.read_text())
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
