"""``promptseg robustness``: how a checkpoint answers prompts it was not trained on.

Four measurements on the validation splits (``promptseg/data/partition.json``), all with the case
rule of ``promptseg evaluate`` (a CHAOS or LiTS volume is one case, scored in 3D on its native
grid; a brain tumour or BTCV slice is one case, scored in 2D) and its :class:`Predictor`:

1. **Phrasing.** Every present target of every case is prompted with its canonical phrasing
   (``"Segment the {target}"``), with ``phrasings`` distinct training phrasings and with
   ``phrasings`` distinct held-out phrasings (drawn per case and target by
   :class:`promptseg.evaluate._Prompting`, seeds ``seed``, ``seed + 1``, ...). Dice per target
   per set, and the paired difference to the canonical prompt on the same case. Held-out
   phrasings are also grouped by what is new in them: the synonym, the template, or both.
2. **Wrong target.** The canonical prompt of every target a case annotates, scored per slice
   where that target's truth is empty: "answered empty" when no pixel is predicted on the
   slice. Same-domain (spleen on a slice without spleen, meningioma on a glioma slice) and
   cross-domain (brain tumour prompts on abdominal slices, abdominal prompts on brain slices)
   per prompt target. The domains are :data:`promptseg.data.bank.DOMAIN`.
3. **Left/right kidney.** On CHAOS and BTCV, the canonical left- and right-kidney prompts on
   every case: the fractions of all predicted voxels (pooled over the split) inside the
   left-kidney truth, inside the right-kidney truth and elsewhere (each row sums to 1), and the
   Dice of each prompt against each side (mean over the cases where that side is present).
4. **Free-form.** Clinical phrasings from a JSON file (default: the packaged
   ``promptseg/data/free_form.json``; ``--free-form FILE`` for another):
   Dice on their target where it is present; off-topic prompts: the per-slice empty rate over
   every validation slice. For each, whether the runtime's prompt resolver
   (:mod:`promptseg.runtime.prompt_resolver`, the packaged engine's calibrated cosine
   threshold) would refuse it. Masks here come from the PyTorch path for every prompt, refused
   or not.

Outputs: ``results.json`` (everything), ``cases.csv`` (one row per scored case and prompt;
BTCV and LiTS rows go to ``btcv-ct/cases.csv`` and ``lits-ct/cases.csv``, kept local),
``report.md`` (generated tables only) and ``kidney_confusion.png``. No image pixels are written.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from promptseg.cases import iter_cases
from promptseg.checkpoint import LoadedCheckpoint, load_checkpoint, resolve_checkpoint
from promptseg.data.bank import DOMAIN
from promptseg.data.datasets import KINDS, LOCAL_ONLY, Case
from promptseg.evaluate import (
    Predictor,
    _Prompting,
    case_metrics,
    dataset_folders,
    require_int,
    write_csv,
)
from promptseg.prompts import FREE_FORM
from promptseg.runtime.manifest import sha256_file
from promptseg.runtime.writers import write_figure_atomic, write_json_atomic, write_text_atomic

SETS = ("canonical", "train", "heldout")
KIDNEYS = ("left kidney", "right kidney")
KIDNEY_DATASETS = ("chaos-mr", "btcv-ct")
DEFAULT_FREE_FORM = Path(__file__).resolve().parent / "data" / "free_form.json"  # package data
PROMPT_CHUNK = 8


# ----------------------------------------------------------------------------- free-form file


@dataclass(frozen=True)
class FreeForm:
    """Free-form prompts: ``targeted`` (prompt, target) pairs and ``off_topic`` prompts."""

    targeted: tuple[tuple[str, str], ...]
    off_topic: tuple[str, ...]
    path: Path
    sha256: str


def load_free_form(path: str | Path, targets: Sequence[str]) -> FreeForm:
    """Read and validate the free-form prompt file.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not JSON, or entries of the wrong shape, or an unknown target (one line,
            naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: free-form prompt file not found")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict) or not {"targeted", "off_topic"} <= set(data):
        raise ValueError(f"{path}: expected an object with lists 'targeted' and 'off_topic'")
    targeted = []
    for i, item in enumerate(data["targeted"]):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("prompt"), str)
            or not item["prompt"].strip()
        ):
            raise ValueError(f"{path}: targeted[{i}] must be {{'prompt': text, 'target': name}}")
        if item.get("target") not in targets:
            raise ValueError(
                f"{path}: targeted[{i}] ({item['prompt']!r}) has target {item.get('target')!r}; "
                f"expected one of {list(targets)}"
            )
        targeted.append((item["prompt"], item["target"]))
    off = data["off_topic"]
    if not isinstance(off, list) or not all(isinstance(p, str) and p.strip() for p in off):
        raise ValueError(f"{path}: 'off_topic' must be a list of non-empty strings")
    if not targeted and not off:
        raise ValueError(f"{path}: no prompts (both 'targeted' and 'off_topic' are empty)")
    return FreeForm(tuple(targeted), tuple(off), path, hashlib.sha256(raw).hexdigest())


