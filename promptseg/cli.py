"""``promptseg`` command line: train, study, evaluate, info, report, render, grids, robustness.

Commands import their heavy modules (torch among them) only when they run, so ``render``,
``report`` and ``--help`` work without torch.
"""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from promptseg.cliargs import CONTEXT, non_negative_int, positive_int, run_command, version_option
from promptseg.data.datasets import KINDS
from promptseg.runtime.errors import first_line
from promptseg.studies.command import study_options

PROG = "promptseg"
# Options that take several values (``--datasets a b``), as they did under argparse.
MULTIPLE = ("--datasets", "--presets")
PATH = click.Path(path_type=Path)
CHECKPOINT_HELP = ".\n\nCHECKPOINT: a .pt checkpoint or 'default' (the packaged model)."


def cmd_render(args: Namespace) -> int:
    from promptseg.render import render

    try:
        info = render(args.volume, args.masks, args.out, labels_json=args.labels, title=args.title)
    except ImportError as exc:
        raise ValueError(first_line(exc)) from exc
    if info["empty"]:
        print(f"promptseg render: warning: empty: {', '.join(info['empty'])}", file=sys.stderr)
    print(f"wrote {info['path']}")
    return 0


def cmd_grids(args: Namespace) -> int:
    from promptseg.grids import write_grids

    write_grids(
        args.checkpoint,
        args.data_root,
        args.out,
        datasets=args.datasets,
        split=args.split,
        max_cases=args.max_cases,
        threads=args.threads,
    )
    return 0


def cmd_robustness(args: Namespace) -> int:
    from promptseg.robustness import main_args

    return main_args(args)


def cmd_report(args: Namespace) -> int:
    from promptseg.report import summary_table, targets_table

    table = targets_table if args.targets else summary_table
    print(table(args.eval_dirs), end="")
    return 0


def _load_config_file(path: Path) -> dict:
    """A JSON or YAML mapping of TrainConfig fields; one-line ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parser error is a bad config file
        detail = " ".join(str(exc).split())
        raise ValueError(f"{path}: not a valid config file ({detail})") from exc
    if not isinstance(values, dict):
        raise ValueError(
            f"{path}: expected a mapping of training options, got {type(values).__name__}"
        )
    return values


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _type_ok(value: object, annotation: str) -> bool:
    """Whether a config value fits a TrainConfig annotation (true/false is not a number)."""
    if annotation == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    expected = _TYPES.get(annotation)
    if expected is None:
        return True
    if isinstance(value, bool):
        return annotation == "bool"
    return isinstance(value, expected)


def _check_types(values: dict, source: Path | None) -> None:
    """Reject config values of the wrong type with a message naming the file and key."""
    from promptseg.train import TrainConfig

    for f in fields(TrainConfig):
        if f.name in values and not _type_ok(values[f.name], str(f.type)):
            where = f"{source}: " if source else ""
            raise ValueError(f"{where}option {f.name!r} must be {f.type}, got {values[f.name]!r}")


def cmd_train(args: Namespace) -> int:
    from promptseg.train import TrainConfig, train

    values = _load_config_file(args.config) if args.config else {}
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{args.config}: unknown config keys {sorted(unknown)}")
    _check_types(values, args.config)
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    train(TrainConfig(**values), resume=args.resume, stop_after_minutes=args.stop_after_minutes)
    return 0


def cmd_calibrate_presence(args: Namespace) -> int:
    from promptseg.presence import calibrate_checkpoint

    report = calibrate_checkpoint(args.checkpoint, args.data_root, args.out, args.datasets)
    for target, row in report["targets"].items():
        print(
            f"{target:18s} tau {row['tau']:.2f}  J {row['youden_j']}  "
            f"(+{row['positives']} / -{row['negatives']})"
        )
    print(f"wrote {args.out / 'presence_calibration.json'} and presence_calibration.png")
    return 0


def cmd_serve(args: Namespace) -> int:
    from promptseg.runtime.serve import cmd_serve as run

    return run(args)


def cmd_evaluate(args: Namespace) -> int:
    from promptseg.evaluate import evaluate

    summary = evaluate(
        args.checkpoint,
        args.data,
        args.dataset,
        args.out,
        split=args.split,
        prompt_set=args.prompt_set,
        batch=args.batch,
        threads=args.threads,
        threshold=args.threshold,
        postprocess=args.postprocess,
        presence_gate=args.presence_gate,
        presence_threshold=args.presence_threshold,
    )
    for target, row in summary["targets"].items():
        print(
            f"{target:18s} dice {row['dice_mean']:.4f} (gated {row['dice_gated_mean']:.4f}, "
            f"ungated {row['dice_ungated_mean']:.4f})  n={row['n']}"
        )
    rates = [
        f"{name} {summary[key]:.4f}"
        for name, key in (
            ("all", "absent_empty_rate"),
            ("same domain", "absent_same_domain_empty_rate"),
            ("cross domain", "absent_cross_domain_empty_rate"),
            ("ungated", "absent_empty_rate_ungated"),
        )
        if summary[key] is not None
    ]
    print(
        f"absent-target empty rate: {', '.join(rates)} (n={summary['absent_n']}); "
        f"wrote {args.out / 'summary.json'}"
    )
    return 0


def cmd_info(args: Namespace) -> int:
    from promptseg.model.unet import UNet, count_flops, count_parameters, preset_config

    for name in args.presets:
        unet = UNet(preset_config(name))
        res = unet.config.resolution
        print(
            f"{name:6s} widths {unet.config.widths} at {res}x{res}: "
            f"{count_parameters(unet) / 1e6:.3f} M parameters (image network), "
            f"{count_flops(unet) / 1e9:.2f} GFLOPs per slice, film vector {unet.film_dim}"
        )
    return 0


def cmd_study(args: Namespace) -> int:
    from promptseg.studies.command import cmd_study as run

    return run(args)


# --------------------------------------------------------------------------- click commands


def _handler(run: Callable[[Namespace], int]) -> Callable[..., int]:
    """A click callback that hands its options to an argparse-style handler."""

    def callback(**options: Any) -> int:
        for name, value in options.items():
            if isinstance(value, tuple):
                options[name] = list(value) or None
        try:
            return run(Namespace(**options))
        except (FileNotFoundError, ValueError) as exc:
            command = click.get_current_context().command_path
            print(f"{command}: error: {exc}", file=sys.stderr)
            return 2

    return callback


def _deployed_behaviour(func: Callable) -> Callable:
    """--postprocess and --presence-gate/--no-presence-gate, defaulting to promptseg-run's."""
    func = click.option(
        "--presence-gate/--no-presence-gate",
        "presence_gate",
        default=True,
        show_default=True,
        help="empty slices whose presence probability is below the target's tau (as promptseg-run)",
    )(func)
    return click.option(
        "--postprocess",
        type=click.Choice(["none", "largest"]),
        default="largest",
        show_default=True,
        help="'largest': keep the largest 3D component of organ masks in volumes (as promptseg-run)",
    )(func)


