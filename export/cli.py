"""``promptseg-export CHECKPOINT -o DIR``: write and verify an engine folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from promptseg.cliargs import OneLineParser, positive_int
from promptseg.export.api import (
    CLI_NAMES,
    INT8_FALLBACK_TOLERANCE,
    check_int8_options,
    export_model,
)
from promptseg.export.files import ExportError, ExportInputError

PROG = "promptseg-export"


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from exc
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs)."""
    p = OneLineParser(
        prog=PROG,
        description="Export a promptseg checkpoint to a verified engine folder "
        "(docs/engine_format.md): ONNX graphs, prompt cache, text encoder, manifest, and a "
        "TensorRT plan where tensorrt imports.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint or 'default' (the packaged model)")
    p.add_argument("-o", "--out", type=Path, help="engine folder to write")
    p.add_argument(
        "--triton-repo",
        type=Path,
        metavar="DIR",
        help="also write a Triton model repository (docs/serving.md); with an engine folder "
        "as CHECKPOINT and no -o, only convert that folder",
    )
    p.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx")
    p.add_argument(
        "--int8", action="store_true", help="also write model.int8.onnx (needs --calib-data)"
    )
    p.add_argument(
        "--calib-data",
        type=Path,
        help="calibration data for --int8: a dataset root or a calibration .npz "
        "(promptseg.calibration.CalibrationSet.save)",
    )
    p.add_argument(
        "--calib-samples",
        type=positive_int,
        help="calibration samples drawn from a dataset root (default 128)",
    )
    fallback = p.add_mutually_exclusive_group()
    fallback.add_argument(
        "--int8-fallback-tolerance",
        type=_fraction,
        help="with --int8: keep the most sensitive INT8 nodes in float until, on a train-split "
        "proxy, every target's Dice difference d to FP32 has |mean d| + 2 sd(d)/sqrt(m) within "
        "this, m being the validation cases the parity check averages that target over "
        f"(default {INT8_FALLBACK_TOLERANCE})",
    )
    fallback.add_argument(
        "--no-int8-fallback",
        dest="int8_fallback",
        action="store_false",
        help="with --int8: plain static INT8, no sensitivity-driven float fallback",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        help="extra prompts for the cache, one per line (prompt[TAB target])",
    )
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default 17)")
    p.add_argument(
        "--max-batch", type=positive_int, default=32, help="TensorRT profile max batch (default 32)"
    )
    p.add_argument(
        "--text-encoder-quant",
        choices=["none", "int8"],
        default="none",
        help="dynamic INT8 quantisation of text_encoder.onnx (default none)",
    )
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip the parity checks"
    )
    p.add_argument("--data-root", type=Path, help="shared data folder (default ../shared/data)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 2 on bad input, 1 on a failed export check."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.triton_repo is not None and args.out is None:
        return _triton_repo_only(args)
    if args.out is None:
        parser.error("the following arguments are required: -o/--out")
    if not args.int8_fallback:
        tolerance, fallback_option = None, "no_fallback"
    elif args.int8_fallback_tolerance is not None:
        tolerance, fallback_option = args.int8_fallback_tolerance, "tolerance"
    else:
        tolerance, fallback_option = INT8_FALLBACK_TOLERANCE, None
    try:  # export_model checks these too; here they are named by their flags
        check_int8_options(
            args.int8,
            args.calib_data,
            args.calib_samples,
            tolerance,
            args.data_root,
            fallback_option,
            CLI_NAMES,
        )
    except ExportInputError as exc:
        parser.error(str(exc))
    try:
        manifest = export_model(
            args.checkpoint,
            args.out,
            fp16=args.fp16,
            int8=args.int8,
            calib_data=args.calib_data,
            calib_samples=args.calib_samples,
            int8_fallback_tolerance=tolerance,
            prompts_file=args.prompts,
            opset=args.opset,
            max_batch=args.max_batch,
            text_encoder_quant=args.text_encoder_quant,
            verify=args.verify,
            progress=not args.quiet,
            data_root=args.data_root,
        )
    except ExportError as exc:
        print(f"promptseg-export: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("promptseg-export: interrupted", file=sys.stderr)
        return 130
    print(manifest)
    if args.triton_repo is not None:
        return _triton_repo_only(args, engine=args.out)
    return 0


def _triton_repo_only(args: argparse.Namespace, engine: Path | None = None) -> int:
    """``--triton-repo DIR``: write the repository for an engine folder."""
    from promptseg.data.readers import InputError
    from promptseg.export.triton_repo import write_triton_repo

    try:
        models = write_triton_repo(engine or Path(args.checkpoint), args.triton_repo)
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.triton_repo} ({', '.join(models)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
