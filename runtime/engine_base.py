"""The engine contract shared by every backend (numpy only).

Every engine is a context manager with ``infer(inputs: dict[str, ndarray]) -> dict[str,
ndarray]`` that checks input names, dtypes and shapes against its :class:`TensorSpec` list
(the batch dimension is dynamic) and raises ``ValueError`` saying what it expected. Outputs are
``logits`` float32 (N, 1, R, R) and, for models with a presence head, ``presence`` float32
(N, 1) (:data:`PRESENCE_OUTPUT`; engines of older exports have only ``logits``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from promptseg.runtime.errors import PathLike
from promptseg.runtime.manifest import EngineFolder, TensorSpec

BACKENDS = ("auto", "tensorrt", "ort-cuda", "ort-cpu", "torch")
PRECISIONS = ("fp32", "fp16", "int8")
MASK_OUTPUT = "logits"
PRESENCE_OUTPUT = "presence"


class BackendError(RuntimeError):
    """A backend that cannot run here (missing package, no GPU, silent CPU fallback)."""


def check_inputs(specs: Sequence[TensorSpec], inputs: dict[str, np.ndarray]) -> int:
    """Check names, dtypes and shapes of ``inputs`` against ``specs``.

    String dimensions (e.g. ``"N"``) are dynamic but must agree across inputs.

    Returns:
        The size of the first dynamic dimension (the batch), or 1 if none.

    Raises:
        ValueError: Saying what was received and what was expected.
    """
    expected = "; ".join(s.describe() for s in specs)
    names = {s.name for s in specs}
    if not isinstance(inputs, dict):
        raise ValueError(
            f"inputs must be a dict of arrays, got {type(inputs).__name__}; expected {expected}"
        )
    missing = sorted(names - set(inputs))
    extra = sorted(set(inputs) - names)
    if missing or extra:
        raise ValueError(
            f"got inputs {sorted(inputs)} (missing {missing}, unexpected {extra}); expected {expected}"
        )
    symbols: dict[str, int] = {}
    for spec in specs:
        arr = inputs[spec.name]
        if not isinstance(arr, np.ndarray):
            raise ValueError(
                f"input {spec.name!r} is a {type(arr).__name__}; expected a numpy array ({spec.describe()})"
            )
        if arr.dtype != spec.dtype:
            raise ValueError(
                f"input {spec.name!r} has dtype {arr.dtype}; expected {spec.dtype.name} ({spec.describe()})"
            )
        if arr.ndim != len(spec.shape):
            raise ValueError(
                f"input {spec.name!r} has shape {tuple(arr.shape)}; expected {len(spec.shape)} "
                f"dimensions ({spec.describe()})"
            )
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(want, str):
                if got < 1:
                    raise ValueError(
                        f"input {spec.name!r} has an empty dimension {axis}: {tuple(arr.shape)}"
                    )
                if symbols.setdefault(want, got) != got:
                    raise ValueError(
                        f"input {spec.name!r} has {want}={got} (dimension {axis}) but another input has "
                        f"{want}={symbols[want]}; expected {expected}"
                    )
            elif got != want:
                raise ValueError(
                    f"input {spec.name!r} has shape {tuple(arr.shape)}; expected {spec.describe()}"
                )
    return next(iter(symbols.values()), 1)


class Engine:
    """Base of every engine: the I/O contract, context management and a description."""

    backend: str = "none"
    precision: str = "fp32"

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.providers: list[str] = []
        self.notes: list[str] = []
        self.source = ""
        self.folder: EngineFolder | None = None  # the engine folder it was opened from

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release backend resources (idempotent)."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the image graph.

        Args:
            inputs: ``image`` float32 (N, 1, R, R) and ``film`` float32 (N, P).

        Returns:
            ``logits`` float32 (N, 1, R, R), and ``presence`` float32 (N, 1) when the
            model has a presence head.

        Raises:
            ValueError: Wrong input names, dtypes or shapes.
        """
        check_inputs(self.inputs, inputs)
        return self._run(inputs)

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Backend, precision, providers, source file and selection notes."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "providers": list(self.providers),
            "source": self.source,
            "notes": list(self.notes),
        }


def has_presence(engine: Engine) -> bool:
    """Whether the engine returns a ``presence`` output (N, 1)."""
    return any(s.name == PRESENCE_OUTPUT for s in engine.outputs)


def open_folder(engine_dir: PathLike | EngineFolder) -> EngineFolder:
    """An opened :class:`EngineFolder` (``engine_dir`` itself when it already is one)."""
    return engine_dir if isinstance(engine_dir, EngineFolder) else EngineFolder.open(engine_dir)