def _datasets(default: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--datasets",
        multiple=True,
        type=click.Choice(KINDS),
        default=list(KINDS) if default else None,
        help="datasets (several values allowed)",
    )


@click.group(context_settings=CONTEXT, help=__doc__)
@version_option(PROG)
def cli() -> None:
    """The ``promptseg`` command group."""


@cli.command("train", help="train a model on the shared datasets")
@click.option("--config", type=PATH, help="JSON or YAML file of TrainConfig fields")
@click.option("--resume", is_flag=True, help="continue from OUT/last.pt")
@click.option("--data-root", "data_root")
@click.option("--out")
@click.option("--preset", type=click.Choice(["default", "small", "paper", "tiny"]))
@click.option("--fusion", type=click.Choice(["concat", "film", "film+cbn"]))
@click.option("--se", type=click.BOOL)
@click.option("--cbam", type=click.BOOL)
@click.option("--loss", help="loss name or weighted sum, e.g. dice_bce or 'dice+0.5*boundary'")
@_datasets(default=False)
@click.option("--total-samples", "total_samples", type=positive_int, help="schedule length")
@click.option("--batch", type=positive_int)
@click.option("--lr", type=float)
@click.option("--weight-decay", "weight_decay", type=float)
@click.option("--seed", type=int)
@click.option("--device")
@click.option("--threads", type=positive_int)
@click.option("--resolution", type=non_negative_int, help="0: the preset's")
@click.option("--eval-every-samples", "eval_every_samples", type=positive_int)
@click.option("--compile", type=click.BOOL, help="torch.compile the training step")
@click.option(
    "--stop-after-minutes",
    "stop_after_minutes",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="save the state and stop after this wall time (continue with --resume); 0: run on",
)
@click.option("--encoder", help="'minilm' (default) or a local BERT-family folder")
@click.option("--no-progress", "progress", flag_value=False, default=None, help="no progress bar")
def train_command(**options: Any) -> int:
    return _handler(cmd_train)(**options)


@cli.command("study", help="loss study, ablation, cross-modality (config-driven)")
@study_options
def study_command(**options: Any) -> int:
    return _handler(cmd_study)(**options)


