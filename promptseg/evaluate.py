"""``promptseg evaluate``: per-case metrics, summary.json and an overlay grid for one dataset.

Cases: a CHAOS or LiTS volume is one case (3D metrics on the native grid, spacing in mm); a
brain tumour or BTCV slice is one case (2D metrics; distances in pixels since PNGs carry no
spacing). Every target a case annotates is prompted. Present targets give metric rows; absent
ones are scored slice by slice as "answered with an empty mask" or not.

By default the scores are those of what ``promptseg-run`` delivers: masks are the
probabilities above ``--threshold`` on the slices that pass the presence gate (each target's
tau from the checkpoint), and each single-organ mask (liver, spleen, either kidney) of a volume
keeps only its largest 3D connected component (:mod:`promptseg.postprocess`; tumours and 2D
slice cases are never reduced). ``--no-presence-gate`` and ``--postprocess none`` turn each
off. The ungated and gated Dice and empty rates are written beside the deployed ones, and the
absent-target empty rate is split into same-domain and cross-domain prompts.
"""

from __future__ import annotations

import csv
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from promptseg.cases import iter_cases, segment_case
from promptseg.checkpoint import LoadedCheckpoint, load_checkpoint
from promptseg.data.bank import DOMAIN
from promptseg.data.datasets import DATASET_FOLDERS, KINDS, Case, load_cases
from promptseg.metrics import segmentation_metrics
from promptseg.postprocess import POSTPROCESS_MODES, applies, largest_component
from promptseg.preprocess import normalize
from promptseg.presence import DEFAULT_TAU
from promptseg.runtime.slices import Presence, SliceMasks
from promptseg.runtime.writers import atomic_write, write_figure_atomic, write_json_atomic

METRIC_KEYS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "f1",
    "pixel_accuracy",
    "hd",
    "hd95",
    "kappa",
    "ap",
)


def require_int(value: object, option: str, minimum: int) -> None:
    """One-line ValueError naming ``option`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")


def dataset_folders(data_root: str | Path, datasets: Sequence[str]) -> dict[str, Path]:
    """{kind: folder} of each dataset under the shared data folder, all checked to exist.

    Raises:
        ValueError: An unknown dataset kind.
        FileNotFoundError: A dataset folder is missing (the first one, named).
    """
    folders = {}
    for kind in datasets:
        if kind not in KINDS:
            raise ValueError(f"unknown dataset {kind!r}; expected one of {list(KINDS)}")
        folder = Path(data_root) / DATASET_FOLDERS[kind]
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: dataset folder not found")
        folders[kind] = folder
    return folders


def case_metrics(
    case: Case, pred: np.ndarray, truth: np.ndarray, prob: np.ndarray | None = None
) -> dict:
    """:func:`segmentation_metrics` with the case rule: a volume is scored in 3D with its
    spacing in mm, a slice case in 2D (distances in pixels). Arrays are (Z, H, W)."""
    if case.is_volume:
        return segmentation_metrics(pred, truth, case.spacing, prob)
    return segmentation_metrics(
        pred[0], truth[0], case.spacing[1:], None if prob is None else prob[0]
    )


def grid_sample(row: dict, slices: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> dict:
    """An :func:`overlay_grid` sample: ``row`` and the slice with the largest truth area."""
    z = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(1)))
    return {"row": row, "image": slices[z], "pred": pred[z], "truth": truth[z]}


class Predictor:
    """A checkpoint as a runtime engine (:class:`~promptseg.runtime.torch_engine.TorchEngine`)
    and its prompt -> FiLM mapping; cases go through the runtime's slice path."""

    def __init__(self, loaded: LoadedCheckpoint, batch: int = 16) -> None:
        from promptseg.runtime.torch_engine import TorchEngine

        self.loaded = loaded
        self.batch = batch
        self.engine = TorchEngine(loaded, device="cpu")
        self._encoder = None

    def embedding(self, prompt: str) -> torch.Tensor:
        """(E,) embedding from the checkpoint's cache, else from the text encoder."""
        emb = self.loaded.embedding(prompt)
        if emb is None:
            if self._encoder is None:
                from promptseg.model.text import TextEncoder

                self._encoder = TextEncoder(self.loaded.text_encoder["name"])
            emb = self._encoder([prompt])[0]
        return emb

    @torch.no_grad()
    def films(self, prompts: Sequence[str]) -> list[np.ndarray]:
        """(P,) float32 FiLM vector of each prompt."""
        if not prompts:
            return []
        film = self.loaded.model.film(torch.stack([self.embedding(p) for p in prompts]))
        return list(film.float().numpy())

    def segment(
        self,
        case: Case,
        prompts: Sequence[str],
        targets: Sequence[str],
        *,
        threshold: float = 0.5,
        postprocess: str = "none",
        presence_thresholds: Sequence[float | None] | None = None,
        probabilities: bool = False,
    ) -> SliceMasks:
        """Masks (K, Z, H, W) of a case for K prompts (:func:`promptseg.cases.segment_case`)."""
        return segment_case(
            self.engine,
            case,
            self.films(prompts),
            targets,
            self.loaded.preprocessing,
            batch=self.batch,
            threshold=threshold,
            postprocess=postprocess,
            presence_thresholds=presence_thresholds,
            probabilities=probabilities,
        )


