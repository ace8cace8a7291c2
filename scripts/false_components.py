"""List the 3D connected components of one target's mask in one validation volume, each with its
size, slice range and how much of it lies in the truth; draw the slices of the largest false one.

Used to explain a volume whose Dice collapses under the largest-component rule (a false blob
larger than the organ is kept). The mask is the one ``promptseg evaluate`` scores, before the
largest-component step: presence gate on (the checkpoint's thresholds), ``--no-presence-gate``
to see the raw masks.

    python scripts/false_components.py CKPT --case chaos/36 --target spleen \
        --data-root ../shared/data --out results/candidates/final_320k/chaos36_spleen.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from promptseg.cases import iter_cases
from promptseg.checkpoint import load_checkpoint
from promptseg.data.datasets import DATASET_FOLDERS
from promptseg.evaluate import Predictor, gated_variants
from promptseg.postprocess import label_components
from promptseg.presence import DEFAULT_TAU
from promptseg.runtime.writers import write_figure_atomic

DATASET_OF_PREFIX = {"chaos": "chaos-mr", "lits": "lits-ct"}


def components(mask: np.ndarray, truth: np.ndarray) -> list[dict]:
    """Components of a bool (Z, H, W) mask, largest first, with truth overlap (the
    connectivity of the largest-component rule: :func:`promptseg.postprocess.label_components`)."""
    labels, n = label_components(mask)
    rows = []
    for k in range(1, n + 1):
        comp = labels == k
        z = np.flatnonzero(comp.any(axis=(1, 2)))
        rows.append(
            {
                "voxels": int(comp.sum()),
                "in_truth": int((comp & truth).sum()),
                "slices": (int(z[0]), int(z[-1])),
                "mask": comp,
            }
        )
    return sorted(rows, key=lambda r: -r["voxels"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a .pt checkpoint or 'default'")
    ap.add_argument("--case", required=True, help="a volume case id, e.g. chaos/36")
    ap.add_argument("--target", required=True)
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    ap.add_argument(
        "--truth-of",
        help="score against this target's truth instead (e.g. the "
        "other kidney: how much of a kidney prompt's mask lies in it)",
    )
    ap.add_argument("--out", type=Path, help="PNG of the largest false component's slices")
    ap.add_argument("--no-presence-gate", action="store_true")
    ap.add_argument(
        "--presence-threshold",
        type=float,
        help="tau for the gate (default: the checkpoint's calibrated one, else 0.5)",
    )
    args = ap.parse_args()
    kind = DATASET_OF_PREFIX[args.case.split("/")[0]]
    case = next(
        (
            c
            for c in iter_cases(kind, args.data_root / DATASET_FOLDERS[kind], "val", progress=False)
            if c.case_id == args.case
        ),
        None,
    )
    if case is None:
        raise SystemExit(f"{args.case}: not a {kind} validation case")
    loaded = load_checkpoint(args.checkpoint)
    raw = Predictor(loaded).segment(
        case, [f"Segment the {args.target}"], [args.target], threshold=0.5, probabilities=True
    )
    tau = args.presence_threshold
    if tau is None:
        tau = loaded.presence_thresholds.get(args.target, DEFAULT_TAU)
    variants = gated_variants(case, args.target, raw.masks[0], raw.presence[0], tau)
    mask = variants["ungated" if args.no_presence_gate else "gated"]
    truth = case.masks[args.truth_of or args.target]
    z_truth = np.flatnonzero(truth.any(axis=(1, 2)))
    print(
        f"{args.case} {args.target}: {args.truth_of or args.target} truth {int(truth.sum())} "
        f"voxels on slices {z_truth[0]}-{z_truth[-1]}; mask {int(mask.sum())} voxels (tau {tau})"
    )
    comps = components(mask, truth)
    for r in comps[:8]:
        print(
            f"  component {r['voxels']:7d} voxels, slices {r['slices'][0]}-{r['slices'][1]}, "
            f"{r['in_truth']} in the truth"
        )
    if args.truth_of:  # the other target's truth, piece by piece: stray labels show here
        for r in components(truth, mask):
            print(
                f"  {args.truth_of} truth component {r['voxels']:6d} voxels, slices "
                f"{r['slices'][0]}-{r['slices'][1]}, {r['in_truth']} in the mask"
            )
    false = [r for r in comps if r["in_truth"] == 0]
    if args.out and false:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        blob = false[0]["mask"]
        zs = np.flatnonzero(blob.any(axis=(1, 2)))
        picks = [*zs[np.linspace(0, len(zs) - 1, 3).astype(int)]]
        if len(z_truth):
            picks.append(int(z_truth[len(z_truth) // 2]))
        fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 4.4))
        for ax, z in zip(axes, picks):
            ax.imshow(case.image[z], cmap="gray")
            ax.contour(mask[z], levels=[0.5], colors="red", linewidths=1)
            if truth[z].any():
                ax.contour(truth[z], levels=[0.5], colors="lime", linewidths=1)
            ax.set_title(f"slice {z}")
            ax.axis("off")
        fig.suptitle(
            f"{args.case} '{args.target}' ({Path(str(args.checkpoint)).name}): "
            "mask red, truth green",
            fontsize=10,
        )
        write_figure_atomic(fig, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
