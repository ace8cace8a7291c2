"""Regenerate the engine folder shipped inside the package (``promptseg.runtime``'s
``default_engine/``) from the packaged ``default`` checkpoint.

Run as ``python -m promptseg.export.default_engine [OUT_DIR]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_engine_dir() -> Path:
    """``runtime/default_engine`` beside the installed ``promptseg.runtime`` package."""
    import promptseg.runtime

    return Path(promptseg.runtime.__file__).resolve().parent / "default_engine"


def build_default_engine(
    out_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    data_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Export ``default`` with FP16 and the INT8 text encoder, verified.

    Args:
        out_dir: Engine folder (default: the packaged ``default_engine/``).
        progress: Print one line per stage.
        data_root: Shared data folder for the FP16 audit and verification.

    Returns:
        Path of the written ``manifest.json``.
    """
    from promptseg.export.api import export_model

    return export_model(
        "default",
        out_dir if out_dir is not None else default_engine_dir(),
        fp16=True,
        text_encoder_quant="int8",
        verify=True,
        progress=progress,
        data_root=data_root,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m promptseg.export.default_engine [OUT_DIR]``."""
    from promptseg.export.files import ExportError

    args = sys.argv[1:] if argv is None else argv
    try:
        print(build_default_engine(args[0] if args else None))
    except ExportError as exc:
        print(f"promptseg-export: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
