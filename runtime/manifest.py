"""The engine folder (docs/engine_format.md): manifest parsing and integrity checks.

An :class:`EngineFolder` is opened once per run. Opening it checks the manifest's format and
version, that every file it lists exists with the recorded size, and that the files every
runtime needs are present. A file's SHA-256 is checked on its first use
(:meth:`EngineFolder.file`): the image graph the engine loads, the prompt cache, and the text
encoder, vocabulary and FiLM generator only when a prompt misses the cache, so a run whose
prompts are all cached does not hash the 44 MB text encoder. Every file is used before the first
output is written, so a mismatch still ends the run with nothing written. Any problem raises
:class:`InputError` naming the file (:class:`IntegrityError` for a size or hash mismatch).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.preprocess import Preprocessing
from promptseg.runtime.engine_format import (
    FORMAT,
    INPUT_NAMES,
    MANIFEST,
    OPTIONAL_OUTPUT_NAMES,
    OUTPUT_NAMES,
    REQUIRED_FILES,
    REQUIRED_KEYS,
    VERSION,
    schema_problems,
)
from promptseg.runtime.errors import InputError, PathLike

DEFAULT_ENGINE_DIR = Path(__file__).with_name("default_engine")
_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one graph input or output.

    ``shape`` holds ints for fixed dimensions and strings (e.g. ``"N"``) for dynamic ones.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        dtype = str(d["dtype"])
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        shape = tuple(s if isinstance(s, str) else int(s) for s in d["shape"])
        return cls(str(d["name"]), shape, np.dtype(_DTYPES[dtype]))

    def describe(self) -> str:
        dims = ", ".join(str(s) for s in self.shape)
        return f"{self.name} {self.dtype.name} [{dims}]"


class IntegrityError(InputError):
    """An engine-folder file whose size or SHA-256 differs from the manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class EngineFolder:
    """A validated engine folder.

    Attributes:
        path: The folder.
        manifest: The parsed manifest.json.
        manifest_sha256: SHA-256 of the manifest file's bytes (identifies the engine).
        inputs: Specs of the image graph's inputs (``image``, ``film``).
        outputs: Specs of its outputs (``logits``).
        preprocessing: Normalisation settings shared with training.
        verify_hashes: Check each listed file's SHA-256 on its first use (:meth:`file`).
    """

    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    inputs: tuple[TensorSpec, ...] = field(default_factory=tuple)
    outputs: tuple[TensorSpec, ...] = field(default_factory=tuple)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    verify_hashes: bool = True
    _verified: set[str] = field(default_factory=set, repr=False, compare=False)

    @classmethod
    def open(cls, path: PathLike | None = None, *, verify_hashes: bool = True) -> EngineFolder:
        """Open and validate an engine folder (``None``: the packaged default engine).

        Every listed file must exist with its recorded size; SHA-256 hashes are checked lazily,
        on each file's first use through :meth:`file` (never with ``verify_hashes=False``).

        Raises:
            InputError: Missing folder or files, unreadable or inconsistent manifest, a file
                whose size differs from the manifest.
        """
        folder = Path(path) if path is not None else DEFAULT_ENGINE_DIR
        manifest_path = folder / MANIFEST
        if path is None and not manifest_path.is_file():
            raise InputError(
                folder,
                "the packaged default engine is missing (no manifest.json); build it with "
                "promptseg.export.default_engine.build_default_engine(DIR) or pass --engine DIR",
            )
        if not folder.is_dir():
            raise InputError(folder, "engine folder not found; expected a promptseg-export folder")
        if not manifest_path.is_file():
            raise InputError(
                manifest_path, "missing; expected the manifest of a promptseg-export folder"
            )
        raw = manifest_path.read_bytes()
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(manifest_path, f"not valid JSON ({exc})") from exc
        _check_manifest(manifest_path, manifest)
        _check_files(folder, manifest_path, manifest["files"])
        try:
            inputs = tuple(TensorSpec.from_dict(d) for d in manifest["inputs"])
            outputs = tuple(TensorSpec.from_dict(d) for d in manifest["outputs"])
            pre = Preprocessing.from_dict(manifest["preprocessing"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                manifest_path, f"invalid inputs/outputs/preprocessing ({exc})"
            ) from exc
        names, out_names = [s.name for s in inputs], [s.name for s in outputs]
        expected_out = list(OUTPUT_NAMES)
        if (
            names != list(INPUT_NAMES)
            or out_names[:1] != expected_out
            or not set(out_names[1:]) <= set(OPTIONAL_OUTPUT_NAMES)
        ):
            raise InputError(
                manifest_path,
                f"graph I/O {names} -> {out_names}; expected {list(INPUT_NAMES)} -> "
                f"{expected_out} (optionally also {list(OPTIONAL_OUTPUT_NAMES)})",
            )
        digest = hashlib.sha256(raw).hexdigest()
        return cls(folder, manifest, digest, inputs, outputs, pre, verify_hashes)

    def file(self, name: str) -> Path:
        """Path of a file of the folder, checked to exist and (first use) to match its SHA-256.

        Raises:
            InputError: The file is missing.
            IntegrityError: Its SHA-256 differs from the manifest's.
        """
        p = self.path / name
        if not p.is_file():
            raise InputError(p, "missing from the engine folder")
        if self.verify_hashes and name not in self._verified:
            facts = (self.manifest.get("files") or {}).get(name)
            want = facts.get("sha256") if isinstance(facts, dict) else facts
            if want and sha256_file(p) != want:
                raise IntegrityError(
                    p, f"SHA-256 differs from {MANIFEST}; the file is corrupted or replaced"
                )
            self._verified.add(name)
        return p

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    @property
    def film_dim(self) -> int:
        return int(self.manifest["film_dim"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def targets(self) -> list[str]:
        return [str(t) for t in self.manifest["targets"]]

    @property
    def axcodes(self) -> str:
        return str(self.manifest["orientation"].get("axcodes", "LAS"))

    @property
    def refusal_threshold(self) -> float:
        return float(self.manifest["prompt_refusal"]["threshold"])

    @property
    def ambiguity_margin(self) -> float | None:
        """Cosine margin under which two targets are equally close to a prompt (None: unset)."""
        value = self.manifest["prompt_refusal"].get("ambiguity_margin")
        return None if value is None else float(value)

    @property
    def prompt_groups(self) -> dict[str, dict[str, list[str]]] | None:
        """Group prompts: name -> {"members", "phrasings"} (None: the manifest has none)."""
        return self.manifest.get("prompt_groups")

    def graph(self, precision: str) -> Path:
        """The image graph for a precision ("fp32", "fp16", "int8"), hash-checked (:meth:`file`).

        Raises:
            InputError: The folder has no graph of that precision (lists the available ones).
            IntegrityError: The graph's SHA-256 differs from the manifest's.
        """
        graphs = {k: v for k, v in self.manifest["graphs"].items() if v}
        available = [k for k, v in graphs.items() if (self.path / v).is_file()]
        if precision not in available:
            raise InputError(
                self.path,
                f"no {precision} image graph in this engine folder; available: "
                f"{', '.join(available) or 'none'} (export with --fp16 / --int8 to add them)",
            )
        return self.file(graphs[precision])

    @property
    def plan(self) -> Path | None:
        """The TensorRT plan (hash-checked only through :meth:`file`), or None if none was built."""
        trt = self.manifest.get("tensorrt") or {}
        name = trt.get("plan")
        if not name or not (self.path / name).is_file():
            return None
        return self.path / name


def _check_manifest(path: Path, manifest: Any) -> None:
    """Format, version and required keys of a parsed manifest."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise InputError(path, f"format {got!r}; expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise InputError(path, f"version {manifest.get('version')!r}; expected {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise InputError(path, f"missing keys {missing}")
    if not isinstance(manifest["files"], dict):
        raise InputError(path, "'files' must map file names to {sha256, bytes}")
    absent = [f for f in REQUIRED_FILES if f not in manifest["files"]]
    if absent:
        raise InputError(path, f"'files' does not list {absent}; the export is incomplete")
    problems = schema_problems(manifest)
    if problems:
        raise InputError(
            path, f"breaks the engine format (docs/engine_format.schema.json): {problems[0]}"
        )


def _check_files(folder: Path, manifest_path: Path, files: dict[str, Any]) -> None:
    """Every listed file exists with the recorded size (hashes: :meth:`EngineFolder.file`)."""
    for name, facts in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            raise InputError(p, f"missing from the engine folder (listed in {manifest_path.name})")
        want_bytes = facts.get("bytes") if isinstance(facts, dict) else None
        size = p.stat().st_size
        if want_bytes is not None and int(want_bytes) != size:
            raise IntegrityError(
                p,
                f"size {size} bytes differs from the manifest's {want_bytes}; corrupted or replaced",
            )
