"""``promptseg-run``: segment NIfTI volumes, DICOM series and 2-D images from text prompts.

Examples::

    promptseg-run image_1.nii.gz --prompt liver
    promptseg-run image_1.nii.gz --prompt liver --prompt "left kidney" -o labels.nii.gz
    promptseg-run series_dir/ scan.nii.gz --prompt spleen -o masks/ --json summary.json

Bad input ends with one line ``promptseg-run: error: <file>: <what is wrong>`` on stderr and
exit code 2, and writes nothing. Set ``PROMPTSEG_DEBUG=1`` to get tracebacks of internal errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from promptseg.cliargs import CONTEXT, positive_int, run_command, version_option
from promptseg.postprocess import POSTPROCESS_MODES
from promptseg.prompts import GROUPS, TARGETS
from promptseg.runtime.api import run
from promptseg.runtime.dicom_seg import OUTPUT_FORMATS
from promptseg.runtime.engines import BACKENDS, PRECISIONS
from promptseg.runtime.errors import InputError, first_line
from promptseg.runtime.pipeline import MODALITY_CHOICES

PROG = "promptseg-run"
_GROUP_LIST = "; ".join(f"{name} = {' + '.join(members)}" for name, members in GROUPS.items())
EPILOG = (
    f"Known targets (packaged engine): {', '.join(TARGETS)}. Group prompts give one label per "
    f"member: {_GROUP_LIST}. A prompt between several targets (e.g. 'tumor') is refused as "
    "ambiguous with the candidates."
)


@click.command(
    context_settings=CONTEXT,
    epilog=EPILOG,
    help="Segment medical images from text prompts with an exported promptseg engine "
    "(no PyTorch needed).\n\nINPUT: NIfTI file, DICOM series folder (or a .dcm inside it), MRC "
    "volume or 2-D image (PNG/JPEG/TIFF; assumed to be in the training orientation).",
)
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    required=True,
    metavar="TEXT",
    help="what to segment, e.g. 'liver' or 'kidneys'; repeat for a label map 1..K",
)
@click.option(
    "-o",
    "--output",
    metavar="OUT",
    help="output file for one input (default <stem>_mask.nii.gz / _mask.png beside it); "
    "a folder for several inputs",
)
@click.option(
    "--engine", metavar="DIR", help="engine folder from promptseg-export [default: packaged]"
)
@click.option("--backend", default="auto", metavar="|".join(BACKENDS), help="inference backend")
@click.option(
    "--precision", default=None, metavar="|".join(PRECISIONS), help="image graph precision"
)
@click.option("--batch", type=int, default=16, metavar="N", help="slices per engine call")
@click.option("--threshold", type=float, default=0.5, metavar="T", help="probability threshold")
@click.option(
    "--modality",
    default="auto",
    metavar="|".join(MODALITY_CHOICES),
    help="intensity rule; auto: the DICOM Modality tag, else CT when the minimum is below -500 "
    "and the values look like HU (min >= -3100, max <= 32767), else MR; 8-bit 2-D images /255",
)
@click.option("--json", "json_path", metavar="FILE", help="write a JSON summary")
@click.option("--volume", type=int, default=None, metavar="N", help="volume of a 4-D NIfTI")
@click.option("--series", default=None, metavar="UID", help="SeriesInstanceUID to read")
@click.option(
    "--threads",
    type=positive_int,
    default=None,
    metavar="N",
    help="ONNX Runtime intra-op threads (a positive integer) [default: ONNX Runtime's choice]",
)
@click.option(
    "--render",
    metavar="PNG",
    help="also draw a picture of the masks (3-D views + axial overlay) to this .png; "
    "one volume input; needs pip install 'promptseg[render]'",
)
@click.option(
    "--postprocess",
    default="largest",
    metavar="|".join(POSTPROCESS_MODES),
    help="largest: keep the largest 3-D connected component of each organ "
    "(liver, spleen, each kidney) in a volume, after overlaps are settled; none: keep all",
)
@click.option(
    "--presence-threshold",
    "presence_threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    metavar="TAU",
    help="keep a slice's mask only where the engine's presence probability is at least TAU, "
    "for every prompt [default: each target's tau from the engine manifest]",
)
@click.option(
    "--presence-gate/--no-presence-gate",
    "presence_gate",
    default=True,
    show_default=True,
    help="gate slices by the engine's presence output (engines that have one)",
)
@click.option(
    "--output-format",
    "output_format",
    default="auto",
    metavar="|".join(OUTPUT_FORMATS),
    help="dicom-seg: a DICOM Segmentation per DICOM series input (one segment per prompt); "
    "auto: DICOM SEG when -o ends in .dcm, else NIfTI/PNG",
)
@click.option(
    "--server",
    metavar="HOST:PORT",
    help="segment on a 'promptseg serve' server (its HTTP port) instead of locally; "
    "writes the same outputs",
)
@click.option("--quiet", is_flag=True, help="no progress bar, no 'wrote' lines")
@version_option(PROG)
def command(**options: object) -> int:
    """``promptseg-run`` (see the module docstring)."""
    return _run(options)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 1 internal error)."""
    return run_command(command, PROG, argv)


def _run(args: dict) -> int:
    quiet = bool(args.pop("quiet"))

    def log(line: str) -> None:
        if line.startswith("warning:"):
            print(f"{PROG}: {line}", file=sys.stderr)
        elif not quiet:
            print(line)

    try:
        run(
            list(args.pop("inputs")),
            list(args.pop("prompts")),
            **args,
            progress=not quiet,
            log=log,
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
