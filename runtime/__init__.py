"""promptseg.runtime: torch-free inference on exported engine folders.

Imports and runs with numpy, nibabel, pydicom, onnxruntime, scipy, pillow, safetensors and
tqdm only (the package's required dependencies); TensorRT and PyTorch are imported lazily by the
engines that need them.

    >>> from promptseg.runtime import Segmenter, run
    >>> Segmenter()("image_1.nii.gz", ["liver"]).labels  # doctest: +SKIP
    >>> run(["image_1.nii.gz"], ["liver"], output="liver.nii.gz")  # doctest: +SKIP

Public names are imported on first use (``promptseg.runtime.<name>``); the modules are
``errors`` and ``writers`` (one error type, atomic writes), ``engine_base`` / ``ort_engine`` /
``trt_engine`` / ``torch_engine`` / ``engines`` (backends), ``slices`` (the one slice path),
``pipeline`` (orientation, label map), ``segmenter`` (the in-memory API) and ``api`` / ``cli``
(``promptseg-run``).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "resolve_prompts": "api",
    "run": "api",
    "BACKENDS": "engines",
    "PRECISIONS": "engines",
    "BackendError": "engines",
    "Engine": "engines",
    "OrtEngine": "engines",
    "TorchEngine": "engines",
    "TrtEngine": "engines",
    "check_inputs": "engines",
    "select_backend": "engines",
    "Image2D": "io",
    "read_input": "io",
    "DEFAULT_ENGINE_DIR": "manifest",
    "EngineFolder": "manifest",
    "TensorSpec": "manifest",
    "Reorientation": "orientation",
    "reorientation": "orientation",
    "SegmentationResult": "pipeline",
    "choose_modality": "pipeline",
    "segment": "pipeline",
    "PromptCache": "prompt_resolver",
    "PromptError": "prompt_resolver",
    "PromptResolver": "prompt_resolver",
    "ResolvedPrompt": "prompt_resolver",
    "normalise_prompt": "prompt_resolver",
    "WordPieceTokenizer": "tokenizer",
    "InputError": "errors",
    "Segmenter": "segmenter",
    "SegmenterResult": "segmenter",
    "segment_slices": "slices",
}


def __getattr__(name: str) -> Any:
    """Import the public names lazily (``from promptseg.runtime import run`` loads only what
    ``run`` needs; the readers can import :mod:`promptseg.runtime.errors` without a cycle)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'promptseg.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"promptseg.runtime.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_HOMES))


__all__ = sorted(_HOMES)
