"""Accuracy parity across backends: Dice per target on the validation split.

Rows: PyTorch FP32 (the checkpoint as a :class:`~promptseg.runtime.torch_engine.TorchEngine`
with its own prompt embeddings, as ``promptseg evaluate`` predicts), ONNX Runtime FP32
(``model.onnx``), the FP16 graph (``model.fp16.onnx`` on the ORT CPU provider) and the INT8
Q/DQ graph (``model.int8.onnx``). Every row runs the slice path of ``promptseg-run``
(:func:`promptseg.cases.segment_case` -> :func:`promptseg.runtime.slices.segment_slices`):
same normalisation, resizing, logit threshold, presence gate and (``--postprocess largest``)
largest-component rule, so a row's masks are ``promptseg-run``'s masks to the voxel.
Cases follow ``promptseg evaluate``: a CHAOS or LiTS volume is one case (3D Dice on the native
grid), a brain tumour or BTCV slice is one case (2D Dice); every target a case annotates is
prompted with its canonical prompt (``"Segment the {target}"``); present targets give Dice,
absent ones count towards the empty-answer rate.

Each row reports Dice per target and the macro mean, the difference to the reference (PyTorch
FP32, or ONNX Runtime FP32 without a checkpoint) and passes when every per-target difference
and the mean difference stay within ``tolerance`` (0.005 Dice). ``parity.json`` and
``parity.md`` (a Markdown table for the README) are written to ``--out``; the CLI exits 1 when
a graph misses the tolerance (``--no-fail``: report only) and 2 on bad input::

    python -m promptseg.calibration.parity ENGINE_DIR --checkpoint CKPT \\
        --data-root ../shared/data [--split val] [--out DIR] [--max-cases N]
"""

from __future__ import annotations

import json
import sys
import time
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.cases import iter_cases, segment_case
from promptseg.data.datasets import DATASET_FOLDERS, KINDS, Case, load_cases
from promptseg.metrics import confusion
from promptseg.postprocess import POSTPROCESS_MODES
from promptseg.runtime.errors import first_line
from promptseg.runtime.manifest import sha256_file

__all__ = ["ROWS", "TOLERANCE", "format_markdown", "main", "run_parity"]

TOLERANCE = 0.005
PROG = "python -m promptseg.calibration.parity"
# (row name, backend, precision, file in the engine folder or None for the checkpoint)
ROWS: tuple[tuple[str, str, str, str | None], ...] = (
    ("pytorch-fp32", "torch", "fp32", None),
    ("onnxruntime-fp32", "ort-cpu", "fp32", "model.onnx"),
    ("onnxruntime-fp16", "ort-cpu", "fp16", "model.fp16.onnx"),
    ("onnxruntime-int8", "ort-cpu", "int8", "model.int8.onnx"),
)
LABELS = {
    "pytorch-fp32": "PyTorch FP32",
    "onnxruntime-fp32": "ONNX Runtime FP32",
    "onnxruntime-fp16": "FP16 graph (ORT CPU)",
    "onnxruntime-int8": "INT8 Q/DQ graph (ORT CPU)",
}


@dataclass
class _Row:
    """Accumulated results of one backend."""

    name: str
    backend: str
    precision: str
    source: str
    engine: Any = None
    films: dict[str, np.ndarray] = field(default_factory=dict)  # target -> (P,) FiLM vector
    status: str = "ok"
    reason: str = ""
    dice: dict[str, list[float]] = field(default_factory=dict)
    agreement: dict[str, list[float]] = field(default_factory=dict)
    empty: list[bool] = field(default_factory=list)
    seconds: float = 0.0


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    tp, fp, fn, _ = confusion(pred, truth)
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)


# --------------------------------------------------------------------------- predictors


def case_counts(
    data_root: str | Path, targets: Sequence[str], split: str = "val"
) -> dict[str, int]:
    """Cases per target that :func:`run_parity` scores on ``split`` (truth present), no inference.

    The INT8 float fallback sizes its noise margin with these counts: a target checked on one
    case needs a wider margin than one averaged over thirty.
    """
    root, wanted, counts = Path(data_root), set(targets), {}
    for kind in KINDS:
        if not (root / DATASET_FOLDERS[kind]).is_dir():
            continue
        for case in load_cases(kind, root / DATASET_FOLDERS[kind], split):
            for target, mask in case.masks.items():
                if target in wanted and mask.any():
                    counts[target] = counts.get(target, 0) + 1
    return dict(sorted(counts.items()))


