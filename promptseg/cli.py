"""``promptseg`` command line: train, study, evaluate, info, report, render, grids, robustness.

Commands import their heavy modules (torch among them) only when they run, so ``render``,
``report`` and ``--help`` work without torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from promptseg.cliargs import OneLineParser, non_negative_int, positive_int
from promptseg.data.datasets import KINDS
from promptseg.runtime.errors import first_line
from promptseg.studies.command import add_study_parser


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on the shared datasets")
    p.add_argument("--config", type=Path, help="JSON or YAML file of TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--data-root", dest="data_root")
    p.add_argument("--out")
    p.add_argument("--preset", choices=["small", "paper", "tiny"])
    p.add_argument("--fusion", choices=["concat", "film", "film+cbn"])
    p.add_argument("--se", type=_bool)
    p.add_argument("--cbam", type=_bool)
    p.add_argument("--loss", help="loss name or weighted sum, e.g. dice_bce or 'dice+0.5*boundary'")
    p.add_argument("--datasets", nargs="+", choices=KINDS)
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch", type=positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", dest="weight_decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--resolution", type=non_negative_int, help="0: the preset's")
    p.add_argument("--max-samples-per-epoch", dest="max_samples_per_epoch", type=non_negative_int)
    p.add_argument("--val-max-samples", dest="val_max_samples", type=non_negative_int)
    p.add_argument("--encoder", help="'minilm' (default) or a local BERT-family folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset folder")
    p.add_argument("checkpoint", help="a .pt checkpoint or 'default' (the packaged model)")
    p.add_argument("--data", required=True, type=Path, help="folder in the dataset's layout")
    p.add_argument("--dataset", required=True, choices=KINDS)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--split", choices=["train", "val"], help="only this documented split")
    p.add_argument(
        "--prompt-set",
        default="canonical",
        choices=["canonical", "train", "heldout"],
        help="which phrasings to prompt with",
    )
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument(
        "--postprocess",
        choices=["none", "largest"],
        default="none",
        help="'largest': keep the largest 3D component of organ masks in volumes",
    )


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters and FLOPs per preset")
    p.add_argument("--presets", nargs="+", default=["small", "paper"])


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Markdown tables from evaluate output folders")
    p.add_argument("eval_dirs", nargs="+", type=Path)


def _add_render(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="PNG of masks over a volume: 3D views + axial overlay")
    p.add_argument("volume", type=Path, help="the scan (NIfTI, DICOM folder or MRC)")
    p.add_argument("masks", nargs="+", type=Path, help="one label map, or one file per mask")
    p.add_argument("-o", "--out", required=True, type=Path, help="the .png to write")
    p.add_argument("--labels", type=Path, help="JSON naming the label values (default: sidecar)")
    p.add_argument("--title", help="figure title (default: the volume's file name)")


def cmd_render(args: argparse.Namespace) -> int:
    from promptseg.render import render

    try:
        info = render(args.volume, args.masks, args.out, labels_json=args.labels, title=args.title)
    except ImportError as exc:
        raise ValueError(first_line(exc)) from exc
    if info["empty"]:
        print(f"promptseg render: warning: empty: {', '.join(info['empty'])}", file=sys.stderr)
    print(f"wrote {info['path']}")
    return 0


def _add_grids(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grids", help="best/median/worst overlay grids per target and dataset")
    p.add_argument("checkpoint", help="a .pt checkpoint or 'default' (the packaged model)")
    p.add_argument("--data-root", required=True, type=Path, help="the shared data folder")
    p.add_argument("--out", required=True, type=Path, help="folder for grid_<dataset>.png")
    p.add_argument("--datasets", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument(
        "--max-cases", type=non_negative_int, default=0, help="first N cases only (0: all)"
    )
    p.add_argument("--threads", type=positive_int, default=1)


def cmd_grids(args: argparse.Namespace) -> int:
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


def _add_robustness(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("robustness", help="prompt robustness on the validation splits")
    p.add_argument("checkpoint", help="a .pt checkpoint or 'default' (the packaged model)")
    p.add_argument("--data-root", required=True, type=Path, help="the shared data folder")
    p.add_argument("--out", required=True, type=Path, help="folder for results.json, report.md")
    p.add_argument("--datasets", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument(
        "--max-cases", type=non_negative_int, default=0, help="first N cases per dataset (0: all)"
    )
    p.add_argument(
        "--phrasings", type=positive_int, default=3, help="train/held-out phrasings per case"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--free-form",
        type=Path,
        help="JSON of free-form prompts (default: the packaged promptseg/data/free_form.json)",
    )
    p.add_argument("--engine", type=Path, help="engine folder for refusal (default: packaged)")
    p.add_argument("--threads", type=positive_int, default=1)


def cmd_robustness(args: argparse.Namespace) -> int:
    from promptseg.robustness import main_args

    return main_args(args)


def cmd_report(args: argparse.Namespace) -> int:
    from promptseg.report import summary_table

    print(summary_table(args.eval_dirs), end="")
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


def cmd_train(args: argparse.Namespace) -> int:
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
    train(TrainConfig(**values), resume=args.resume)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
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
    )
    for target, row in summary["targets"].items():
        print(f"{target:18s} dice {row['dice_mean']:.4f}  n={row['n']}")
    print(
        f"absent-target empty rate {summary['absent_empty_rate']:.4f} "
        f"(n={summary['absent_n']}); wrote {args.out / 'summary.json'}"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
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


def cmd_study(args: argparse.Namespace) -> int:
    from promptseg.studies.command import cmd_study as run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="promptseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _add_train(sub)
    add_study_parser(sub)
    _add_evaluate(sub)
    _add_info(sub)
    _add_report(sub)
    _add_render(sub)
    _add_grids(sub)
    _add_robustness(sub)
    args = parser.parse_args(argv)
    handlers = {
        "train": cmd_train,
        "evaluate": cmd_evaluate,
        "info": cmd_info,
        "report": cmd_report,
        "render": cmd_render,
        "grids": cmd_grids,
        "study": cmd_study,
        "robustness": cmd_robustness,
    }
    try:
        return handlers[args.command](args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"promptseg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
