"""``promptseg-export CHECKPOINT -o DIR``: write and verify an engine folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from promptseg.export.api import INT8_FALLBACK_TOLERANCE
from promptseg.export.files import ExportError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
    p = argparse.ArgumentParser(
        prog="promptseg-export",
        description="Export a promptseg checkpoint to a verified engine folder "
        "(docs/engine_format.md): ONNX graphs, prompt cache, text encoder, manifest, and a "
        "TensorRT plan where tensorrt imports.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint or 'default' (the packaged model)")
    p.add_argument("-o", "--out", required=True, type=Path, help="engine folder to write")
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
        type=_positive,
        help="calibration samples drawn from a dataset root (default 128)",
    )
    p.add_argument(
        "--int8-fallback-tolerance",
        type=_fraction,
        default=INT8_FALLBACK_TOLERANCE,
        help="keep the most sensitive INT8 nodes in float until, on a train-split proxy, "
        "every target's Dice difference to FP32 (mean + 2 standard errors over its cases) is "
        f"within this (default {INT8_FALLBACK_TOLERANCE})",
    )
    p.add_argument(
        "--no-int8-fallback",
        dest="int8_fallback",
        action="store_false",
        help="plain static INT8: no sensitivity-driven float fallback",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        help="extra prompts for the cache, one per line (prompt[TAB target])",
    )
    p.add_argument("--opset", type=_positive, default=17, help="ONNX opset (default 17)")
    p.add_argument(
        "--max-batch", type=_positive, default=32, help="TensorRT profile max batch (default 32)"
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
    if args.int8 and args.calib_data is None:
        parser.error("--int8 needs --calib-data DIR")
    if args.calib_data is not None and not args.int8:
        parser.error("--calib-data is only used with --int8")
    if args.calib_samples is not None and not args.int8:
        parser.error("--calib-samples is only used with --int8")
    if args.calib_samples is not None and args.calib_data.is_file():
        parser.error(
            f"--calib-samples applies to a dataset root; {args.calib_data} is a saved "
            "calibration set with its own samples"
        )
    from promptseg.export.api import export_model

    try:
        manifest = export_model(
            args.checkpoint,
            args.out,
            fp16=args.fp16,
            int8=args.int8,
            calib_data=args.calib_data,
            calib_samples=args.calib_samples,
            int8_fallback_tolerance=args.int8_fallback_tolerance if args.int8_fallback else None,
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
