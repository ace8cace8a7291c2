"""Errors, progress lines, hashing and atomic writes shared by the export stages."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from promptseg.runtime.manifest import sha256_file  # the runtime's (torch-free) hash


class ExportError(RuntimeError):
    """An export that cannot go on (a failed check, a broken graph); one-line message.

    The CLI prints the message and exits with status 1.
    """

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ExportInputError(ExportError):
    """A bad argument, missing checkpoint or unwritable folder; the CLI exits with status 2."""

    exit_code = 2


class Progress:
    """One line per stage on stderr: ``[promptseg-export] <stage> (<seconds>s)``."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"[promptseg-export {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Write through ``write(tmp)`` into a temp file beside ``path``, then rename it into place.

    The temp name keeps the suffix (``.tmp-<hex>-<name>``) so suffix-sniffing writers work. On
    failure the temp file is removed and ``path`` is untouched.
    """
    from promptseg.runtime.writers import atomic_write as write_atomically

    return write_atomically(path, write, lambda target, why: ExportInputError(f"{target}: {why}"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a file atomically."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def save_onnx(model: Any, path: str | os.PathLike[str]) -> Path:
    """Serialize an ``onnx.ModelProto`` into one self-contained file, atomically."""
    data = model.SerializeToString()
    return atomic_write_bytes(path, data)


def file_entry(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"sha256": ..., "bytes": ...}`` of a file (the manifest's ``files`` entries)."""
    return {"sha256": sha256_file(Path(path)), "bytes": os.path.getsize(path)}