@cli.command("evaluate", help="evaluate a checkpoint on a dataset folder" + CHECKPOINT_HELP)
@click.argument("checkpoint")
@click.option("--data", required=True, type=PATH, help="folder in the dataset's layout")
@click.option("--dataset", required=True, type=click.Choice(KINDS))
@click.option("--out", required=True, type=PATH)
@click.option(
    "--split", type=click.Choice(["train", "tune", "val"]), help="only this documented split"
)
@click.option(
    "--prompt-set",
    "prompt_set",
    default="canonical",
    type=click.Choice(["canonical", "train", "heldout"]),
    help="which phrasings to prompt with",
)
@click.option("--batch", type=positive_int, default=16)
@click.option("--threads", type=positive_int, default=2)
@click.option("--threshold", type=float, default=0.5)
@_deployed_behaviour
@click.option(
    "--presence-threshold",
    "presence_threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="one tau for every target [default: the checkpoint's presence_thresholds, else 0.5]",
)
def evaluate_command(**options: Any) -> int:
    return _handler(cmd_evaluate)(**options)


@cli.command(
    "calibrate-presence",
    help="choose each target's presence threshold on the tune split and store it in the "
    "checkpoint.\n\nCHECKPOINT: a .pt checkpoint (rewritten in place).",
)
@click.argument("checkpoint", type=PATH)
@click.option("--data-root", "data_root", type=PATH, default=Path("../shared/data"))
@click.option("--out", required=True, type=PATH, help="folder for the JSON and PNG")
@_datasets(default=False)
def calibrate_presence_command(**options: Any) -> int:
    return _handler(cmd_calibrate_presence)(**options)


@cli.command("serve", help="serve an engine with NVIDIA Triton Inference Server (PyTriton)")
@click.option("--engine", type=PATH, help="engine folder [default: the packaged engine]")
@click.option("--host", default="127.0.0.1", help="address to listen on")
@click.option("--http-port", "http_port", type=click.IntRange(0, 65535), default=8000)
@click.option("--grpc-port", "grpc_port", type=click.IntRange(0, 65535), default=8001)
@click.option("--metrics-port", "metrics_port", type=click.IntRange(0, 65535), default=8002)
@click.option("--max-batch", "max_batch", type=positive_int, default=64, help="slices per batch")
@click.option("--instances", type=positive_int, default=1, help="engine instances")
@click.option("--backend", default="auto", help="engine backend (as promptseg-run)")
@click.option("--precision", default=None, help="image graph precision (as promptseg-run)")
@click.option("--threads", type=positive_int, default=None, help="ONNX Runtime threads per engine")
def serve_command(**options: Any) -> int:
    return _handler(cmd_serve)(**options)


@cli.command("info", help="parameters and FLOPs per preset")
@click.option("--presets", multiple=True, default=["small", "paper"], help="preset names")
def info_command(**options: Any) -> int:
    return _handler(cmd_info)(**options)


@cli.command("report", help="Markdown tables from evaluate output folders")
@click.argument("eval_dirs", nargs=-1, required=True, type=PATH)
@click.option(
    "--targets",
    is_flag=True,
    help="print the acceptance table instead (each goal, the value reached, met or not)",
)
def report_command(**options: Any) -> int:
    return _handler(cmd_report)(**options)


@cli.command(
    "render",
    help="PNG of masks over a volume: 3D views + axial overlay.\n\nVOLUME: the scan (NIfTI, "
    "DICOM folder or MRC); MASKS: one label map, or one file per mask.",
)
@click.argument("volume", type=PATH)
@click.argument("masks", nargs=-1, required=True, type=PATH)
@click.option("-o", "--out", required=True, type=PATH, help="the .png to write")
@click.option("--labels", type=PATH, help="JSON naming the label values [default: sidecar]")
@click.option("--title", help="figure title [default: the volume's file name]")
def render_command(**options: Any) -> int:
    return _handler(cmd_render)(**options)


@cli.command(
    "grids", help="best/median/worst overlay grids per target and dataset" + CHECKPOINT_HELP
)
@click.argument("checkpoint")
@click.option("--data-root", "data_root", required=True, type=PATH, help="the shared data folder")
@click.option("--out", required=True, type=PATH, help="folder for grid_<dataset>.png")
@_datasets(default=True)
@click.option("--split", default="val", type=click.Choice(["train", "val"]))
@click.option(
    "--max-cases", "max_cases", type=non_negative_int, default=0, help="first N cases (0: all)"
)
@click.option("--threads", type=positive_int, default=1)
def grids_command(**options: Any) -> int:
    return _handler(cmd_grids)(**options)


@cli.command("robustness", help="prompt robustness on the validation splits" + CHECKPOINT_HELP)
@click.argument("checkpoint")
@click.option("--data-root", "data_root", required=True, type=PATH, help="the shared data folder")
@click.option("--out", required=True, type=PATH, help="folder for results.json, report.md")
@_datasets(default=True)
@click.option(
    "--max-cases",
    "max_cases",
    type=non_negative_int,
    default=0,
    help="first N cases per dataset (0: all)",
)
@click.option("--phrasings", type=positive_int, default=3, help="train/held-out phrasings per case")
@click.option("--seed", type=int, default=0)
@click.option(
    "--free-form",
    "free_form",
    type=PATH,
    help="JSON of free-form prompts [default: the packaged promptseg/data/free_form.json]",
)
@click.option("--engine", type=PATH, help="engine folder for refusal [default: packaged]")
@click.option("--threads", type=positive_int, default=1)
@_deployed_behaviour
def robustness_command(**options: Any) -> int:
    return _handler(cmd_robustness)(**options)


def main(argv: list[str] | None = None) -> int:
    """Run ``promptseg``; returns the exit status (2: bad input, one line on stderr)."""
    return run_command(cli, PROG, argv, multiple=MULTIPLE)


if __name__ == "__main__":
    sys.exit(main())