def _checkpoint_row(row: _Row, checkpoint: Path, threads: int | None) -> None:
    """The PyTorch row: the checkpoint as a TorchEngine, FiLM vectors from its own embeddings."""
    import torch

    from promptseg.checkpoint import load_checkpoint
    from promptseg.evaluate import Predictor

    if threads:
        torch.set_num_threads(int(threads))
    predictor = Predictor(load_checkpoint(checkpoint))
    vocab = predictor.loaded.vocabulary
    targets = list(vocab.targets)
    row.engine = predictor.engine
    row.films = dict(zip(targets, predictor.films([vocab.canonical(t) for t in targets])))


def case_masks(row: _Row, case: Case, targets: list[str], preprocessing: Any, *,
               threshold: float, batch: int, postprocess: str,
               taus: dict[str, float | None] | None = None) -> np.ndarray:  # fmt: skip
    """bool (K, Z, H, W) masks of one row on one case: the path of ``promptseg-run``.

    ``taus``: per target the presence gate's threshold (None or missing: no gate).
    """
    films = [row.films[t] for t in targets]
    gate = [(taus or {}).get(t) for t in targets]
    return segment_case(row.engine, case, films, targets, preprocessing, batch=batch,
                        threshold=threshold, postprocess=postprocess,
                        presence_thresholds=gate).masks  # fmt: skip


# --------------------------------------------------------------------------- the run


def _checkpoint_for(folder: Any, checkpoint: str | Path | None) -> tuple[Path | None, str]:
    """The checkpoint to use for the PyTorch row, or (None, why not)."""
    from promptseg.checkpoint import resolve_checkpoint

    if checkpoint is not None:
        return resolve_checkpoint(checkpoint), ""
    facts = folder.manifest.get("checkpoint") or {}
    path = Path(facts["path"]) if facts.get("path") else None
    if path is None or not path.is_file():
        return (
            None,
            f"no --checkpoint and the manifest's checkpoint {facts.get('path')!r} is missing",
        )
    if facts.get("sha256") and sha256_file(path) != facts["sha256"]:
        return None, f"{path} differs from the checkpoint the engine was exported from (sha256)"
    return path, ""


def _open_rows(folder: Any, checkpoint: Path | None, why: str, films: dict[str, np.ndarray],
               threads: int | None) -> tuple[list[_Row], list[Any]]:  # fmt: skip
    from promptseg.runtime.engines import OrtEngine

    rows: list[_Row] = []
    engines: list[Any] = []
    for name, backend, precision, fname in ROWS:
        if fname is None:
            row = _Row(name, backend, precision, str(checkpoint) if checkpoint else "")
            if checkpoint is None:
                row.status, row.reason = "skipped", why
            else:
                try:
                    _checkpoint_row(row, checkpoint, threads)
                    engines.append(row.engine)
                except ImportError as exc:
                    row.status, row.reason = "skipped", first_line(exc)
            rows.append(row)
            continue
        row = _Row(name, backend, precision, fname)
        graphs = folder.manifest.get("graphs") or {}
        if not graphs.get(precision) or not (folder.path / graphs[precision]).is_file():
            row.status, row.reason = "skipped", f"{fname} is not in the engine folder"
        else:
            try:
                row.engine = OrtEngine(folder, precision, ("cpu",), threads=threads)
                row.films = films
                engines.append(row.engine)
            except Exception as exc:  # noqa: BLE001 - a graph ORT cannot load is a failed row
                row.status, row.reason = "error", first_line(exc)
        rows.append(row)
    return rows, engines


