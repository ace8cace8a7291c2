"""Sensitivity-driven mixed precision: which INT8 nodes to keep in float, measured on TRAIN data.

Static INT8 of the whole image graph can move the Dice of small targets (glioma, liver tumour)
by more than the deployment tolerance while every other target is unchanged. Serious PTQ tools
do not widen the tolerance there; they find the few layers that cause the loss and run those in
float (Intel Neural Compressor's accuracy-aware fallback, the layer sensitivity analysis of
NVIDIA's pytorch-quantization and TensorRT Model Optimizer, TF Lite's quantisation debugger with
selective quantisation). :func:`mixed_precision_search` does that for the Q/DQ graph:

1. **Proxy check.** The fully quantised graph (first/last convolutions already float) is scored
   on a *train-split* proxy exactly as the parity check scores the validation split: Dice per
   case against the ground truth (CHAOS and LiTS volumes in 3D, brain tumour and BTCV slices in
   2D), canonical prompts, threshold 0.5, compared per case with the ONNX Runtime FP32 graph.
   INT8 moves a few boundary pixels in every case, so a per-target mean difference is itself
   noisy; the check therefore bounds ``|mean d| + 2 sd(d) / sqrt(m)`` of the per-case
   differences ``d`` for every target, where ``m`` is the number of validation cases the parity
   check averages that target over (counted from the split, never scored): what that check
   would show at the upper end of a ~95 % interval. The macro-mean difference is bounded too.
   (A first version used the proxy's own case count for ``m``; liver tumour, checked on a
   single LiTS validation case but proxied by three, then passed the proxy at 0.0038 and
   failed parity at -0.0071.) The proxy never scores the validation split the parity
   report is made on; its brain, CHAOS and BTCV cases are held out from the calibration
   samples; LiTS has one train volume, which calibration also draws slices from and which the
   proxy scores as 3D sub-volumes about as long as the validation block.
2. **Sensitivity.**  For each candidate node, a graph in which only that node is quantised runs
   on the sensitivity samples (a spread of the calibration slices, each with its prompt); its
   damage per target is ``1 - Dice(mask, FP32 mask)`` pooled over the samples of that target,
   and nodes are ranked by their worst target (the proxy check is a maximum over targets),
   then by the mean over targets and the relative logit error.
3. **Search.** The ``k`` most sensitive nodes are kept in float for the smallest ``k`` whose
   graph passes the proxy check (k = 1, 2, 4, ... then bisection), up to ``max_float`` nodes;
   when no such ``k`` exists the best graph tried is kept and the report says it failed.
4. **Cross-validation of k.** The proxy cases are split into :data:`CV_FOLDS` folds (per
   dataset, contiguous runs of sorted case ids, so neighbouring slices of one patient or
   volume stay in one fold). For each fold, ``k`` is chosen as in step 3 on the other folds
   only and then checked on the held-out fold; the kept ``k`` is the largest of the folds'
   choices and of the whole-proxy choice, so a node set is never chosen on the cases that
   judge it. The graphs are the same for every fold (only their scoring subset differs), so
   the folds reuse the whole-proxy trials and cost few extra proxy passes.

Every step is recorded (the report goes into the engine manifest): the proxy cases, the proxy
differences of each graph tried, the ranked sensitivities and the nodes kept in float with the
reason for each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.preprocess import Preprocessing

__all__ = [
    "ProxyCase",
    "ProxySet",
    "build_proxy_set",
    "compare_dice",
    "conv_macs",
    "mixed_precision_search",
    "ort_session",
    "proxy_dice",
    "proxy_folds",
    "restrict",
    "sensitivity",
]

# Proxy size per dataset (chosen for time: one proxy pass is ~700 slice inferences at 128x128).
PROXY_BRAIN_PER_CLASS = 30
PROXY_CHAOS_VOLUMES = 2
PROXY_BTCV_SLICES = 40
# Folds of the cross-validated choice of how many nodes stay float.
CV_FOLDS = 3


# --------------------------------------------------------------------------- sessions


class _Session:
    """An ONNX Runtime CPU session behind the runtime's ``infer`` contract."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from promptseg.runtime.ort_engine import env_threads, ort_session

        self.session = ort_session(path, threads=threads or env_threads())

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"logits": self.session.run(["logits"], inputs)[0]}

    def logits(self, image: np.ndarray, film: np.ndarray, batch: int = 16) -> np.ndarray:
        """(N, R, R) logits of (N, 1, R, R) images with (N, P) FiLM vectors."""
        out = [
            self.infer({"image": image[i : i + batch], "film": film[i : i + batch]})["logits"]
            for i in range(0, image.shape[0], batch)
        ]
        return np.concatenate(out)[:, 0]


