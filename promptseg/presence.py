"""Presence thresholds: one tau per target, chosen on the ``tune`` split (training data only).

For each target, every (slice, target) pair of the tune split with a known answer gets the
model's presence probability. tau maximises Youden's J (true-positive rate + true-negative
rate - 1) over a grid in [0.05, 0.95]; ties go to the tau closest to 0.5. A target without
both positives and negatives in the tune split keeps 0.5. The thresholds are written into the
checkpoint (``presence_thresholds``) and from there into every exported manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from promptseg.prompts import TARGETS
from promptseg.runtime.writers import atomic_write, write_figure_atomic, write_json_atomic

DEFAULT_TAU = 0.5
GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)


# Mutually exclusive targets: one brain tumour slice shows one tumour type.
EXCLUSIVE = ("glioma", "meningioma", "pituitary tumour")


def compete(prob: np.ndarray, state: np.ndarray, group: tuple[str, ...] = EXCLUSIVE) -> np.ndarray:
    """Presence probabilities (N, T) where the members of ``group`` compete, as BiomedParse's
    mutually exclusive prompts do: on a row where every member is a known pair, each member
    but the most probable gets probability 0 (so the gate drops it)."""
    cols = [TARGETS.index(t) for t in group]
    out = prob.copy()
    rows = np.all(state[:, cols] >= 0, axis=1)
    sub = prob[np.ix_(rows, cols)]
    loser = sub < sub.max(axis=1, keepdims=True)
    out[np.ix_(rows, cols)] = np.where(loser, 0.0, sub)
    return out


def youden_tau(prob: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """(tau, J) maximising TPR + TNR - 1 for probabilities (n,) and bool labels (n,)."""
    pos, neg = prob[label], prob[~label]
    if not len(pos) or not len(neg):
        return DEFAULT_TAU, float("nan")
    tpr = (pos[None, :] >= GRID[:, None]).mean(axis=1)
    tnr = (neg[None, :] < GRID[:, None]).mean(axis=1)
    j = tpr + tnr - 1
    best = np.flatnonzero(j >= j.max() - 1e-12)
    pick = best[np.argmin(np.abs(GRID[best] - DEFAULT_TAU))]
    return float(GRID[pick]), float(j[pick])


def choose_thresholds(prob: np.ndarray, state: np.ndarray) -> dict[str, dict]:
    """Per target: tau, J, and the tune counts. prob (N, T), state (N, T) int8 (1/0/-1)."""
    out = {}
    for j, target in enumerate(TARGETS):
        known = state[:, j] >= 0
        label = state[known, j] == 1
        tau, youden = youden_tau(prob[known, j], label)
        out[target] = {
            "tau": tau,
            "youden_j": None if np.isnan(youden) else round(youden, 4),
            "positives": int(label.sum()),
            "negatives": int((~label).sum()),
        }
    return out


def plot_calibration(prob: np.ndarray, state: np.ndarray, chosen: dict, path: Path) -> None:
    """Per target: presence probability histograms of present / absent pairs with tau (PNG),
    and a reliability curve over all targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(12, 10))
    bins = np.linspace(0, 1, 21)
    for ax, (j, target) in zip(axes.flat, enumerate(TARGETS)):
        known = state[:, j] >= 0
        p, lab = prob[known, j], state[known, j] == 1
        ax.hist(p[lab], bins=bins, alpha=0.6, label=f"present ({lab.sum()})", color="tab:green")
        ax.hist(p[~lab], bins=bins, alpha=0.6, label=f"absent ({(~lab).sum()})", color="tab:red")
        ax.axvline(chosen[target]["tau"], color="k", ls="--", label=f"tau {chosen[target]['tau']}")
        ax.set_yscale("log")
        ax.set_title(target)
        ax.legend(fontsize=7)
    ax = axes.flat[-1]
    known = state >= 0
    p, lab = prob[known], state[known] == 1
    idx = np.clip(np.digitize(p, bins) - 1, 0, len(bins) - 2)
    centers, freq = [], []
    for b in range(len(bins) - 1):
        sel = idx == b
        if sel.sum() >= 5:
            centers.append(p[sel].mean())
            freq.append(lab[sel].mean())
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.plot(centers, freq, marker="o")
    ax.set(xlabel="predicted presence", ylabel="observed frequency", title="reliability (tune)")
    fig.suptitle("presence probability on the tune split")
    fig.tight_layout()
    try:
        write_figure_atomic(fig, path, dpi=90)
    finally:
        plt.close(fig)


def calibrate_checkpoint(
    checkpoint: str | Path, data_root: Path, out: Path, datasets: list[str] | None = None
) -> dict:
    """Choose tau per target on the tune split, store it in ``checkpoint`` (atomic rewrite)
    and write ``out/presence_calibration.{json,png}``."""
    import torch

    from promptseg.checkpoint import load_checkpoint, read_checkpoint_blob, resolve_checkpoint
    from promptseg.data.bank import build_bank
    from promptseg.data.datasets import KINDS
    from promptseg.validation import pair_outputs, score_pairs

    path = resolve_checkpoint(checkpoint)
    loaded = load_checkpoint(path)
    bank = build_bank(Path(data_root), list(datasets or KINDS), "tune", loaded.preprocessing)
    with torch.inference_mode():
        pairs = pair_outputs(loaded.model, bank, loaded.prompt_embeddings, loaded.vocabulary)
    chosen = choose_thresholds(pairs["prob"], bank.state)
    taus = np.array([chosen[t]["tau"] for t in TARGETS])
    report = {
        "checkpoint": str(path),
        "split": "tune",
        "rule": "Youden J per target on the tune split; 0.5 without positives and negatives",
        "targets": chosen,
        "tune_at_tau": score_pairs(bank, pairs, taus),
        "tune_at_0.5": score_pairs(bank, pairs, DEFAULT_TAU),
        # Measured, not deployed: the tumour prompts competing (one tumour type per slice).
        "tune_at_tau_tumour_types_compete": score_pairs(
            bank, {**pairs, "prob": compete(pairs["prob"], bank.state)}, taus
        ),
    }
    blob = read_checkpoint_blob(path)
    blob["presence_thresholds"] = {t: chosen[t]["tau"] for t in TARGETS}
    atomic_write(path, lambda tmp: torch.save(blob, tmp))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, out / "presence_calibration.json")
    plot_calibration(pairs["prob"], bank.state, chosen, out / "presence_calibration.png")
    return report