@dataclass
class _Prompting:
    mode: str
    seed: int = 0

    def prompt(self, loaded: LoadedCheckpoint, target: str, case_id: str) -> str:
        vocab = loaded.vocabulary
        if self.mode == "canonical":
            return vocab.canonical(target)
        pool = (
            vocab.train_prompts(target) if self.mode == "train" else vocab.heldout_prompts(target)
        )
        return random.Random(f"{self.seed}:{case_id}:{target}").choice(pool)


def dice_of(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool arrays (1.0 when both are empty)."""
    denom = int(pred.sum()) + int(truth.sum())
    return 2.0 * int(np.logical_and(pred, truth).sum()) / denom if denom else 1.0


def gated_variants(
    case: Case, target: str, mask: np.ndarray, presence: Presence, tau: float
) -> dict[str, np.ndarray]:
    """The ungated mask (Z, H, W) and the gated one (slices with presence < ``tau`` emptied;
    the same array when the model has no presence output)."""
    gated = mask
    if presence.slice_probability is not None:
        gated = mask.copy()
        gated[presence.slice_probability < tau] = False
    return {"ungated": mask, "gated": gated}


def _kidney_overlap(pred: np.ndarray, case: Case) -> dict[str, float]:
    """Fraction of predicted voxels inside the left / right kidney truth."""
    total = max(int(pred.sum()), 1)
    return {
        "left": float((pred & case.masks["left kidney"]).sum() / total),
        "right": float((pred & case.masks["right kidney"]).sum() / total),
    }


def _fmt(v: object) -> object:
    return round(v, 6) if isinstance(v, float) else v


def evaluate(
    checkpoint: str | Path,
    data: Path,
    dataset: str,
    out: Path,
    *,
    split: str | None = None,
    prompt_set: str = "canonical",
    batch: int = 16,
    threads: int = 2,
    threshold: float = 0.5,
    max_cases: int = 0,
    progress: bool = True,
    postprocess: str = "largest",
    presence_gate: bool = True,
    presence_threshold: float | None = None,
) -> dict:
    """Evaluate every case of ``data`` (or one split); write cases.csv, summary.json, PNG grid.

    Args:
        checkpoint: A ``.pt`` checkpoint or ``"default"``.
        data: The dataset's folder.
        dataset: Its kind (one of :data:`promptseg.data.datasets.KINDS`).
        out: Output folder (created once the inputs are checked).
        split: Only this documented split (``None``: every case).
        prompt_set: "canonical", "train" or "heldout" phrasings.
        batch: Slices per forward pass.
        threads: Torch CPU threads.
        threshold: Probability threshold of the masks.
        max_cases: First N cases only (0: all).
        progress: Show a progress bar.
        postprocess: "largest" (``promptseg-run``'s default): keep the largest 3D component of
            single-organ masks in volumes before scoring
            (:func:`promptseg.postprocess.applies`); "none": keep every component.
        presence_gate: Empty the slices whose presence probability is below the target's tau
            (the checkpoint's ``presence_thresholds``, else 0.5), as ``promptseg-run`` does.
            The ungated Dice and empty rates are reported beside the deployed ones either way.
        presence_threshold: One tau for every target instead of the checkpoint's.

    Raises:
        FileNotFoundError: Missing checkpoint or data folder.
        ValueError: Bad numbers, an unknown dataset, split, prompt set or postprocess mode, or
            an unreadable checkpoint.
    """
    require_int(batch, "--batch", 1)
    require_int(threads, "--threads", 1)
    require_int(max_cases, "max_cases", 0)
    if postprocess not in POSTPROCESS_MODES:
        raise ValueError(f"postprocess must be one of {POSTPROCESS_MODES}, got {postprocess!r}")
    if prompt_set not in ("canonical", "train", "heldout"):
        raise ValueError(
            f"prompt set must be one of ['canonical', 'train', 'heldout'], got {prompt_set!r}"
        )
    torch.set_num_threads(threads)
    started = time.time()
    loaded = load_checkpoint(checkpoint)
    predictor = Predictor(loaded, batch)
    prompting = _Prompting(prompt_set)
    load_cases(dataset, Path(data), split)  # checks the folder and split before out is made
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    absent: list[dict] = []
    kidney: dict[str, list[dict[str, float]]] = {"left kidney": [], "right kidney": []}
    samples: list[dict] = []
    taus = {
        t: presence_threshold
        if presence_threshold is not None
        else loaded.presence_thresholds.get(t, DEFAULT_TAU)
        for t in loaded.vocabulary.targets
    }
    for case in iter_cases(
        dataset, data, split, max_cases=max_cases, progress=progress, desc=f"evaluate {dataset}"
    ):
        targets = [t for t in case.masks if t in loaded.vocabulary.targets]
        prompts = [prompting.prompt(loaded, t, case.case_id) for t in targets]
        raw = predictor.segment(case, prompts, targets, threshold=threshold, probabilities=True)
        slices = normalize(case.image, case.modality, loaded.preprocessing)  # shown in the grid
        for k, (target, prompt) in enumerate(zip(targets, prompts)):
            variants = gated_variants(case, target, raw.masks[k], raw.presence[k], taus[target])
            for name, mask in variants.items():
                if applies(target, postprocess, case.is_volume):
                    variants[name] = largest_component(mask)
            pred = variants["gated" if presence_gate else "ungated"]
            prob = np.where(pred, raw.probabilities[k], 0.0)
            truth = case.masks[target]
            if truth.any():
                m = case_metrics(case, pred, truth, prob)
                row = {
                    "case": case.case_id,
                    "target": target,
                    "prompt": prompt,
                    **{k2: m.get(k2, float("nan")) for k2 in METRIC_KEYS},
                    "dice_ungated": dice_of(variants["ungated"], truth),
                    "dice_gated": dice_of(variants["gated"], truth),
                    "truth_voxels": int(truth.sum()),
                    "pred_voxels": int(pred.sum()),
                }
                rows.append(row)
                samples.append(grid_sample(row, slices, pred, truth))
                if target in kidney and "left kidney" in case.masks:
                    kidney[target].append(_kidney_overlap(pred, case))
            for z in np.flatnonzero(~truth.reshape(truth.shape[0], -1).any(1)):
                absent.append(
                    {
                        "case": case.case_id,
                        "slice": int(z),
                        "target": target,
                        "empty": bool(not pred[z].any()),
                        "empty_ungated": bool(not variants["ungated"][z].any()),
                        "empty_gated": bool(not variants["gated"][z].any()),
                        "same_domain": target in DOMAIN[case.dataset],
                    }
                )
    summary = _summarise(rows, absent, kidney, loaded, dataset, split, prompt_set, threshold)
    summary["postprocess"] = postprocess
    summary["presence_gate"] = presence_gate
    summary["presence_thresholds"] = taus
    summary["seconds"] = round(time.time() - started, 1)
    write_csv(rows, out / "cases.csv")
    write_csv(absent, out / "absent.csv")
    write_json_atomic(summary, out / "summary.json")
    if samples:
        overlay_grid(samples, out / "overlays.png")
    return summary


def _summarise(
    rows: list[dict],
    absent: list[dict],
    kidney: dict,
    loaded: LoadedCheckpoint,
    dataset: str,
    split: str | None,
    prompt_set: str,
    threshold: float,
) -> dict:
    targets: dict[str, dict] = {}
    for target in loaded.vocabulary.targets:
        sel = [r for r in rows if r["target"] == target]
        if not sel:
            continue
        entry: dict = {"n": len(sel)}
        for key in METRIC_KEYS:
            vals = np.array([r[key] for r in sel], dtype=float)
            vals = vals[np.isfinite(vals)]
            entry[f"{key}_mean"] = float(vals.mean()) if vals.size else None
            entry[f"{key}_std"] = float(vals.std()) if vals.size else None
        for variant in ("dice_ungated", "dice_gated"):
            entry[f"{variant}_mean"] = float(np.mean([r[variant] for r in sel]))
        targets[target] = entry
    by_target = {}
    for target in sorted({a["target"] for a in absent}):
        sel = [a["empty"] for a in absent if a["target"] == target]
        by_target[target] = {"empty_rate": float(np.mean(sel)), "n": len(sel)}
    same = [a["empty"] for a in absent if a["same_domain"]]
    cross = [a["empty"] for a in absent if not a["same_domain"]]
    confusion = {
        t: ({k: float(np.mean([o[k] for o in v])) for k in ("left", "right")} if v else None)
        for t, v in kidney.items()
    }
    dice_means = [t["dice_mean"] for t in targets.values() if t["dice_mean"] is not None]
    return {
        "checkpoint": str(loaded.path),
        "dataset": dataset,
        "split": split or "all",
        "prompt_set": prompt_set,
        "threshold": threshold,
        "targets": targets,
        "mean_dice": float(np.mean(dice_means)) if dice_means else None,
        "absent_empty_rate": float(np.mean([a["empty"] for a in absent])) if absent else None,
        "absent_n": len(absent),
        "absent_same_domain_empty_rate": float(np.mean(same)) if same else None,
        "absent_same_domain_n": len(same),
        "absent_cross_domain_empty_rate": float(np.mean(cross)) if cross else None,
        "absent_cross_domain_n": len(cross),
        **{
            f"absent_empty_rate_{v}": float(np.mean([a[f"empty_{v}"] for a in absent]))
            if absent
            else None
            for v in ("ungated", "gated")
        },
        **{
            f"mean_dice_{v}": float(np.mean([t[f"dice_{v}_mean"] for t in targets.values()]))
            if targets
            else None
            for v in ("ungated", "gated")
        },
        "absent_by_target": by_target,
        "kidney_confusion": confusion,
        "vocabulary_sha256": loaded.vocabulary.sha256(),
    }


def write_csv(rows: list[dict], path: Path) -> None:
    """Rows as CSV (floats to 6 decimals), written atomically (temporary file, then rename)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            if rows:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)

    atomic_write(path, write)


def pick_samples(samples: list[dict], per_target: int = 3) -> list[dict]:
    """Rule-based picks per target: best, median and worst Dice (failure cases included).

    Each pick is a copy of its sample with ``"pick"`` naming the rule ("best", "median",
    "worst", joined with "=" where one case is several of them).
    """
    picked = []
    for target in dict.fromkeys(s["row"]["target"] for s in samples):
        sel = sorted(
            (s for s in samples if s["row"]["target"] == target), key=lambda s: s["row"]["dice"]
        )
        rules = {"best": len(sel) - 1, "median": len(sel) // 2, "worst": 0}
        idx = sorted(set(rules.values()))[::-1][:per_target]
        for i in idx:
            pick = "=".join(name for name, j in rules.items() if j == i)
            picked.append({**sel[i], "pick": pick})
    return picked


def overlay_grid(
    samples: list[dict], path: Path, per_target: int = 3, title: str | None = None
) -> Path:
    """PNG grid: input | prediction | truth | overlay (prediction red, truth green, both yellow).

    Rows are :func:`pick_samples`' picks, each labelled with its rule; ``title`` goes on top.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = pick_samples(samples, per_target)
    fig, axes = plt.subplots(len(picked), 4, figsize=(10, 2.6 * len(picked)), squeeze=False)
    for ax_row, s in zip(axes, picked):
        img = s["image"]
        rgb = np.repeat(img[..., None], 3, axis=-1) * 0.7
        rgb[..., 0] = np.where(s["pred"], 1.0, rgb[..., 0])
        rgb[..., 1] = np.where(s["truth"], 1.0, rgb[..., 1])
        tiles = [img, s["pred"], s["truth"], rgb]
        titles = ["input", "prediction", "truth", f"dice {s['row']['dice']:.3f}"]
        for ax, tile, text in zip(ax_row, tiles, titles):
            ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_title(text, fontsize=8)
            ax.axis("off")
        ax_row[0].set_title(f"{s['pick']}: {s['row']['case']} | {s['row']['target']}", fontsize=8)
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=9)
        top = 1.0 - (0.2 + 0.16 * (title.count("\n") + 1)) / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, top))
    write_figure_atomic(fig, path, dpi=80)
    plt.close(fig)
    return path