def ort_session(path: str | Path, threads: int | None = None) -> _Session:
    """CPU session of a graph (threads: argument, else ``$OMP_NUM_THREADS``, else ORT's)."""
    return _Session(path, threads)


# --------------------------------------------------------------------------- proxy set


@dataclass
class ProxyCase:
    """One proxy case: raw slices (Z, H, W), their modality and the masks of its present
    targets (a :class:`~promptseg.data.datasets.Case` with fewer fields)."""

    case_id: str
    dataset: str
    image: np.ndarray
    modality: str
    masks: dict[str, np.ndarray]
    is_volume: bool = True


@dataclass
class ProxySet:
    """Train-split cases scored like the parity check's validation cases."""

    cases: list[ProxyCase]
    meta: dict = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def summary(self) -> dict:
        datasets: dict[str, int] = {}
        targets: dict[str, int] = {}
        for case in self.cases:
            datasets[case.dataset] = datasets.get(case.dataset, 0) + 1
            for t in case.masks:
                targets[t] = targets.get(t, 0) + 1
        inferences = sum(c.image.shape[0] * len(c.masks) for c in self.cases)
        return {
            "split": "train",
            "datasets": datasets,
            "cases_per_target": dict(sorted(targets.items())),
            "slice_inferences": int(inferences),
            **self.meta,
        }


def proxy_folds(proxy: ProxySet, k: int = CV_FOLDS) -> list[set[str]]:
    """``k`` disjoint sets of proxy case ids: per dataset, contiguous runs of its sorted ids.

    Sorting by the numbers in the id keeps neighbouring brain slices (which share patients)
    and the slices of one BTCV volume together; each dataset starts at a different fold so
    datasets with fewer cases than folds do not all land in the first one.
    """
    import re

    def key(case_id: str) -> list[Any]:
        return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", case_id)]

    folds: list[set[str]] = [set() for _ in range(k)]
    datasets = sorted({c.dataset for c in proxy.cases})
    for shift, dataset in enumerate(datasets):
        ids = sorted((c.case_id for c in proxy.cases if c.dataset == dataset), key=key)
        for f, chunk in enumerate(np.array_split(np.asarray(ids, dtype=object), k)):
            folds[(f + shift) % k] |= {str(i) for i in chunk}
    return folds


def restrict(
    dice: dict[str, list[float]], proxy: ProxySet, keep: set[str]
) -> dict[str, list[float]]:
    """Per-target Dice lists of :func:`proxy_dice` limited to the cases in ``keep``."""
    out: dict[str, list[float]] = {}
    for t, values in dice.items():
        ids = [c.case_id for c in proxy.cases if t in c.masks]
        kept = [v for v, i in zip(values, ids) if i in keep]
        if kept:
            out[t] = kept
    return out