# ----------------------------------------------------------------------------- helpers


def draw_phrasings(
    loaded: LoadedCheckpoint, mode: str, target: str, case_id: str, k: int, seed: int = 0
) -> list[str]:
    """Up to ``k`` distinct phrasings of ``target`` for one case (``mode``: train or heldout)."""
    out: list[str] = []
    for s in range(seed, seed + 25 * k):
        p = _Prompting(mode, s).prompt(loaded, target, case_id)
        if p not in out:
            out.append(p)
        if len(out) == k:
            break
    return out


def heldout_kind(loaded: LoadedCheckpoint, target: str, prompt: str) -> str:
    """What is new in a held-out phrasing: "synonym", "template" or "synonym+template"."""
    v = loaded.vocabulary
    for syn in v.synonyms[target] + v.heldout_synonyms.get(target, []):
        for tmpl in v.templates + v.heldout_templates:
            if tmpl.format(x=syn) == prompt:
                new_syn = syn in v.heldout_synonyms.get(target, [])
                new_tmpl = tmpl in v.heldout_templates
                return "+".join(n for n, f in (("synonym", new_syn), ("template", new_tmpl)) if f)
    return "unknown"


def known_phrasing(vocab, prompt: str) -> str | None:
    """ "train" or "heldout" when ``prompt`` (normalised as the runtime does) is a vocabulary
    phrasing of that set, else ``None``."""
    from promptseg.runtime.prompt_resolver import normalise_prompt

    key = normalise_prompt(prompt)
    for target in vocab.targets:
        if key in {normalise_prompt(p) for p in vocab.train_prompts(target)}:
            return "train"
    for target in vocab.targets:
        if key in {normalise_prompt(p) for p in vocab.heldout_prompts(target)}:
            return "heldout"
    return None


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


def _git_hash() -> str:
    from promptseg.studies.runner import git_hash

    return git_hash()


# ----------------------------------------------------------------------------- accumulation


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


# ----------------------------------------------------------------------------- refusal


def refusal_verdicts(prompts: Sequence[str], engine: str | Path | None = None) -> dict:
    """Would the runtime's prompt resolver refuse each prompt? (needs onnxruntime).

    Returns:
        ``{"engine", "threshold", "engine_checkpoint_sha256", "calibration_prompts",
        "prompts": {prompt: {refused, resolved_by, similarity, nearest_target,
        nearest_prompt, in_calibration}}}``, or ``{"error": text}`` when the engine cannot be
        opened.
    """
    try:
        from promptseg.runtime.manifest import EngineFolder
        from promptseg.runtime.prompt_resolver import (
            PromptError,
            PromptResolver,
            normalise_prompt,
        )

        folder = EngineFolder.open(engine)
        resolver = PromptResolver(folder, threads=1)
    except Exception as exc:  # noqa: BLE001 - reported in the results, not fatal
        return {"error": " ".join(str(exc).split()) or type(exc).__name__}
    refusal = folder.manifest.get("prompt_refusal", {})
    calibration = {normalise_prompt(p) for p in refusal.get("off_target", [])}
    calibration |= {normalise_prompt(p) for ps in FREE_FORM.values() for p in ps}
    out: dict[str, dict] = {}
    for prompt in prompts:
        try:
            r = resolver.resolve(prompt)
            refused, how = False, r.how
        except PromptError:
            refused, how = True, "refused"
        i, sim = resolver.nearest(resolver.embed([prompt])[0])
        out[prompt] = {
            "refused": refused,
            "resolved_by": how,
            "similarity": sim,
            "nearest_target": resolver.cache.targets[i],
            "nearest_prompt": resolver.cache.prompts[i],
            "in_calibration": normalise_prompt(prompt) in calibration,
        }
    return {
        "engine": str(folder.path),
        "engine_manifest_sha256": folder.manifest_sha256,
        "threshold": resolver.threshold,
        "engine_checkpoint_sha256": folder.manifest.get("checkpoint", {}).get("sha256"),
        "calibration_prompts": len(calibration),
        "prompts": out,
    }


