"""The kidney confusion figure of ``promptseg robustness`` (kidney_confusion.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from promptseg.robustness.tally import KIDNEYS
from promptseg.runtime.writers import write_figure_atomic


def confusion_png(results: dict, path: Path) -> Path | None:
    """Heatmap per kidney dataset: predicted-voxel fractions (2x3) and Dice per side (2x2)."""
    kidney = {ds: rows for ds, rows in results["kidney_confusion"].items() if rows}
    if not kidney:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(kidney),
        2,
        figsize=(9, 2.6 * len(kidney) + 0.8),
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 2]},
    )
    for ax_row, (ds, rows) in zip(axes, kidney.items()):
        prompts = [t for t in KIDNEYS if t in rows]
        frac = np.array(
            [
                [
                    np.nan if rows[t][k] is None else rows[t][k]
                    for k in ("in_left", "in_right", "elsewhere")
                ]
                for t in prompts
            ]
        )
        dice = np.array(
            [
                [np.nan if rows[t][k] is None else rows[t][k] for k in ("dice_left", "dice_right")]
                for t in prompts
            ]
        )
        for ax, mat, cols, title in (
            (
                ax_row[0],
                frac,
                ["in left truth", "in right truth", "elsewhere"],
                "fraction of predicted voxels",
            ),
            (ax_row[1], dice, ["vs left truth", "vs right truth"], "Dice"),
        ):
            ax.imshow(mat, cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(len(cols)), cols, fontsize=8)
            ax.set_yticks(range(len(prompts)), [f'"{p}"' for p in prompts], fontsize=8)
            for (i, j), v in np.ndenumerate(mat):
                text = "n/a" if np.isnan(v) else f"{v:.3f}"
                color = "black" if np.isnan(v) or v > 0.6 else "white"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
            ax.set_title(f"{ds} (val): {title}", fontsize=9)
    meta = results.get("meta", {})
    fig.suptitle(
        f"left/right kidney prompts, {Path(str(meta.get('checkpoint', ''))).name}: rows = prompt",
        fontsize=10,
    )
    fig.tight_layout()
    write_figure_atomic(fig, path, dpi=90)
    plt.close(fig)
    return path
