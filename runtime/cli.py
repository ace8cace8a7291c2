"""``promptseg-run``: segment NIfTI volumes, DICOM series and 2-D images from text prompts.

Examples::

    promptseg-run image_1.nii.gz --prompt liver
    promptseg-run image_1.nii.gz --prompt liver --prompt "left kidney" -o labels.nii.gz
    promptseg-run series_dir/ scan.nii.gz --prompt spleen -o masks/ --json summary.json

Bad input ends with one line ``promptseg-run: error: <file>: <what is wrong>`` on stderr and
exit code 2, and writes nothing. Set ``PROMPTSEG_DEBUG=1`` to get tracebacks of internal errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from promptseg.cliargs import OneLineParser, positive_int
from promptseg.runtime.api import run
from promptseg.runtime.engines import BACKENDS, PRECISIONS
from promptseg.runtime.errors import InputError, first_line
from promptseg.runtime.pipeline import MODALITY_CHOICES

PROG = "promptseg-run"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Segment medical images from text prompts with an exported promptseg engine "
        "(no PyTorch needed).",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="NIfTI file, DICOM series folder (or a .dcm inside it), MRC volume or 2-D image "
        "(PNG/JPEG/TIFF; assumed to be in the training orientation)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="what to segment, e.g. 'liver'; repeat for a label map 1..K",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="output file for one input (default <stem>_mask.nii.gz / _mask.png beside it); "
        "a folder for several inputs",
    )
    p.add_argument(
        "--engine", metavar="DIR", help="engine folder from promptseg-export (default: packaged)"
    )
    p.add_argument(
        "--backend", default="auto", metavar="|".join(BACKENDS), help="inference backend"
    )
    p.add_argument(
        "--precision", default=None, metavar="|".join(PRECISIONS), help="image graph precision"
    )
    p.add_argument("--batch", type=int, default=16, metavar="N", help="slices per engine call")
    p.add_argument(
        "--threshold", type=float, default=0.5, metavar="T", help="probability threshold"
    )
    p.add_argument(
        "--modality",
        default="auto",
        metavar="|".join(MODALITY_CHOICES),
        help="intensity rule; auto: the DICOM Modality tag, else CT when the minimum is below -500 "
        "and the values look like HU (min >= -3100, max <= 32767), else MR; 8-bit 2-D images /255",
    )
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write a JSON summary")
    p.add_argument("--volume", type=int, default=None, metavar="N", help="volume of a 4-D NIfTI")
    p.add_argument("--series", default=None, metavar="UID", help="SeriesInstanceUID to read")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="ONNX Runtime intra-op threads (a positive integer; default: ONNX Runtime's choice)",
    )
    p.add_argument(
        "--render",
        metavar="PNG",
        help="also draw a picture of the masks (3-D views + axial overlay) to this .png; "
        "one volume input; needs pip install 'promptseg[render]'",
    )
    p.add_argument(
        "--postprocess",
        default="largest",
        metavar="largest|none",
        help="largest (default): keep the largest 3-D connected component of each organ "
        "(liver, spleen, each kidney) in a volume; none: keep every component",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, no 'wrote' lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 1 internal error)."""
    args = build_parser().parse_args(argv)

    def log(line: str) -> None:
        if line.startswith("warning:"):
            print(f"{PROG}: {line}", file=sys.stderr)
        elif not args.quiet:
            print(line)

    try:
        run(
            args.inputs,
            args.prompt,
            output=args.output,
            engine=args.engine,
            backend=args.backend,
            precision=args.precision,
            batch=args.batch,
            threshold=args.threshold,
            modality=args.modality,
            json_path=args.json_path,
            volume=args.volume,
            series=args.series,
            threads=args.threads,
            progress=not args.quiet,
            log=log,
            render=args.render,
            postprocess=args.postprocess,
        )
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line unless debugging
        if os.environ.get("PROMPTSEG_DEBUG"):
            raise
        first = first_line(exc, default="")
        print(
            f"{PROG}: error: internal error: {type(exc).__name__}: {first} "
            "(set PROMPTSEG_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
