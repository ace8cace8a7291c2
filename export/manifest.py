"""``manifest.json``: the facts every runtime reads (see docs/engine_format.md)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from promptseg.export.files import ExportError, atomic_write_json, file_entry
from promptseg.runtime.engine_format import FORMAT, MANIFEST, VERSION, schema_problems

ORIENTATION_DESCRIPTION = (
    "rows: patient right -> left; columns: posterior -> anterior; slices: inferior -> superior"
)


def film_layout_entries(layout: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """[(name, size)] -> [{"name", "offset", "size"}] in packing order."""
    out, offset = [], 0
    for name, size in layout:
        out.append({"name": name, "offset": offset, "size": int(size)})
        offset += int(size)
    return out


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the exported files."""
    import promptseg

    out = {"promptseg": promptseg.__version__, "python": platform.python_version()}
    for dist in (
        "torch",
        "onnx",
        "onnxruntime",
        "onnxconverter-common",
        "transformers",
        "safetensors",
        "numpy",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every regular file in ``folder`` except the manifest itself."""
    return {
        p.name: file_entry(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


def now_iso() -> str:
    """Current UTC time, ISO-8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_manifest(folder: Path, fields: dict[str, Any]) -> Path:
    """Write ``manifest.json`` last: ``fields`` plus the ``files`` table of the folder."""
    manifest = {"format": FORMAT, "version": VERSION, "created": now_iso(), **fields}
    manifest["files"] = file_table(folder)
    problems = schema_problems(json.loads(json.dumps(manifest)))
    if problems:
        raise ExportError(
            f"{folder / MANIFEST}: the manifest breaks docs/engine_format.schema.json: "
            f"{problems[0]}"
        )
    return atomic_write_json(folder / MANIFEST, manifest)