def build_proxy_set(
    data_root: str | Path,
    preprocessing: Preprocessing,
    targets: Sequence[str],
    *,
    exclude: set[str] | None = None,
    brain_per_class: int = PROXY_BRAIN_PER_CLASS,
    chaos_volumes: int = PROXY_CHAOS_VOLUMES,
    btcv_slices: int = PROXY_BTCV_SLICES,
    seed: int = 0,
) -> ProxySet:
    """Draw the proxy cases from the TRAIN split (never validation).

    Args:
        data_root: Folder holding the dataset folders.
        preprocessing: The graph's normalisation (as the runtime applies it).
        targets: Targets that can be prompted (those with a cached canonical prompt).
        exclude: Case ids to leave out (the calibration samples' cases).
        brain_per_class: Brain tumour slices per tumour class.
        chaos_volumes: CHAOS MR train volumes (3D cases).
        btcv_slices: BTCV train slices.
        seed: Makes the draw reproducible.

    Raises:
        FileNotFoundError: No dataset folder under ``data_root``.
    """
    from promptseg.data import datasets as ds

    root, exclude, wanted = Path(data_root), exclude or set(), set(targets)
    splits = ds.load_splits()
    rng = np.random.default_rng(seed)
    raw: list[ds.Case] = []
    folder = root / ds.DATASET_FOLDERS["brain-tumor"]
    if folder.is_dir() and brain_per_class > 0:
        train = set(int(i) for i in splits["brain-tumor"]["train"])
        by_label: dict[str, list[int]] = {}
        for row in ds._brain_rows(folder):  # labels.csv: pick by class without reading images
            n = int(Path(row["file"]).stem)
            if n in train and f"brain/{n}" not in exclude:
                by_label.setdefault(ds.BRAIN_LABELS[int(row["label"])], []).append(n)
        ids: set[int] = set()
        for label in sorted(by_label):
            pool = sorted(by_label[label])
            ids |= {int(i) for i in rng.choice(pool, min(brain_per_class, len(pool)), False)}
        raw += list(ds.load_brain(folder, ids))
    folder = root / ds.DATASET_FOLDERS["chaos-mr"]
    if folder.is_dir() and chaos_volumes > 0:
        pool = sorted(int(p) for p in splits["chaos-mr"]["train"] if f"chaos/{p}" not in exclude)
        ids = {int(i) for i in rng.choice(pool, min(chaos_volumes, len(pool)), False)}
        raw += list(ds.load_chaos(folder, ids))
    folder = root / ds.DATASET_FOLDERS["btcv-ct"]
    if folder.is_dir() and btcv_slices > 0:
        vols = set(int(v) for v in splits["btcv-ct"]["train"])
        cases = [c for c in ds.load_btcv(folder, vols) if c.case_id not in exclude]
        cases = [c for c in cases if any(c.masks[t].any() for t in c.masks if t in wanted)]
        pick = sorted(rng.choice(len(cases), min(btcv_slices, len(cases)), False))
        raw += [cases[int(i)] for i in pick]
    folder = root / ds.DATASET_FOLDERS["lits-ct"]
    if folder.is_dir():
        # The train slice block in contiguous 3D sub-volumes about as long as the validation
        # block (the parity check scores that block as one 3D case), so the one LiTS volume
        # gives several liver / liver tumour cases.
        lo, hi = (int(v) for v in splits["lits-ct"]["train"]["slices"])
        vlo, vhi = (int(v) for v in splits["lits-ct"]["val"]["slices"])
        for case in ds.load_lits(folder, None, (lo, hi)):
            for block in np.array_split(np.arange(hi - lo), max(1, round((hi - lo) / (vhi - vlo)))):
                a, b = int(block[0]), int(block[-1]) + 1
                raw.append(ds.Case(
                    f"{case.case_id}/{lo + a}-{lo + b}", case.dataset, case.modality,
                    case.image[a:b], {t: m[a:b] for t, m in case.masks.items()}, case.spacing,
                    case.is_volume, dict(case.meta),
                ))  # fmt: skip
    if not raw:
        raise FileNotFoundError(f"{root}: no dataset folder for the INT8 proxy check")
    cases = []
    for case in raw:
        masks = {t: m for t, m in case.masks.items() if t in wanted and m.any()}
        if masks:
            cases.append(
                ProxyCase(
                    case.case_id, case.dataset, case.image, case.modality, masks, case.is_volume
                )
            )
    return ProxySet(
        cases,
        {
            "seed": seed,
            "held_out_from_calibration": "brain, CHAOS and BTCV cases; LiTS has one train "
            "volume, scored as 3D sub-volumes the length of the validation block",
            "scoring": "Dice per case like the parity check (CHAOS/LiTS 3D, brain/BTCV per "
            "slice), canonical prompts, threshold 0.5, against ONNX Runtime FP32",
            "case_ids": [c.case_id for c in cases],
        },
        preprocessing,
    )