# ----------------------------------------------------------------------------- main entry


def robustness(
    checkpoint: str | Path,
    data_root: str | Path,
    out: str | Path,
    *,
    datasets: Sequence[str] = KINDS,
    max_cases: int = 0,
    phrasings: int = 3,
    seed: int = 0,
    free_form: str | Path = DEFAULT_FREE_FORM,
    engine: str | Path | None = None,
    threshold: float = 0.5,
    batch: int = 16,
    threads: int = 1,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the four measurements and write results.json, cases.csv, report.md and the PNG.

    Args:
        checkpoint: A ``.pt`` checkpoint or ``"default"``.
        data_root: The shared data folder (one sub-folder per dataset).
        out: Output folder (created).
        datasets: Dataset kinds to use (validation split of each).
        max_cases: First N cases per dataset only (0: all).
        phrasings: Distinct training / held-out phrasings per (case, target).
        seed: First seed of the phrasing draw.
        free_form: The free-form prompt file.
        engine: Engine folder for the refusal verdicts (``None``: the packaged engine).
        threshold: Probability threshold of the masks.
        batch: Slices per forward pass.
        threads: Torch CPU threads.
        command: The command line to record (default: built from the arguments).
        log: Progress lines.

    Raises:
        FileNotFoundError: Missing checkpoint, data folder or free-form file.
        ValueError: Unknown dataset, bad numbers (``phrasings``, ``threads``, ``batch`` < 1,
            ``max_cases`` < 0), malformed free-form file or checkpoint. All are checked before
            ``out`` is created.
    """
    started = time.time()
    git = _git_hash()  # at the start: the code that produced the numbers
    require_int(phrasings, "--phrasings", 1)
    require_int(max_cases, "--max-cases", 0)
    require_int(threads, "--threads", 1)
    require_int(batch, "batch", 1)
    data_root = Path(data_root)
    folders = dataset_folders(data_root, datasets)
    ckpt_path = resolve_checkpoint(checkpoint)
    loaded = load_checkpoint(ckpt_path)
    ff = load_free_form(free_form, loaded.vocabulary.targets)
    if command is None:
        command = robustness_command(
            checkpoint, data_root, out, datasets, max_cases, phrasings, seed, free_form, engine
        )
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(loaded, batch)
    tally = _Tally(ff)
    counts: dict[str, dict] = {}
    for kind in datasets:
        t0 = time.time()
        n_cases = n_slices = n_pred = 0
        for case in iter_cases(kind, folders[kind], "val", max_cases=max_cases):
            req = tally.requests(case, loaded, phrasings, seed)
            prompts = list(req)
            for start in range(0, len(prompts), PROMPT_CHUNK):
                chunk = prompts[start : start + PROMPT_CHUNK]
                masks = predictor.segment(case, chunk, chunk, threshold=threshold).masks
                for prompt, pred in zip(chunk, masks):
                    for use in req[prompt]:
                        tally.use(case, prompt, pred, use)
            n_cases += 1
            n_slices += case.image.shape[0]
            n_pred += case.image.shape[0] * len(prompts)
        counts[kind] = {"cases": n_cases, "slices": n_slices, "slice_predictions": n_pred}
        log(
            f"{kind}: {n_cases} cases, {n_slices} slices, {n_pred} slice predictions "
            f"in {time.time() - t0:.0f} s"
        )
    verdicts = refusal_verdicts([p for p, _ in ff.targeted] + list(ff.off_topic), engine)
    results = summarise(tally, loaded, verdicts)
    results["meta"] = {
        "command": command,
        "git": git,
        "checkpoint": str(checkpoint),
        "checkpoint_path": str(ckpt_path),
        "checkpoint_sha256": sha256_file(ckpt_path),
        "data_root": str(data_root),
        "split": "val",
        "datasets": counts,
        "max_cases": max_cases,
        "phrasings": phrasings,
        "seed": seed,
        "threshold": threshold,
        "postprocess": "none",
        "free_form_file": str(ff.path),
        "free_form_sha256": ff.sha256,
        "vocabulary_sha256": loaded.vocabulary.sha256(),
        "seconds": round(time.time() - started, 1),
    }
    _write_outputs(results, tally.rows, out)
    log(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'kidney_confusion.png'}")
    return results


def robustness_command(
    checkpoint: str | Path,
    data_root: str | Path,
    out: str | Path,
    datasets: Sequence[str],
    max_cases: int,
    phrasings: int,
    seed: int,
    free_form: str | Path,
    engine: str | Path | None,
) -> str:
    """The ``promptseg robustness`` command line that reproduces a run."""
    args = ["promptseg", "robustness", str(checkpoint), "--data-root", str(data_root)]
    args += ["--out", str(out)]
    if list(datasets) != list(KINDS):
        args += ["--datasets", *datasets]
    if max_cases:
        args += ["--max-cases", str(max_cases)]
    args += ["--phrasings", str(phrasings), "--seed", str(seed)]
    if Path(free_form).resolve() != DEFAULT_FREE_FORM:
        args += ["--free-form", str(free_form)]
    if engine is not None:
        args += ["--engine", str(engine)]
    return shlex.join(args)


# ----------------------------------------------------------------------------- summary


def summarise(tally: _Tally, loaded: LoadedCheckpoint, verdicts: dict) -> dict:
    """The results dict (without ``meta``) from the gathered rows and counts."""
    rows = [r for r in tally.rows if r["set"] in SETS]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    sets: dict[str, dict] = {}
    for ds in datasets:
        for target in loaded.vocabulary.targets:
            sel = [r for r in rows if r["dataset"] == ds and r["target"] == target]
            if not sel:
                continue
            canon = {r["case"]: r["dice"] for r in sel if r["set"] == "canonical"}
            entry = {}
            for s in SETS:
                dice = [r["dice"] for r in sel if r["set"] == s]
                per_case: dict[str, list[float]] = {}
                for r in sel:
                    if r["set"] == s:
                        per_case.setdefault(r["case"], []).append(r["dice"])
                deltas = [np.mean(v) - canon[c] for c, v in per_case.items() if c in canon]
                entry[s] = {
                    "dice_mean": _mean(dice),
                    "dice_sd": _sd(dice),
                    "n": len(dice),
                    "cases": len(per_case),
                    "phrasings": len({r["prompt"] for r in sel if r["set"] == s}),
                    "delta_vs_canonical": _mean(deltas) if s != "canonical" else None,
                }
            sets.setdefault(ds, {})[target] = entry
    overall = {}
    for s in SETS:
        means = [e[s]["dice_mean"] for d in sets.values() for e in d.values()]
        means = [m for m in means if m is not None]
        overall[s] = {"mean_of_target_means": _mean(means), "targets": len(means)}

    per_phrasing: dict[str, dict] = {}
    for s in ("train", "heldout"):
        for target in loaded.vocabulary.targets:
            sel = [r for r in rows if r["set"] == s and r["target"] == target]
            by: dict[str, list[float]] = {}
            for r in sel:
                by.setdefault(r["prompt"], []).append(r["dice"])
            if by:
                per_phrasing.setdefault(s, {})[target] = {
                    p: {
                        "dice_mean": float(np.mean(v)),
                        "n": len(v),
                        **({"new": heldout_kind(loaded, target, p)} if s == "heldout" else {}),
                    }
                    for p, v in sorted(by.items())
                }
    by_kind: dict[str, dict] = {}
    for target, phr in per_phrasing.get("heldout", {}).items():
        for prompt, e in phr.items():
            d = by_kind.setdefault(target, {}).setdefault(e["new"], [])
            d += [r["dice"] for r in rows if r["set"] == "heldout" and r["prompt"] == prompt]
    heldout_by_kind = {
        t: {k: {"dice_mean": _mean(v), "n": len(v)} for k, v in sorted(d.items())}
        for t, d in by_kind.items()
    }

    wrong: dict[str, dict] = {"same": {}, "cross": {}}
    for (ds, target, domain), (empty, n, frac) in sorted(tally.absent.items()):
        if n:
            wrong[domain].setdefault(target, {})[ds] = {
                "empty_rate": empty / n,
                "n": n,
                "mean_predicted_fraction": frac / n,
            }
    pooled = {}
    for domain in ("same", "cross"):
        per_target = {}
        for target, by_ds in wrong[domain].items():
            e = sum(v["empty_rate"] * v["n"] for v in by_ds.values())
            n = sum(v["n"] for v in by_ds.values())
            per_target[target] = {"empty_rate": e / n, "n": n}
        all_e = sum(v["empty_rate"] * v["n"] for v in per_target.values())
        all_n = sum(v["n"] for v in per_target.values())
        pooled[domain] = {
            "by_target": per_target,
            "empty_rate": all_e / all_n if all_n else None,
            "n": all_n,
        }

    kidney = {
        ds: {t: kidney_confusion_row(tally.kidney[ds][t]) for t in KIDNEYS if t in tally.kidney[ds]}
        for ds in tally.kidney
    }

    ff = tally.free_form
    vmap = verdicts.get("prompts", {})
    targeted = []
    for i, (prompt, target) in enumerate(ff.targeted):
        sel = [r for r in tally.rows if r["set"] == "free-form" and r["prompt"] == prompt]
        sel = [r for r in sel if r["target"] == target]
        by_ds = {}
        for ds in dict.fromkeys(r["dataset"] for r in sel):
            d = [r["dice"] for r in sel if r["dataset"] == ds]
            canon = sets.get(ds, {}).get(target, {}).get("canonical", {}).get("dice_mean")
            by_ds[ds] = {"dice_mean": _mean(d), "n": len(d), "canonical_dice_mean": canon}
        targeted.append(
            {
                "index": i,
                "prompt": prompt,
                "target": target,
                "dice": by_ds,
                "known_phrasing": known_phrasing(loaded.vocabulary, prompt),
                "refusal": vmap.get(prompt),
            }
        )
    off_topic = []
    for i, prompt in enumerate(ff.off_topic):
        by_ds = {
            ds: {"empty_rate": e / n, "n": n}
            for (j, ds), (e, n) in tally.off.items()
            if j == i and n
        }
        e = sum(v["empty_rate"] * v["n"] for v in by_ds.values())
        n = sum(v["n"] for v in by_ds.values())
        off_topic.append(
            {
                "index": i,
                "prompt": prompt,
                "empty_rate": e / n if n else None,
                "n": n,
                "by_dataset": by_ds,
                "known_phrasing": known_phrasing(loaded.vocabulary, prompt),
                "refusal": vmap.get(prompt),
            }
        )
    return {
        "prompt_sets": sets,
        "prompt_sets_overall": overall,
        "per_phrasing": per_phrasing,
        "heldout_by_kind": heldout_by_kind,
        "wrong_target": {**wrong, "pooled": pooled},
        "kidney_confusion": kidney,
        "free_form": {
            "targeted": targeted,
            "off_topic": off_topic,
            "refusal_engine": {k: v for k, v in verdicts.items() if k != "prompts"},
        },
    }


# ----------------------------------------------------------------------------- outputs


def _write_outputs(results: dict, rows: list[dict], out: Path) -> None:
    write_json_atomic(results, out / "results.json")
    write_csv([r for r in rows if r["dataset"] not in LOCAL_ONLY], out / "cases.csv")
    for dataset in LOCAL_ONLY:  # licence: these per-case rows stay local (.gitignore)
        local = [r for r in rows if r["dataset"] == dataset]
        if local:
            (out / dataset).mkdir(exist_ok=True)
            write_csv(local, out / dataset / "cases.csv")
    confusion_png(results, out / "kidney_confusion.png")
    write_text_atomic(report_markdown(results), out / "report.md")


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


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _delta(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def report_markdown(results: dict) -> str:
    """report.md: every number comes from ``results``."""
    meta = results["meta"]
    L: list[str] = []
    L.append(f"# Prompt robustness: `{meta['checkpoint']}`")
    L.append("")
    L.append(
        "Generated by `promptseg robustness` (`promptseg/robustness.py`); every number below is "
        "read from `results.json` in this folder. Do not edit by hand: rerun the command."
    )
    L.append("")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- git: `{meta['git']}`")
    L.append(f"- checkpoint: `{meta['checkpoint_path']}` (sha256 `{meta['checkpoint_sha256']}`)")
    L.append(
        f"- free-form prompts: `{meta['free_form_file']}` (sha256 `{meta['free_form_sha256']}`)"
    )
    cases = ", ".join(
        f"{ds} {c['cases']} cases / {c['slices']} slices" for ds, c in meta["datasets"].items()
    )
    L.append(f"- data: validation split; {cases}")
    L.append(
        f"- mask: probability > {meta['threshold']}, no post-processing; {meta['phrasings']} distinct phrasing(s) per "
        f"(case, target) for the train and held-out sets (seed {meta['seed']}); "
        f"max cases per dataset: {meta['max_cases'] or 'all'}; {meta['seconds']} s"
    )
    L.append("")
    L += _headline(results)
    L += _section_sets(results)
    L += _section_wrong(results)
    L += _section_kidney(results)
    L += _section_free(results)
    return "\n".join(L).rstrip() + "\n"


def _headline(results: dict) -> list[str]:
    L = ["## Headline", ""]
    ov = results["prompt_sets_overall"]
    L.append(
        "- mean over (dataset, target) of the mean Dice: "
        + ", ".join(f"{s} {_f(ov[s]['mean_of_target_means'])}" for s in SETS)
        + f" ({ov['canonical']['targets']} dataset/target pairs)"
    )
    p = results["wrong_target"]["pooled"]
    L.append(
        f"- absent-target prompts answered empty: same domain {_f(p['same']['empty_rate'])} "
        f"(n={p['same']['n']} slices), cross domain {_f(p['cross']['empty_rate'])} "
        f"(n={p['cross']['n']} slices)"
    )
    for ds, rows in results["kidney_confusion"].items():
        parts = []
        for t in KIDNEYS:
            if t in rows:
                r = rows[t]
                parts.append(
                    f'"{t}" in left / right truth {_f(r["in_left"])} / {_f(r["in_right"])}'
                )
        L.append(f"- {ds} kidneys: " + "; ".join(parts))
    ff = results["free_form"]
    refused = [t for t in ff["targeted"] if (t["refusal"] or {}).get("refused")]
    off_ref = [t for t in ff["off_topic"] if (t["refusal"] or {}).get("refused")]
    if "error" in ff["refusal_engine"]:
        L.append(f"- refusal check unavailable: {ff['refusal_engine']['error']}")
    else:
        L.append(
            f"- runtime refusal: {len(refused)} of {len(ff['targeted'])} on-target free-form "
            f"prompts refused (wrongly), {len(off_ref)} of {len(ff['off_topic'])} off-topic "
            "prompts refused"
        )
    L.append("")
    return L


def _section_sets(results: dict) -> list[str]:
    L = ["## 1. Canonical vs training vs held-out phrasings", ""]
    L.append(
        "Dice mean ± population sd (ddof=0) over (case, phrasing) pairs; a case is a volume "
        "(CHAOS, LiTS: 3D Dice) or a slice (brain, BTCV: 2D Dice). Δ: mean over cases of (that set's Dice on the case - "
        "the canonical prompt's Dice on the same case). n: scored pairs; p: distinct phrasings."
    )
    L.append("")
    L.append(
        "| dataset | target | canonical | train | Δ train | held-out | Δ held-out | n (canon/train/held-out) | p (train/held-out) |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    for ds, targets in results["prompt_sets"].items():
        for target, e in targets.items():
            cells = []
            for s in SETS:
                cells.append(f"{_f(e[s]['dice_mean'])} ± {_f(e[s]['dice_sd'])}")
                if s != "canonical":
                    cells.append(_delta(e[s]["delta_vs_canonical"]))
            n = "/".join(str(e[s]["n"]) for s in SETS)
            p = "/".join(str(e[s]["phrasings"]) for s in ("train", "heldout"))
            L.append(f"| {ds} | {target} | " + " | ".join(cells) + f" | {n} | {p} |")
    L.append("")
    L.append("Held-out phrasings by what is new in them (pooled over datasets):")
    L.append("")
    L.append("| target | new synonym | new template | both new |")
    L.append("|---|---|---|---|")
    for target, kinds in results["heldout_by_kind"].items():
        cells = []
        for k in ("synonym", "template", "synonym+template"):
            e = kinds.get(k)
            cells.append("n/a" if not e else f"{_f(e['dice_mean'])} (n={e['n']})")
        L.append(f"| {target} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("<details><summary>Every held-out phrasing evaluated (mean Dice, n)</summary>")
    L.append("")
    L.append("| target | phrasing | new | Dice | n |")
    L.append("|---|---|---|---|---|")
    for target, phr in results["per_phrasing"].get("heldout", {}).items():
        for prompt, e in sorted(phr.items(), key=lambda kv: kv[1]["dice_mean"]):
            L.append(f"| {target} | {prompt} | {e['new']} | {_f(e['dice_mean'])} | {e['n']} |")
    L.append("")
    L.append("</details>")
    L.append("")
    return L


def _section_wrong(results: dict) -> list[str]:
    L = ["## 2. Wrong-target prompts", ""]
    L.append(
        "Canonical prompt of a target, scored on every slice where that target's truth is empty: "
        "empty rate = fraction of those slices with no predicted pixel; area = mean fraction of "
        "the slice predicted (over all those slices). Same domain: the target belongs to the "
        "dataset's anatomy (spleen on a slice without spleen, meningioma on a glioma slice); "
        "cross domain: brain tumour prompts on abdominal slices, abdominal prompts on brain slices."
    )
    for domain, title in (("same", "Same domain"), ("cross", "Cross domain")):
        L.append("")
        L.append(f"### {title}")
        L.append("")
        L.append("| prompt target | dataset | empty rate | n slices | area |")
        L.append("|---|---|---|---|---|")
        for target, by_ds in results["wrong_target"][domain].items():
            for ds, e in by_ds.items():
                L.append(
                    f"| {target} | {ds} | {_f(e['empty_rate'])} | {e['n']} | "
                    f"{_f(e['mean_predicted_fraction'], 4)} |"
                )
            pooled = results["wrong_target"]["pooled"][domain]["by_target"][target]
            if len(by_ds) > 1:
                L.append(f"| {target} | all | {_f(pooled['empty_rate'])} | {pooled['n']} | |")
    L.append("")
    return L


def _section_kidney(results: dict) -> list[str]:
    L = ["## 3. Left/right kidney confusion", ""]
    L.append(
        "Canonical left- and right-kidney prompts on every validation case. Fractions: of all "
        "predicted voxels of the split (pooled), the share inside the left-kidney truth, inside "
        "the right-kidney truth and elsewhere (rows sum to 1). Dice: mean over the cases where "
        "that side is present (CHAOS: 3D per volume; BTCV: 2D per slice)."
    )
    L.append("")
    L.append("![kidney confusion](kidney_confusion.png)")
    L.append("")
    L.append(
        "| dataset | prompt | in left truth | in right truth | elsewhere | Dice vs left (n) | Dice vs right (n) | predicted voxels |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for ds, rows in results["kidney_confusion"].items():
        for t, r in rows.items():
            L.append(
                f"| {ds} | {t} | {_f(r['in_left'])} | {_f(r['in_right'])} | "
                f"{_f(r['elsewhere'])} | {_f(r['dice_left'])} ({r['dice_left_n']}) | "
                f"{_f(r['dice_right'])} ({r['dice_right_n']}) | {r['pred_voxels']} |"
            )
    L.append("")
    return L


def _refusal_cell(v: dict | None) -> str:
    if not v:
        return "n/a"
    verdict = "**refused**" if v["refused"] else f"accepted ({v['resolved_by']})"
    cal = ", in calibration set" if v["in_calibration"] else ""
    return f'{verdict}; cosine {_f(v["similarity"])} to "{v["nearest_prompt"]}" ({v["nearest_target"]}){cal}'


def _section_free(results: dict) -> list[str]:
    ff = results["free_form"]
    eng = ff["refusal_engine"]
    L = ["## 4. Free-form clinical phrasings", ""]
    if "error" in eng:
        L.append(f"Refusal verdicts unavailable: {eng['error']}")
    else:
        same = eng["engine_checkpoint_sha256"] == results["meta"]["checkpoint_sha256"]
        L.append(
            f"Refusal: the runtime's prompt resolver with engine `{eng['engine']}` refuses a prompt "
            f"whose cosine to the nearest cached prompt embedding is below {_f(eng['threshold'], 4)} "
            f"(its calibrated threshold). The engine was exported from "
            f"{'this checkpoint' if same else 'a different checkpoint'} "
            f"(sha256 `{eng['engine_checkpoint_sha256']}`; manifest sha256 "
            f"`{eng['engine_manifest_sha256']}`). 'in calibration set': the prompt "
            "(normalised) was among the phrasings used to calibrate the threshold. Masks and Dice "
            "come from the PyTorch path whether or not the runtime would refuse the prompt."
        )
    L.append("")
    L.append(
        "'known': the prompt, normalised, is a training or held-out phrasing of the vocabulary "
        "(so it is not really free-form)."
    )
    L.append("")
    L.append(
        "| prompt | target | known | Dice (dataset: mean, n; canonical prompt's mean) | runtime |"
    )
    L.append("|---|---|---|---|---|")
    for t in ff["targeted"]:
        dice = "; ".join(
            f"{ds}: {_f(e['dice_mean'])}, n={e['n']} (canonical {_f(e['canonical_dice_mean'])})"
            for ds, e in t["dice"].items()
        )
        L.append(
            f"| {t['prompt']} | {t['target']} | {t['known_phrasing'] or 'no'} | "
            f"{dice or 'no case with the target'} | {_refusal_cell(t['refusal'])} |"
        )
    L.append("")
    L.append("Off-topic prompts, on every validation slice:")
    L.append("")
    L.append("| prompt | known | empty rate (n slices) | by dataset | runtime |")
    L.append("|---|---|---|---|---|")
    for t in ff["off_topic"]:
        by = ", ".join(f"{ds} {_f(e['empty_rate'])}" for ds, e in t["by_dataset"].items())
        L.append(
            f"| {t['prompt']} | {t['known_phrasing'] or 'no'} | {_f(t['empty_rate'])} ({t['n']}) | "
            f"{by} | {_refusal_cell(t['refusal'])} |"
        )
    L.append("")
    return L


def main_args(args) -> int:
    """``promptseg robustness`` handler body (see :func:`promptseg.cli.cmd_robustness`)."""
    robustness(
        args.checkpoint,
        args.data_root,
        args.out,
        datasets=args.datasets,
        max_cases=args.max_cases,
        phrasings=args.phrasings,
        seed=args.seed,
        free_form=args.free_form or DEFAULT_FREE_FORM,
        engine=args.engine,
        threads=args.threads,
        log=lambda line: print(line, file=sys.stderr),
    )
    return 0
