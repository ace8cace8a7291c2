"""ONNX Runtime engines and the one ONNX Runtime session builder of the project."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.runtime.engine_base import PRECISIONS, BackendError, Engine, open_folder
from promptseg.runtime.errors import InputError, PathLike, first_line
from promptseg.runtime.manifest import EngineFolder, TensorSpec

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def env_threads() -> int | None:
    """``OMP_NUM_THREADS`` as an intra-op thread count (None when unset or 0)."""
    return int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None


def ort_session(
    model: PathLike | bytes,
    *,
    threads: int | None = None,
    providers: Sequence[str | tuple[str, dict]] = ("CPUExecutionProvider",),
    optimize: bool = True,
    what: PathLike | None = None,
) -> Any:
    """An ONNX Runtime ``InferenceSession`` with the project's settings.

    Args:
        model: Graph file or serialized ``ModelProto`` bytes.
        threads: Intra-op threads (None: ONNX Runtime's default); sets one inter-op thread.
        providers: Execution providers in priority order.
        optimize: False disables graph optimisations (the FP16 range audit reads raw nodes).
        what: Name the graph in a one-line :class:`InputError` when it cannot be loaded
            (None: ONNX Runtime's own exception propagates).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=list(providers))
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        if what is None:
            raise
        raise InputError(what, f"ONNX Runtime cannot load the graph ({first_line(exc)})") from exc


def _provider_name(provider: str | tuple[str, dict]) -> str:
    name = provider[0] if isinstance(provider, tuple) else provider
    return PROVIDER_ALIASES.get(name.lower(), name) if isinstance(name, str) else str(name)


def _trt_ep_cache(folder: EngineFolder) -> str:
    """Per-engine cache folder for the ONNX Runtime TensorRT execution provider."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = root / "promptseg" / "ort-trt" / folder.manifest_sha256[:16]
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


class OrtEngine(Engine):
    """The image graph in ONNX Runtime.

    Args:
        engine_dir: Engine folder (path or opened :class:`EngineFolder`).
        precision: Which graph: "fp32" (model.onnx), "fp16" or "int8".
        providers: Execution providers in priority order: "cpu", "cuda", "tensorrt" (or
            ONNX Runtime names, or (name, options) tuples). CPU is always appended last.
        strict: Fail when a requested GPU provider is unavailable or ONNX Runtime silently
            fell back to another one (``backend=auto`` passes False and records the fallback).
        threads: Intra-op threads (None: ONNX Runtime's default).

    Raises:
        InputError: Missing graph or I/O that differs from the manifest.
        BackendError: A requested GPU provider is unavailable or was not used (strict).
    """

    def __init__(
        self,
        engine_dir: PathLike | EngineFolder,
        precision: str = "fp32",
        providers: Sequence[str | tuple[str, dict]] = ("cpu",),
        *,
        strict: bool = True,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        folder = open_folder(engine_dir)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        super().__init__(folder.inputs, folder.outputs)
        graph = folder.graph(precision)
        requested = [_provider_name(p) for p in providers] or ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        wanted: list[str | tuple[str, dict]] = []
        for provider, name in zip(providers, requested):
            if name not in available:
                msg = (
                    f"ONNX Runtime provider {name} is not available (available: "
                    f"{', '.join(available)}); install 'promptseg[gpu]' (onnxruntime-gpu) with "
                    "a matching CUDA"
                )
                if strict:
                    raise BackendError(msg)
                self.notes.append(msg)
                continue
            if name == "TensorrtExecutionProvider" and not isinstance(provider, tuple):
                provider = (
                    name,
                    {
                        "trt_fp16_enable": precision == "fp16",
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": _trt_ep_cache(folder),
                    },
                )
            elif not isinstance(provider, tuple):
                provider = name
            wanted.append(provider)
        if "CPUExecutionProvider" not in [_provider_name(p) for p in wanted]:
            wanted.append("CPUExecutionProvider")
        self.session = ort_session(graph, threads=threads, providers=wanted, what=graph)
        self.providers = list(self.session.get_providers())
        gpu_wanted = [n for n in requested if n in _GPU_PROVIDERS]
        if gpu_wanted and gpu_wanted[0] not in self.providers:
            msg = (
                f"{gpu_wanted[0]} was requested but ONNX Runtime runs on {self.providers} "
                "(silent fallback; check the CUDA/cuDNN installation)"
            )
            if strict:
                self.session = None
                raise BackendError(msg)
            self.notes.append(msg)
        self._check_graph_io(graph)
        if "TensorrtExecutionProvider" in self.providers[:1]:
            self.backend = "ort-tensorrt"
        elif "CUDAExecutionProvider" in self.providers[:1]:
            self.backend = "ort-cuda"
        else:
            self.backend = "ort-cpu"
        self.precision = precision
        self.source = str(graph)
        self.folder = folder

    def _check_graph_io(self, graph: Path) -> None:
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        want_in = [s.name for s in self.inputs]
        want_out = [s.name for s in self.outputs]
        if sorted(got_in) != sorted(want_in) or not set(want_out) <= set(got_out):
            raise InputError(
                graph,
                f"graph I/O {got_in} -> {got_out} differs from the manifest's {want_in} -> {want_out}",
            )

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _run_session(self.session, [s.name for s in self.outputs], inputs)

    def close(self) -> None:
        self.session = None


def _run_session(
    session: Any, names: list[str], inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    feed = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
    return dict(zip(names, session.run(names, feed)))


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class SessionEngine(Engine):
    """An open ONNX Runtime session behind the engine contract (graphs outside an engine folder,
    e.g. during export); tensor specs come from the session's own inputs and outputs."""

    def __init__(self, session: Any, source: str = "") -> None:
        def specs(args: Any) -> list[TensorSpec]:
            return [
                TensorSpec(
                    a.name,
                    tuple(d if isinstance(d, int) else str(d or "N") for d in a.shape),
                    np.dtype(_ORT_DTYPES.get(a.type, np.float32)),
                )
                for a in args
            ]

        super().__init__(specs(session.get_inputs()), specs(session.get_outputs()))
        self.session = session
        self.providers = list(session.get_providers())
        self.backend = "ort-session"
        self.source = source

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _run_session(self.session, [s.name for s in self.outputs], inputs)

    def close(self) -> None:
        self.session = None
