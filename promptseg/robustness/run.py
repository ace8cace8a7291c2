"""The ``promptseg robustness`` run: validate, predict every case's prompts, summarise, write."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from promptseg.cases import iter_cases
from promptseg.checkpoint import load_checkpoint, resolve_checkpoint
from promptseg.data.datasets import KINDS
from promptseg.evaluate import Predictor, dataset_folders, require_int
from promptseg.postprocess import POSTPROCESS_MODES
from promptseg.presence import DEFAULT_TAU
from promptseg.robustness.free_form import DEFAULT_FREE_FORM, load_free_form
from promptseg.robustness.refusal import refusal_verdicts
from promptseg.robustness.report import write_outputs
from promptseg.robustness.summary import summarise
from promptseg.robustness.tally import _Tally
from promptseg.runtime.manifest import sha256_file

PROMPT_CHUNK = 8


def _git_hash() -> str:
    from promptseg.studies.runner import git_hash

    return git_hash()


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
    presence_gate: bool = True,
    postprocess: str = "largest",
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
        presence_gate: Gate each prompt's slices with its target's calibrated presence
            threshold, as ``promptseg-run`` does (off-topic prompts have no target and are
            scored ungated; the runtime refuses them before the network runs).
        postprocess: "largest" (``promptseg-run``'s default) or "none".
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
    if postprocess not in POSTPROCESS_MODES:
        raise ValueError(f"postprocess must be one of {POSTPROCESS_MODES}, got {postprocess!r}")
    data_root = Path(data_root)
    folders = dataset_folders(data_root, datasets)
    ckpt_path = resolve_checkpoint(checkpoint)
    loaded = load_checkpoint(ckpt_path)
    ff = load_free_form(free_form, loaded.vocabulary.targets)
    if command is None:
        command = robustness_command(
            checkpoint,
            data_root,
            out,
            datasets,
            max_cases,
            phrasings,
            seed,
            free_form,
            engine,
            presence_gate,
            postprocess,
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
                targets = [_target_of(req[p]) for p in chunk]
                taus = [
                    loaded.presence_thresholds.get(t, DEFAULT_TAU) if presence_gate and t else None
                    for t in targets
                ]
                masks = predictor.segment(
                    case,
                    chunk,
                    [t or "" for t in targets],
                    threshold=threshold,
                    postprocess=postprocess,
                    presence_thresholds=taus,
                ).masks
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
        "postprocess": postprocess,
        "presence_gate": presence_gate,
        "presence_thresholds": dict(loaded.presence_thresholds) if presence_gate else None,
        "free_form_file": str(ff.path),
        "free_form_sha256": ff.sha256,
        "vocabulary_sha256": loaded.vocabulary.sha256(),
        "seconds": round(time.time() - started, 1),
    }
    write_outputs(results, tally.rows, out)
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
    presence_gate: bool = True,
    postprocess: str = "largest",
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
    if not presence_gate:
        args += ["--no-presence-gate"]
    if postprocess != "largest":
        args += ["--postprocess", postprocess]
    return shlex.join(args)


def _target_of(uses: list[tuple]) -> str | None:
    """The target a prompt is asked for (every use of one prompt names the same one), or
    ``None`` for an off-topic prompt."""
    targets = {u[2] if u[0] in ("set", "free") else u[1] for u in uses if u[0] != "off"}
    if len(targets) > 1:
        raise ValueError(f"one prompt serves several targets: {sorted(targets)}")
    return targets.pop() if targets else None


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
        presence_gate=args.presence_gate,
        postprocess=args.postprocess,
        log=lambda line: print(line, file=sys.stderr),
    )
    return 0
