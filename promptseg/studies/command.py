"""``promptseg study run|report CONFIG...``: run studies' trainings, then their statistics."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from promptseg.cliargs import positive_int
from promptseg.runtime.errors import first_line
from promptseg.studies import CACHE  # torch-free: this module only declares the options


def study_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The click arguments and options of ``promptseg study``."""
    path = click.Path(path_type=Path)
    for decorator in reversed(
        [
            click.argument("action", type=click.Choice(["run", "report"])),
            click.argument("configs", nargs=-1, required=True, type=path),
            click.option(
                "--workers", type=positive_int, default=1, help="parallel runs (one thread each)"
            ),
            click.option("--data-root", "data_root", default=None, help="for run: the data folder"),
            click.option(
                "--cache", type=path, default=CACHE, help="banks, embeddings and run results"
            ),
            click.option("--device", default="cpu", help="torch device for training, e.g. cuda"),
            click.option(
                "--no-progress", "progress", flag_value=False, default=True, show_default=False
            ),
        ]
    ):
        command = decorator(command)
    return command


def cmd_study(args: Namespace) -> int:
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