def _score_case(case: Case, targets: list[str], rows: list[_Row], preprocessing: Any,
                **path: Any) -> None:  # fmt: skip
    """Run every usable backend on one case and accumulate Dice, agreement and empty answers.

    ``path``: threshold, batch and postprocess of :func:`case_masks`.
    """
    preds: dict[str, np.ndarray] = {}
    for row in rows:
        if row.status != "ok" or row.engine is None:
            continue
        t = time.perf_counter()
        try:
            preds[row.name] = case_masks(row, case, targets, preprocessing, **path)
        except Exception as exc:  # noqa: BLE001 - a backend failing mid-run fails its row
            row.status, row.reason = "error", f"{case.case_id}: {first_line(exc)}"
            continue
        row.seconds += time.perf_counter() - t
    ref = next((r.name for r in rows if r.name in preds), None)
    for row in rows:
        if row.name not in preds:
            continue
        for k, target in enumerate(targets):
            pred, truth = preds[row.name][k], case.masks[target]
            if truth.any():
                row.dice.setdefault(target, []).append(_dice(pred, truth))
                if ref is not None:
                    row.agreement.setdefault(target, []).append(_dice(pred, preds[ref][k]))
            flat = truth.reshape(truth.shape[0], -1).any(1)
            row.empty.extend(bool(not pred[z].any()) for z in np.flatnonzero(~flat))


def _summarise(rows: list[_Row], tolerance: float) -> tuple[list[dict], str | None]:
    done = [r for r in rows if r.status == "ok" and r.dice]
    reference = done[0].name if done else None
    ref = done[0] if done else None
    out: list[dict] = []
    for row in rows:
        dice = {t: float(np.mean(v)) for t, v in sorted(row.dice.items())}
        n = {t: len(v) for t, v in sorted(row.dice.items())}
        mean = float(np.mean(list(dice.values()))) if dice else None
        entry: dict[str, Any] = {
            "name": row.name,
            "label": LABELS[row.name],
            "backend": row.backend,
            "precision": row.precision,
            "source": row.source,
            "status": row.status,
            "reason": row.reason,
            "dice": dice,
            "n": n,
            "mean_dice": mean,
            "agreement_with_reference": {
                t: float(np.mean(v)) for t, v in sorted(row.agreement.items())
            },
            "absent_empty_rate": float(np.mean(row.empty)) if row.empty else None,
            "absent_n": len(row.empty),
            "seconds": round(row.seconds, 3),
            "reference": row.name == reference,
            "delta": {},
            "delta_mean": None,
            "max_abs_delta": None,
            "pass": None,
        }
        if row.status == "ok" and ref is not None and dice:
            ref_dice = {t: float(np.mean(v)) for t, v in ref.dice.items()}
            delta = {t: dice[t] - ref_dice[t] for t in dice if t in ref_dice}
            ref_mean = float(np.mean(list(ref_dice.values())))
            entry["delta"] = delta
            entry["delta_mean"] = mean - ref_mean if mean is not None else None
            worst = max([abs(d) for d in delta.values()] + [abs(entry["delta_mean"] or 0.0)])
            entry["max_abs_delta"] = worst
            entry["pass"] = bool(worst <= tolerance and set(dice) == set(ref_dice))
        elif row.status == "error":
            entry["pass"] = False
        out.append(entry)
    return out, reference


