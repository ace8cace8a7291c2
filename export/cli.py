"""``promptseg-export CHECKPOINT -o DIR``: write and verify an engine folder."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from promptseg.cliargs import CONTEXT, positive_int, run_command, version_option
from promptseg.export.api import (
    CLI_NAMES,
    INT8_FALLBACK_TOLERANCE,
    check_int8_options,
    export_model,
)
from promptseg.export.files import ExportError, ExportInputError

PROG = "promptseg-export"
PATH = click.Path(path_type=Path)


class Fraction(click.ParamType):
    """A number in [0, 1)."""

    name = "fraction"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"expected a number in [0, 1), got {str(value)!r}", param, ctx)
        if not 0.0 <= number < 1.0:
            self.fail(f"expected a number in [0, 1), got {number}", param, ctx)
        return number


@click.command(
    context_settings=CONTEXT,
    help="Export a promptseg checkpoint to a verified engine folder (docs/engine_format.md): "
    "ONNX graphs, prompt cache, text encoder, manifest, and a TensorRT plan where tensorrt "
    "imports.\n\nCHECKPOINT: a .pt checkpoint or 'default' (the packaged model).",
)
@click.argument("checkpoint")
@click.option("-o", "--out", type=PATH, help="engine folder to write")
@click.option(
    "--triton-repo",
    "triton_repo",
    type=PATH,
    metavar="DIR",
    help="also write a Triton model repository (docs/serving.md); with an engine folder "
    "as CHECKPOINT and no -o, only convert that folder",
)
@click.option("--fp16", is_flag=True, help="also write model.fp16.onnx")
@click.option("--int8", is_flag=True, help="also write model.int8.onnx (needs --calib-data)")
@click.option(
    "--calib-data",
    type=PATH,
    help="calibration data for --int8: a dataset root or a calibration .npz "
    "(promptseg.calibration.CalibrationSet.save)",
)
@click.option(
    "--calib-samples",
    type=positive_int,
    help="calibration samples drawn from a dataset root [default: 128]",
)
@click.option(
    "--int8-fallback-tolerance",
    type=Fraction(),
    help="with --int8: keep the most sensitive INT8 nodes in float until, on a train-split "
    "proxy, every target's Dice difference d to FP32 has |mean d| + 2 sd(d)/sqrt(m) within "
    "this, m being the validation cases the parity check averages that target over "
    f"[default: {INT8_FALLBACK_TOLERANCE}]",
)
@click.option(
    "--no-int8-fallback",
    "no_int8_fallback",
    is_flag=True,
    help="with --int8: plain static INT8, no sensitivity-driven float fallback",
)
@click.option(
    "--prompts", type=PATH, help="extra prompts for the cache, one per line (prompt[TAB target])"
)
@click.option("--opset", type=positive_int, default=17, help="ONNX opset")
@click.option("--max-batch", type=positive_int, default=32, help="TensorRT profile max batch")
@click.option(
    "--text-encoder-quant",
    type=click.Choice(["none", "int8"]),
    default="none",
    help="dynamic INT8 quantisation of text_encoder.onnx",
)
@click.option("--no-verify", "no_verify", is_flag=True, help="skip the parity checks")
@click.option("--data-root", type=PATH, help="shared data folder [default: ../shared/data]")
@click.option("-q", "--quiet", is_flag=True, help="no progress lines")
@version_option(PROG)
def command(**args: Any) -> int:
    """``promptseg-export`` (see the module docstring)."""
    return _export(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 2 on bad input, 1 on a failed export check."""
    return run_command(command, PROG, argv)


def _export(args: dict[str, Any]) -> int:
    if args["triton_repo"] is not None and args["out"] is None:
        return _triton_repo_only(args["triton_repo"], Path(args["checkpoint"]))
    if args["out"] is None:
        raise click.UsageError("Missing option '-o' / '--out'.")
    if args["no_int8_fallback"] and args["int8_fallback_tolerance"] is not None:
        raise click.UsageError("--int8-fallback-tolerance: not allowed with --no-int8-fallback")
    if args["no_int8_fallback"]:
        tolerance, fallback_option = None, "no_fallback"
    elif args["int8_fallback_tolerance"] is not None:
        tolerance, fallback_option = args["int8_fallback_tolerance"], "tolerance"
    else:
        tolerance, fallback_option = INT8_FALLBACK_TOLERANCE, None
    try:  # export_model checks these too; here they are named by their flags
        check_int8_options(
            args["int8"],
            args["calib_data"],
            args["calib_samples"],
            tolerance,
            args["data_root"],
            fallback_option,
            CLI_NAMES,
        )
    except ExportInputError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        manifest = export_model(
            args["checkpoint"],
            args["out"],
            fp16=args["fp16"],
            int8=args["int8"],
            calib_data=args["calib_data"],
            calib_samples=args["calib_samples"],
            int8_fallback_tolerance=tolerance,
            prompts_file=args["prompts"],
            opset=args["opset"],
            max_batch=args["max_batch"],
            text_encoder_quant=args["text_encoder_quant"],
            verify=not args["no_verify"],
            progress=not args["quiet"],
            data_root=args["data_root"],
        )
    except ExportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(manifest)
    if args["triton_repo"] is not None:
        return _triton_repo_only(args["triton_repo"], Path(args["out"]))
    return 0


def _triton_repo_only(repo: Path, engine: Path) -> int:
    """``--triton-repo DIR``: write the repository for an engine folder."""
    from promptseg.data.readers import InputError
    from promptseg.export.triton_repo import write_triton_repo

    try:
        models = write_triton_repo(engine, repo)
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {repo} ({', '.join(models)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