def proxy_dice(
    engine: Any,
    proxy: ProxySet,
    films: dict[str, np.ndarray],
    resolution: int,
    *,
    batch: int = 16,
    threshold: float = 0.5,
) -> dict[str, list[float]]:
    """Dice per case of each target, through the parity check's path (promptseg-run's)."""
    from promptseg.calibration.parity import _dice
    from promptseg.cases import segment_case

    out: dict[str, list[float]] = {}
    for case in proxy.cases:
        targets = list(case.masks)
        masks = segment_case(engine, case, [films[t] for t in targets], targets,
                             proxy.preprocessing, batch=batch, threshold=threshold,
                             resolution=resolution).masks  # fmt: skip
        for k, t in enumerate(targets):
            out.setdefault(t, []).append(_dice(masks[k], case.masks[t]))
    return out


def compare_dice(
    ref: dict[str, list[float]],
    cand: dict[str, list[float]],
    eval_cases: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Dice differences ``cand - ref`` per target, with a bound that accounts for case noise.

    INT8 moves a few boundary pixels in every case, so the per-target mean difference over a
    finite set of cases is noisy. ``bound`` is ``|mean| + 2 * sd / sqrt(m)`` of the per-case
    differences, where ``m`` is the number of cases the deployment check averages that target
    over (``eval_cases``; default: the proxy's own ``n``): what that check would show at the
    upper end of a ~95 % interval. A target checked on one case thus needs ``|mean| + 2 sd``;
    a target with a single proxy case gets ``2 * |difference|``.

    Returns:
        ``{"delta": {t: mean}, "sd": {t: sd}, "n": {t: n}, "m": {t: m}, "bound": {t: bound},
        "delta_mean": macro-mean difference, "max_abs_delta", "max_bound"}``.
    """
    delta, sd, n, m, bound = {}, {}, {}, {}, {}
    for t in sorted(ref):
        if t not in cand:
            continue
        d = np.asarray(cand[t], float) - np.asarray(ref[t], float)
        delta[t], n[t] = float(d.mean()), int(d.size)
        m[t] = int((eval_cases or {}).get(t) or d.size)
        sd[t] = float(d.std(ddof=1)) if d.size > 1 else 0.0
        bound[t] = abs(delta[t]) + (2.0 * sd[t] / float(np.sqrt(m[t])) if d.size > 1
                                    else abs(delta[t]))  # fmt: skip
    r = [float(np.mean(ref[t])) for t in delta]
    c = [float(np.mean(cand[t])) for t in delta]
    delta_mean = float(np.mean(c) - np.mean(r)) if delta else 0.0
    return {
        "delta": delta,
        "sd": sd,
        "n": n,
        "m": m,
        "bound": bound,
        "delta_mean": delta_mean,
        "max_abs_delta": float(max([abs(v) for v in delta.values()] + [abs(delta_mean)])),
        "max_bound": float(max(list(bound.values()) + [abs(delta_mean)])),
    }


# --------------------------------------------------------------------------- sensitivity


def sensitivity(
    logits: np.ndarray, ref_logits: np.ndarray, targets: np.ndarray
) -> tuple[float, float, float]:
    """(worst-target damage, mean damage, relative logit error) against the FP32 ``ref_logits``.

    A target's damage is ``1 - Dice(mask, FP32 mask)``, pooled over the samples prompting that
    target (masks at logit > 0); a target whose FP32 masks are all empty counts by the pixels
    the candidate turns on. The worst target leads because the proxy check is a maximum over
    targets.
    """
    scores = []
    for t in np.unique(targets):
        sel = targets == t
        a, b = logits[sel] > 0, ref_logits[sel] > 0
        den = int(a.sum()) + int(b.sum())
        scores.append(0.0 if den == 0 else 1.0 - 2.0 * int((a & b).sum()) / den)
    err = float(np.sqrt(np.mean((logits - ref_logits) ** 2)) / (np.std(ref_logits) + 1e-12))
    return float(np.max(scores)), float(np.mean(scores)), err


def conv_macs(onnx_path: str | Path) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv/ConvTranspose/Gemm/MatMul node (by name)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    graph = model.graph
    shapes: dict[str, list[int | None]] = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    weights = {t.name: numpy_helper.to_array(t).shape for t in graph.initializer}
    out: dict[str, int] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = weights.get(node.input[1])
        spatial = shapes.get(node.output[0] if node.op_type == "Conv" else node.input[0], [])
        if w is None:
            continue
        sites = spatial[2:] if node.op_type in ("Conv", "ConvTranspose") else spatial[1:-1]
        if any(s is None for s in sites):
            continue
        out[node.name] = int(np.prod(w)) * int(np.prod(sites)) if sites else int(np.prod(w))
    return out


# --------------------------------------------------------------------------- the search


# build(nodes_to_quantize or None for "all candidates", nodes kept float) -> written graph
Build = Callable[[Sequence[str] | None, Sequence[str]], Path]


def mixed_precision_search(
    build: Build,
    fp32_onnx: str | Path,
    candidates: Sequence[str],
    always_float: dict[str, str],
    proxy: ProxySet,
    films: dict[str, np.ndarray],
    sens_image: np.ndarray,
    sens_film: np.ndarray,
    sens_target: np.ndarray,
    *,
    tolerance: float,
    resolution: int,
    eval_cases: dict[str, int] | None = None,
    max_float: int | None = None,
    threads: int | None = None,
    macs: dict[str, int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Find the nodes to keep in float so the INT8 graph meets ``tolerance`` on the proxy.

    Args:
        build: Writes a Q/DQ graph (see :data:`Build`); calibration ranges are fixed.
        fp32_onnx: The float graph being quantised (reference outputs).
        candidates: Quantisable node names that may be kept in float.
        always_float: Nodes kept in float regardless, each with its reason (first/last
            convolutions, nodes the caller excluded).
        proxy: Train-split proxy cases; ``films``: (P,) FiLM vector per target.
        sens_image, sens_film, sens_target: Sensitivity samples (N, 1, R, R), (N, P), (N,).
        tolerance: Largest allowed per-target bound of :func:`compare_dice` and |macro-mean
            difference| to FP32 on the proxy.
        resolution: Model input size R.
        eval_cases: Cases per target in the deployment check (the parity report's validation
            counts, not its results), which size each target's noise margin.
        max_float: Most candidates kept in float (default: half of them).
        threads: ORT intra-op threads.
        macs: MACs per node, for the report's INT8 share.

    Returns:
        (nodes kept in float, report dict).
    """
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    candidates = [c for c in candidates if c not in set(always_float)]
    max_float = len(candidates) // 2 if max_float is None else min(max_float, len(candidates))
    fp32 = ort_session(fp32_onnx, threads)
    ref = proxy_dice(fp32, proxy, films, resolution)
    say(f"INT8 proxy: {proxy.summary()['slice_inferences']} slice inferences per graph")
    trials: list[dict[str, Any]] = []
    scored: dict[int, dict[str, list[float]]] = {}  # float-node count -> proxy Dice per case

    def trial(kept: list[str], label: str) -> dict[str, Any]:
        path = build(None, [*always_float, *kept])
        cand = proxy_dice(ort_session(path, threads), proxy, films, resolution)
        scored[len(kept)] = cand
        result = compare_dice(ref, cand, eval_cases)
        result = {"float_nodes": len(kept), "label": label, **result,
                  "pass": result["max_bound"] <= tolerance}  # fmt: skip
        trials.append(result)
        say(f"INT8 proxy, {len(kept)} extra node(s) float: max |dDice| "
            f"{result['max_abs_delta']:.4f}, max bound {result['max_bound']:.4f} "
            f"({'pass' if result['pass'] else 'fail'})")  # fmt: skip
        return result

    report: dict[str, Any] = {
        "tolerance": tolerance,
        "criterion": "on the train-split proxy, for every target |mean d| + 2 sd(d) / sqrt(m) "
        f"<= {tolerance}, where d is the per-case Dice difference to ONNX Runtime FP32 (2 |d| "
        "for a single proxy case) and m the number of validation cases the parity check "
        "averages that target over, and |macro-mean difference| <= the same",
        "eval_cases": dict(eval_cases or {}),
        "proxy": proxy.summary(),
        "proxy_fp32_dice": {t: float(np.mean(v)) for t, v in sorted(ref.items())},
        "trials": trials,
        "sensitivity": None,
    }
    kept: list[str] = []
    if not trial([], "all candidates INT8")["pass"] and candidates:
        ranked = _rank_by_sensitivity(
            build, fp32, candidates, always_float, sens_image, sens_film, sens_target,
            threads=threads, macs=macs, say=say,
        )  # fmt: skip
        report["sensitivity"] = {
            "samples": int(sens_image.shape[0]),
            "metric": "only this node quantised: 1 - Dice(mask, FP32 mask) per target pooled "
            "over the calibration samples of that target; ranked by the worst target, ties "
            "by the mean over targets, then by relative logit RMS error",
            "ranked": ranked,
        }
        order = [r["node"] for r in ranked]
        kept = _fewest_float(order, max_float, trial, trials)
        cv = _cross_validate(order, len(kept), max_float, trial, scored, ref, proxy,
                             eval_cases, tolerance)  # fmt: skip
        report["cross_validation"] = cv
        if cv["k"] > len(kept):
            kept = order[: cv["k"]]
            if cv["k"] not in scored:
                trial(kept, f"{cv['k']} most sensitive float (cross-validated)")
    final = next(t for t in reversed(trials) if t["float_nodes"] == len(kept))
    reasons = _float_reasons(always_float, kept, report["sensitivity"])
    report["kept_float"] = [{"node": n, "reason": why} for n, why in reasons.items()]
    report["passed"] = bool(final["pass"])
    report["final"] = {
        k: final[k] for k in ("delta", "bound", "delta_mean", "max_abs_delta", "max_bound", "pass")
    }
    if macs:
        total = sum(macs.values())
        floated = sum(macs.get(n, 0) for n in reasons)
        report["int8_mac_share"] = round(1.0 - floated / total, 4) if total else None
    report["seconds"] = round(time.perf_counter() - started, 1)
    return kept, report


def _rank_by_sensitivity(
    build: Build,
    fp32: _Session,
    candidates: Sequence[str],
    always_float: dict[str, str],
    sens_image: np.ndarray,
    sens_film: np.ndarray,
    sens_target: np.ndarray,
    *,
    threads: int | None,
    macs: dict[str, int] | None,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Candidates, most damaging first, each quantised alone against the FP32 logits.

    Sensitivity samples: ``sens_image`` (N, 1, R, R), ``sens_film`` (N, P), ``sens_target`` (N,).
    """
    ref_logits = fp32.logits(sens_image, sens_film)
    ranked = []
    for i, node in enumerate(candidates):
        path = build([node], list(always_float))
        logits = ort_session(path, threads).logits(sens_image, sens_film)
        worst, damage, err = sensitivity(logits, ref_logits, sens_target)
        ranked.append({"node": node, "worst_target_damage": worst, "damage": damage,
                       "logit_error": err, "macs": (macs or {}).get(node)})  # fmt: skip
        if (i + 1) % 8 == 0 or i + 1 == len(candidates):
            say(f"INT8 sensitivity: {i + 1}/{len(candidates)} nodes")
    ranked.sort(key=lambda r: (-r["worst_target_damage"], -r["damage"], -r["logit_error"]))
    return ranked


def _fewest_float(
    order: list[str],
    max_float: int,
    trial: Callable[[list[str], str], dict[str, Any]],
    trials: list[dict[str, Any]],
) -> list[str]:
    """The shortest prefix of ``order`` kept in float that passes ``trial`` (k = 0 tried).

    Doubling, then bisection between the last failing and the first passing size; when no
    size up to ``max_float`` passes, the prefix of the trial with the smallest bound.
    """
    done = {t["float_nodes"]: t for t in trials}

    def passes(k: int) -> bool:
        if k not in done:
            done[k] = trial(order[:k], f"{k} most sensitive float")
        return bool(done[k]["pass"])

    k = _smallest_passing(passes, max_float)
    if k is None:
        best = min(trials, key=lambda t: t["max_bound"])
        return order[: best["float_nodes"]]
    return order[:k]


def _smallest_passing(passes: Callable[[int], bool], max_float: int) -> int | None:
    """Smallest k in 0..max_float with ``passes(k)`` (doubling, then bisection), or None."""
    if passes(0):
        return 0
    lo, k = 0, 1
    while k <= max_float:
        if passes(k):
            break
        lo, k = k, (min(2 * k, max_float) if k < max_float else max_float + 1)
    if k > max_float:
        return None
    hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _cross_validate(
    order: list[str],
    k_whole: int,
    max_float: int,
    trial: Callable[[list[str], str], dict[str, Any]],
    scored: dict[int, dict[str, list[float]]],
    ref: dict[str, list[float]],
    proxy: ProxySet,
    eval_cases: dict[str, int] | None,
    tolerance: float,
) -> dict[str, Any]:
    """Choose the float-node count ``k`` on all folds but one, check it on the held-out fold.

    Returns ``{"folds": [...], "k": kept count, "held_out_passed": every fold passed, ...}``;
    ``k`` is the largest of the folds' choices and ``k_whole`` (the whole-proxy choice).
    """

    def dice_at(k: int) -> dict[str, list[float]]:
        if k not in scored:
            trial(order[:k], f"{k} most sensitive float (cross-validation)")
        return scored[k]

    def check(k: int, keep: set[str]) -> dict[str, Any]:
        return compare_dice(restrict(ref, proxy, keep), restrict(dice_at(k), proxy, keep),
                            eval_cases)  # fmt: skip

    folds = proxy_folds(proxy)
    every = {c.case_id for c in proxy.cases}
    rows = []
    for i, held in enumerate(folds):
        rest = every - held
        k = _smallest_passing(
            lambda k, rest=rest: check(k, rest)["max_bound"] <= tolerance, max_float
        )
        chosen = max_float if k is None else k
        out = check(chosen, held)
        rows.append({"fold": i, "cases": len(held), "k_chosen_on_other_folds": k,
                     "held_out_max_bound": round(out["max_bound"], 5),
                     "held_out_pass": bool(out["max_bound"] <= tolerance)})  # fmt: skip
    ks = [r["k_chosen_on_other_folds"] for r in rows]
    k_final = max([k_whole] + [max_float if k is None else k for k in ks])
    return {
        "folds": rows,
        "rule": f"{len(folds)} folds of the proxy cases (per dataset, contiguous sorted ids); "
        "per fold k = fewest most-sensitive nodes kept float that pass on the other folds, "
        "checked on the held-out fold; kept k = max over folds and the whole-proxy choice",
        "k_whole_proxy": k_whole,
        "k": int(k_final),
        "held_out_passed": all(r["held_out_pass"] for r in rows),
    }


def _float_reasons(
    always_float: dict[str, str], kept: list[str], ranking: dict[str, Any] | None
) -> dict[str, str]:
    """Every node kept in float with why: the caller's reasons, then the sensitivity rank."""
    reasons = dict(always_float)
    if ranking:
        rank = {r["node"]: (i + 1, r) for i, r in enumerate(ranking["ranked"])}
        for n in kept:
            i, r = rank[n]
            reasons[n] = (f"sensitivity rank {i} of {len(rank)} (worst-target damage "
                          f"{r['worst_target_damage']:.4f}); "
                          f"needed to meet the proxy tolerance")  # fmt: skip
    return reasons