def run_parity(
    engine_dir: str | Path,
    *,
    data_root: str | Path,
    checkpoint: str | Path | None = None,
    split: str = "val",
    out: str | Path | None = None,
    max_cases: int = 0,
    datasets: Sequence[str] | None = None,
    tolerance: float = TOLERANCE,
    threshold: float = 0.5,
    batch: int = 16,
    threads: int | None = None,
    progress: bool = False,
    postprocess: str = "largest",
    presence_gate: bool = True,
) -> dict[str, Any]:
    """Dice parity of the PyTorch, ORT FP32, FP16 and INT8 paths on one split.

    Args:
        engine_dir: Engine folder (docs/engine_format.md).
        data_root: Folder holding the shared dataset folders.
        checkpoint: Checkpoint for the PyTorch row (default: the manifest's, if present).
        split: "val" (default) or "train".
        out: Folder for parity.json and parity.md (None: write nothing).
        max_cases: Cases per dataset (0: all).
        datasets: Dataset kinds (default: every kind found under ``data_root``).
        tolerance: Largest allowed |Dice difference| to the reference, per target and mean.
        threshold: Probability threshold.
        batch: Slices per inference call.
        threads: Intra-op threads for ONNX Runtime and PyTorch (None: library default).
        progress: tqdm progress bar over cases.
        postprocess: "none" or "largest" (``promptseg-run``'s default: each organ's largest
            3D component in volumes).
        presence_gate: Gate slices by the presence output with the manifest's per-target
            ``presence_thresholds``, as ``promptseg-run`` does (False: every slice kept).

    Returns:
        The parity report (also written as parity.json): rows, reference, passed, settings.

    Raises:
        InputError / FileNotFoundError / ValueError: Bad engine folder, data root or options.
    """
    from promptseg.prompts import PromptVocabulary
    from promptseg.runtime.manifest import EngineFolder
    from promptseg.runtime.pipeline import Options
    from promptseg.runtime.prompt_resolver import PromptResolver

    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if max_cases < 0:
        raise ValueError(f"max_cases must be >= 0 (0 = all), got {max_cases}")
    if postprocess not in POSTPROCESS_MODES:
        raise ValueError(f"postprocess must be one of {POSTPROCESS_MODES}, got {postprocess!r}")
    started = time.perf_counter()
    folder = EngineFolder.open(engine_dir)
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root not found (expected ../shared/data)")
    kinds = (
        list(datasets) if datasets else [k for k in KINDS if (root / DATASET_FOLDERS[k]).is_dir()]
    )
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"datasets {kinds} under {root}; expected some of {list(KINDS)}")
    vocab = PromptVocabulary()
    resolver = PromptResolver(folder, threads=threads)
    films = {
        t: resolver.resolve(vocab.canonical(t)).film.astype(np.float32) for t in folder.targets
    }
    taus = dict(zip(folder.targets, Options(presence_gate=presence_gate).presence_taus(
        folder.targets, folder.manifest.get("presence_thresholds"))))  # fmt: skip
    ckpt, why = _checkpoint_for(folder, checkpoint)
    rows, engines = _open_rows(folder, ckpt, why, films, threads)
    counts: dict[str, int] = {}
    try:
        for kind in kinds:
            for case in iter_cases(kind, root / DATASET_FOLDERS[kind], split, max_cases=max_cases,
                                   progress=progress, desc=f"parity {kind}"):  # fmt: skip
                targets = [t for t in case.masks if t in films]
                _score_case(case, targets, rows, folder.preprocessing, threshold=threshold,
                            batch=batch, postprocess=postprocess, taus=taus)  # fmt: skip
                counts[kind] = counts.get(kind, 0) + 1
    finally:
        for engine in engines:
            engine.close()
    summary, reference = _summarise(rows, tolerance)
    checked = [r for r in summary if r["pass"] is not None and not r["reference"]]
    report = {
        "format": "promptseg-parity",
        "version": 1,
        "engine": str(folder.path),
        "manifest_sha256": folder.manifest_sha256,
        "checkpoint": str(ckpt) if ckpt else None,
        "split": split,
        "datasets": counts,
        "max_cases": max_cases,
        "prompt": "canonical (Segment the {target})",
        "threshold": threshold,
        "postprocess": postprocess,
        "presence_gate": presence_gate,
        "presence_thresholds": {t: v for t, v in taus.items() if v is not None},
        "path": "promptseg.cases.segment_case (the slice path of promptseg-run)",
        "tolerance": tolerance,
        "reference": reference,
        "rows": summary,
        "passed": bool(reference) and all(r["pass"] for r in checked),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if out is not None:
        write_report(report, Path(out))
    return report


# --------------------------------------------------------------------------- output


def _cell(value: float | None, delta: float | None, reference: bool) -> str:
    if value is None:
        return "–"
    if reference or delta is None:
        return f"{value:.4f}"
    return f"{value:.4f} ({delta:+.4f})"


def format_markdown(report: dict[str, Any]) -> str:
    """The parity table (Markdown) that the README includes."""
    targets = sorted({t for r in report["rows"] for t in r["dice"]})
    head = ["graph", "file", *targets, "mean", "max abs Δ", "result"]
    lines = [
        f"Dice on the {report['split']} split ({', '.join(f'{k}: {v} cases' for k, v in report['datasets'].items())}), "
        f"canonical prompts, threshold {report['threshold']}, post-processing "
        f"{report.get('postprocess', 'none')}, presence gate "
        f"{'on' if report.get('presence_gate') else 'off'}; Δ to {LABELS.get(report['reference'], 'none')}; "
        f"tolerance {report['tolerance']} Dice.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 3) + ["---"]) + "|",
    ]
    for r in report["rows"]:
        ref = r["reference"]
        if r["status"] != "ok":
            cells = ["–"] * (len(targets) + 2)
            result = f"{r['status']}: {r['reason']}".replace("|", "/")
        else:
            cells = [_cell(r["dice"].get(t), r["delta"].get(t), ref) for t in targets]
            cells.append(_cell(r["mean_dice"], r["delta_mean"], ref))
            cells.append("–" if ref or r["max_abs_delta"] is None else f"{r['max_abs_delta']:.4f}")
            result = "reference" if ref else ("pass" if r["pass"] else "FAIL")
        source = Path(r["source"]).name if r["source"] else "–"
        lines.append("| " + " | ".join([r["label"], f"`{source}`", *cells, result]) + " |")
    n_row = [str(max((r["n"].get(t, 0) for r in report["rows"]), default=0)) for t in targets]
    lines.append("| cases | | " + " | ".join(n_row) + " | | | |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write parity.json and parity.md atomically into ``out``."""
    from promptseg.runtime.writers import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    js = write_text_atomic(json.dumps(report, indent=2) + "\n", out / "parity.json")
    md = write_text_atomic(format_markdown(report), out / "parity.md")
    return Path(js), Path(md)


# --------------------------------------------------------------------------- CLI


def _command() -> Any:
    """The click command (built on use: click is imported only by the CLI)."""
    import click

    from promptseg.cliargs import CONTEXT, non_negative_int, positive_int, version_option

    path = click.Path(path_type=Path)

    @click.command(
        context_settings=CONTEXT,
        help="Dice parity of PyTorch FP32, ONNX Runtime FP32, FP16 and INT8 graphs.\n\n"
        "ENGINE_DIR: the engine folder.",
    )
    @click.argument("engine", type=path, metavar="ENGINE_DIR")
    @click.option("--checkpoint", help="checkpoint for the PyTorch row (.pt or 'default')")
    @click.option("--data-root", type=path, default=Path("../shared/data"))
    @click.option("--split", type=click.Choice(("val", "train")), default="val")
    @click.option("--out", type=path, default=Path("parity"), help="folder for parity.json/.md")
    @click.option(
        "--max-cases", type=non_negative_int, default=0, help="cases per dataset (0 = all)"
    )
    @click.option(
        "--datasets", multiple=True, type=click.Choice(KINDS), help="[default: all found]"
    )
    @click.option("--tolerance", type=float, default=TOLERANCE)
    @click.option("--threshold", type=float, default=0.5)
    @click.option("--batch", type=positive_int, default=16)
    @click.option(
        "--postprocess",
        type=click.Choice(POSTPROCESS_MODES),
        default="largest",
        help="'largest': the runtime's largest-component rule, as promptseg-run by default",
    )
    @click.option(
        "--no-presence-gate",
        is_flag=True,
        help="keep every slice's mask (default: gate by the manifest's thresholds)",
    )
    @click.option("--threads", type=positive_int, default=None)
    @click.option("--no-fail", is_flag=True, help="exit 0 even when a graph fails")
    @click.option("--progress", is_flag=True)
    @version_option(PROG)
    def command(**options: Any) -> int:
        options["datasets"] = list(options["datasets"]) or None
        return _main(Namespace(**options))

    return command


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m promptseg.calibration.parity``; exit 2 on bad input, 1 when a graph fails."""
    from promptseg.cliargs import run_command

    return run_command(_command(), PROG, argv, multiple=("--datasets",))


def _main(args: Namespace) -> int:
    from promptseg.runtime.errors import InputError

    try:
        report = run_parity(
            args.engine,
            data_root=args.data_root,
            checkpoint=args.checkpoint,
            split=args.split,
            out=args.out,
            max_cases=args.max_cases,
            datasets=args.datasets,
            tolerance=args.tolerance,
            threshold=args.threshold,
            batch=args.batch,
            threads=args.threads,
            progress=args.progress,
            postprocess=args.postprocess,
            presence_gate=not args.no_presence_gate,
        )
    except (InputError, FileNotFoundError, ValueError) as exc:
        print(f"parity: error: {first_line(exc)}", file=sys.stderr)
        return 2
    print(format_markdown(report), end="")
    print(f"wrote {args.out / 'parity.json'} and {args.out / 'parity.md'}")
    failed = [r["name"] for r in report["rows"] if r["pass"] is False]
    if failed:
        print(f"parity: {', '.join(failed)} missed the {report['tolerance']} Dice tolerance",
              file=sys.stderr)  # fmt: skip
        return 0 if args.no_fail else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
