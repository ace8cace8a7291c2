"""The engine folder contract in one place (torch-free): names, versions and the JSON Schema.

``promptseg-export`` writes folders that :func:`validate_manifest` accepts, the Python runtime
and the C++ host (``cpp/``) read them, and ``docs/engine_format.schema.json`` is
:func:`manifest_schema` written out (``python -m promptseg.runtime.engine_format
docs/engine_format.schema.json``; a test checks that the file is current). Prose:
``docs/engine_format.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FORMAT = "promptseg-engine"
VERSION = 1
MANIFEST = "manifest.json"
PROMPT_CACHE = "prompt_cache.safetensors"
CACHE_FORMAT = "promptseg-prompt-cache"
CACHE_VERSION = "1"
IMAGE_GRAPHS = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
TEXT_ENCODER = "text_encoder.onnx"
VOCAB = "vocab.txt"
FILM_GENERATOR = "film_generator.onnx"
REQUIRED_FILES = (IMAGE_GRAPHS["fp32"], PROMPT_CACHE, TEXT_ENCODER, VOCAB, FILM_GENERATOR)
INPUT_NAMES = ("image", "film")
OUTPUT_NAMES = ("logits",)
OPTIONAL_OUTPUT_NAMES = ("presence",)  # [N, 1] presence logits, image graphs of newer exports
FILM_SEGMENTS = ("film_gamma", "film_beta", "cbn_gamma", "cbn_beta", "dec_gamma", "dec_beta")
REQUIRED_KEYS = (
    "format",
    "version",
    "resolution",
    "inputs",
    "outputs",
    "film_dim",
    "embed_dim",
    "preprocessing",
    "orientation",
    "targets",
    "text_encoder",
    "prompt_refusal",
    "graphs",
    "files",
)
SCHEMA_ID = "https://promptseg.invalid/engine_format.schema.json"

_POSITIVE = {"type": "integer", "minimum": 1}
_STRINGS = {"type": "array", "items": {"type": "string"}}


def _tensor(name: str, rank: int) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name", "shape", "dtype"],
        "properties": {
            "name": {"const": name},
            "shape": {
                "type": "array",
                "minItems": rank,
                "maxItems": rank,
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
            },
            "dtype": {"enum": ["float32", "float16", "int64", "int32"]},
        },
    }


def manifest_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of ``manifest.json``."""
    file_name = {"type": "string", "minLength": 1, "pattern": r"^(?!/)(?!.*(^|/)\.\.(/|$)).+$"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "promptseg engine folder manifest",
        "type": "object",
        "required": list(REQUIRED_KEYS),
        "properties": {
            "format": {"const": FORMAT},
            "version": {"const": VERSION},
            "created": {"type": "string"},
            "resolution": _POSITIVE,
            "inputs": {
                "type": "array",
                "prefixItems": [_tensor("image", 4), _tensor("film", 2)],
                "minItems": 2,
                "maxItems": 2,
            },
            "outputs": {
                "type": "array",
                "prefixItems": [_tensor("logits", 4), _tensor("presence", 2)],
                "minItems": 1,
                "maxItems": 2,
            },
            "film_dim": _POSITIVE,
            "embed_dim": _POSITIVE,
            "film_layout": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "offset", "size"],
                    "properties": {
                        "name": {"type": "string"},
                        "offset": {"type": "integer", "minimum": 0},
                        "size": _POSITIVE,
                    },
                },
            },
            "preprocessing": {
                "type": "object",
                "required": ["ct_window", "mr_percentiles"],
                "properties": {
                    "resolution": _POSITIVE,
                    "ct_window": {
                        "type": "array",
                        "items": {"type": "number"},
                        "minItems": 2,
                        "maxItems": 2,
                    },  # fmt: skip
                    "mr_percentiles": {
                        "type": "array",
                        "items": {"type": "number"},
                        "minItems": 2,
                        "maxItems": 2,
                    },  # fmt: skip
                    "orientation": {"type": "string", "pattern": "^[LRAPSI]{3}$"},
                },
            },
            "orientation": {
                "type": "object",
                "required": ["axcodes"],
                "properties": {"axcodes": {"type": "string", "pattern": "^[LRAPSI]{3}$"}},
            },
            "targets": {**_STRINGS, "minItems": 1},
            "text_encoder": {
                "type": "object",
                "properties": {
                    "onnx": file_name,
                    "vocab": file_name,
                    "max_tokens": _POSITIVE,
                    "lowercase": {"type": "boolean"},
                },
            },
            "prompt_refusal": {
                "type": "object",
                "required": ["threshold"],
                "properties": {
                    "threshold": {"type": "number"},
                    "ambiguity_margin": {"type": "number", "minimum": 0},
                },
            },
            "prompt_groups": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["members", "phrasings"],
                    "properties": {"members": {**_STRINGS, "minItems": 2}, "phrasings": _STRINGS},
                },
            },
            "presence_thresholds": {
                "type": "object",
                "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "graphs": {
                "type": "object",
                "required": ["fp32"],
                "additionalProperties": {"anyOf": [file_name, {"type": "null"}]},
            },
            "tensorrt": {
                "anyOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["plan"],
                        "properties": {"plan": file_name, "max_batch": _POSITIVE},
                    },
                ]
            },
            "files": {
                "type": "object",
                "required": list(REQUIRED_FILES),
                "propertyNames": file_name,
                "additionalProperties": {
                    "type": "object",
                    "required": ["sha256"],
                    "properties": {
                        "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                        "bytes": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
    }


def schema_problems(manifest: Any) -> list[str]:
    """One line per way the manifest breaks the schema (empty: valid), shallowest first."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    errors = sorted(validator.iter_errors(manifest), key=lambda e: (len(e.path), list(e.path)))
    out = []
    for error in errors:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        out.append(f"field '{where}': {' '.join(error.message.split())[:200]}")
    return out


def write_schema(path: str | Path) -> Path:
    """Write :func:`manifest_schema` as indented JSON."""
    target = Path(path)
    target.write_text(json.dumps(manifest_schema(), indent=2) + "\n", encoding="utf-8")
    return target


if __name__ == "__main__":
    print(
        f"wrote {write_schema(sys.argv[1] if len(sys.argv) > 1 else 'engine_format.schema.json')}"
    )
