"""Study figures (PNG, matplotlib Agg): violins per metric, per-seed steps, training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from promptseg.runtime.writers import atomic_write as _atomic_write

LABELS = {
    "dice": "Dice",
    "iou": "IoU",
    "f1": "F1",
    "precision": "precision",
    "recall": "recall",
    "hd95": "HD95 (px)",
    "kappa": "kappa",
    "empty_rate": "empty rate (absent prompts)",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Save atomically (a temp file with the same suffix, so savefig keeps the format)."""
    try:
        _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90))
    finally:
        _plt().close(fig)


def violins(values: dict[str, dict[str, list[float]]], metrics: list[str], title: str, path: Path):
    """values[arm][metric] = per-seed values -> one violin panel per metric (seeds as dots)."""
    plt = _plt()
    arms = list(values)
    cols = 4
    rows = int(np.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        data = [[v for v in values[a][metric] if np.isfinite(v)] for a in arms]
        pos = [i for i, d in enumerate(data) if len(d) >= 2]
        if pos:
            ax.violinplot([data[i] for i in pos], positions=pos, showmeans=True)
        for i, d in enumerate(data):
            ax.scatter(np.full(len(d), i) + np.linspace(-0.08, 0.08, len(d)), d, s=10, c="k")
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
        ax.set_title(LABELS.get(metric, metric))
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def seed_steps(values: dict[str, dict[int, float]], metric: str, title: str, path: Path) -> None:
    """values[arm][seed] = metric -> step lines, one per arm, seeds on the x axis (paired view)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, by_seed in values.items():
        seeds = sorted(by_seed)
        ax.step(seeds, [by_seed[s] for s in seeds], where="mid", marker="o", label=arm)
    ax.set(xlabel="seed", ylabel=LABELS.get(metric, metric), title=title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def training_curves(curves: dict[str, list[list[list[float]]]], title: str, path: Path) -> None:
    """curves[arm] = one [[step, loss], ...] list per seed -> a panel per arm."""
    plt = _plt()
    arms = list(curves)
    cols = min(3, len(arms))
    rows = int(np.ceil(len(arms) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, arm in zip(axes.flat, arms):
        for seed_curve in curves[arm]:
            c = np.asarray(seed_curve)
            ax.plot(c[:, 0], c[:, 1], lw=1)
        ax.set(title=arm, xlabel="step", ylabel="training loss")
    for ax in list(axes.flat)[len(arms) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
