"""``promptseg study run|report CONFIG...``: run studies' trainings, then their statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

from promptseg.cliargs import positive_int
from promptseg.runtime.errors import first_line
from promptseg.studies import CACHE  # torch-free: this module only builds the parser


def add_study_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="loss study, ablation, cross-modality (config-driven)")
    p.add_argument("action", choices=["run", "report"], help="run trainings, or write reports")
    p.add_argument("configs", nargs="+", type=Path, help="study config JSON files")
    p.add_argument(
        "--workers", type=positive_int, default=1, help="parallel runs (one thread each)"
    )
    p.add_argument("--data-root", dest="data_root", default=None, help="for run: the data folder")
    p.add_argument("--cache", type=Path, default=CACHE, help="banks, embeddings and run results")
    p.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def cmd_study(args: argparse.Namespace) -> int:
    from promptseg.studies.runner import run_all
    from promptseg.studies.spec import StudyConfig

    # Every config is validated before anything is created on disk.
    configs = [StudyConfig.load(p) for p in args.configs]
    if args.action == "run":
        _check_device(args.device)
        # Studies in the order given, seeds ascending within each: the first study completes
        # all its seeds before the next starts (shared runs are trained once).
        specs = [s for cfg in configs for _, _, s in sorted(
            cfg.runs(args.data_root), key=lambda r: r[2].seed)]  # fmt: skip
        run_all(specs, args.cache, args.workers, args.progress, args.device)
    from promptseg.studies.report import write_study

    for path, cfg in zip(args.configs, configs):
        out = write_study(cfg, path, args.cache)
        print(f"{cfg.name}: wrote {out / 'report.md'}")
    return 0


def _check_device(device: str) -> None:
    """Refuse a device torch cannot parse or does not have, before anything is built."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r}: {first_line(exc)}") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA device is available")
