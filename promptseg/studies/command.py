"""``promptseg study run|report CONFIG...``: run studies' trainings, then their statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

from promptseg.studies.spec import StudyConfig


def add_study_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="loss study, ablation, cross-modality (config-driven)")
    p.add_argument("action", choices=["run", "report"], help="run trainings, or write reports")
    p.add_argument("configs", nargs="+", type=Path, help="study config JSON files")
    p.add_argument("--workers", type=int, default=1, help="parallel runs (one thread each)")
    p.add_argument("--data-root", dest="data_root", default=None)
    p.add_argument("--cache", type=Path, default=Path("runs/study_cache"))
    p.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def cmd_study(args: argparse.Namespace) -> int:
    from promptseg.studies.runner import run_all

    configs = [StudyConfig.load(p) for p in args.configs]
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.action == "run":
        # Studies in the order given, seeds ascending within each: the first study completes
        # all its seeds before the next starts (shared runs are trained once).
        specs = [s for cfg in configs for _, _, s in sorted(
            cfg.runs(args.data_root), key=lambda r: r[2].seed)]  # fmt: skip
        run_all(specs, args.cache, args.workers, args.progress, args.device)
    from promptseg.studies.report import write_study

    for path, cfg in zip(args.configs, configs):
        out = write_study(cfg, path, args.cache, args.data_root)
        print(f"{cfg.name}: wrote {out / 'report.md'}")
    return 0
