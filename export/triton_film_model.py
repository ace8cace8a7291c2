"""Triton Python-backend model ``promptseg_film``: prompt text -> packed FiLM vector.

This file is copied into an exported Triton model repository as ``promptseg_film/1/model.py``
(:mod:`promptseg.export.triton_repo`), followed by promptseg's ``normalise_prompt``. It needs
numpy only (the safetensors prompt cache is parsed here), so it runs in any Triton Python
backend. Input ``prompt`` BYTES [-1, 1], output ``film`` FP32 [-1, P]; a prompt that is not in
the cache (exactly or after normalisation) gets an error response naming the known targets.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

CACHE_FILE = "prompt_cache.safetensors"
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a safetensors file (8-byte header size, JSON header, data)."""
    raw = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + size
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        arr = np.frombuffer(raw[base + start : base + end], dtype=dtype)
        tensors[name] = arr.reshape(info["shape"]).astype(np.float32)
    return tensors, meta


class PromptTable:
    """Cached prompts -> FiLM rows, matched exactly, then after ``normalise_prompt``."""

    def __init__(self, path: Path) -> None:
        tensors, meta = read_safetensors(path)
        self.film = tensors["film"]
        prompts = [str(p) for p in json.loads(meta["prompts"])]
        self.targets = sorted(set(json.loads(meta["targets"])))
        self.exact = {p: i for i, p in reversed(list(enumerate(prompts)))}
        self.normalised: dict[str, int] = {}
        for i, p in enumerate(prompts):
            self.normalised.setdefault(normalise_prompt(p), i)  # noqa: F821 - appended below

    def lookup(self, prompt: str) -> np.ndarray:
        """The FiLM row (P,) of a cached prompt; ValueError for any other prompt."""
        if not prompt.strip():
            raise ValueError(
                f"--prompt: empty prompt {prompt!r}; expected text naming a target "
                f"(known targets: {', '.join(self.targets)})"
            )
        i = self.exact.get(prompt)
        if i is None:
            i = self.normalised.get(normalise_prompt(prompt))  # noqa: F821
        if i is None:
            raise ValueError(
                f"--prompt: {prompt!r} is not in the prompt cache (this model has no text "
                f"encoder; use promptseg serve for free-form prompts); known targets: "
                f"{', '.join(self.targets)}"
            )
        return self.film[i]


class TritonPythonModel:
    """The Triton Python-backend entry points."""

    def initialize(self, args: dict[str, Any]) -> None:
        here = Path(args["model_repository"]) / args["model_version"]
        self.table = PromptTable(here / CACHE_FILE)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            prompts = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy()
            try:
                rows = [
                    self.table.lookup(p.decode("utf-8") if isinstance(p, bytes) else str(p))
                    for p in prompts.reshape(-1)
                ]
            except (ValueError, UnicodeDecodeError) as exc:
                error = pb_utils.TritonError(str(exc))
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            film = np.stack(rows).astype(np.float32).reshape(prompts.shape[0], -1)
            out = pb_utils.Tensor("film", film)
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self) -> None:
        self.table = None
