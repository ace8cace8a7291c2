"""Inference engines behind one contract (ONNX Runtime, TensorRT, PyTorch).

Every engine is a context manager with ``infer(inputs: dict[str, ndarray]) -> dict[str,
ndarray]`` that checks input names, dtypes and shapes against the engine folder's manifest (the
batch dimension is dynamic) and raises ``ValueError`` saying what it expected. Heavy backends are
imported inside the classes that need them: importing this module needs numpy only.

=============  ===========================================================================
backend        engine
=============  ===========================================================================
``tensorrt``   :class:`TrtEngine` on ``model.plan`` (TensorRT 10/11 Python API)
``ort-cuda``   :class:`OrtEngine` with the CUDA execution provider
``ort-cpu``    :class:`OrtEngine` with the CPU execution provider
``torch``      :class:`TorchEngine` on the checkpoint the engine was exported from
``auto``       the first that works, in the order above (never ``torch``)
=============  ===========================================================================
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from promptseg.data.readers import InputError, PathLike
from promptseg.runtime.manifest import (
    MANIFEST,
    EngineFolder,
    IntegrityError,
    TensorSpec,
    sha256_file,
)

BACKENDS = ("auto", "tensorrt", "ort-cuda", "ort-cpu", "torch")
PRECISIONS = ("fp32", "fp16", "int8")
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class BackendError(RuntimeError):
    """A backend that cannot run here (missing package, no GPU, silent CPU fallback)."""


# --------------------------------------------------------------------------- contract


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
            ``logits`` float32 (N, 1, R, R).

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


def _open_folder(engine_dir: PathLike | EngineFolder) -> EngineFolder:
    return engine_dir if isinstance(engine_dir, EngineFolder) else EngineFolder.open(engine_dir)


# --------------------------------------------------------------------------- ONNX Runtime


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

        folder = _open_folder(engine_dir)
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
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=wanted)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(graph, f"ONNX Runtime cannot load the graph ({first})") from exc
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
        names = [s.name for s in self.outputs]
        feed = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        return dict(zip(names, self.session.run(names, feed)))

    def close(self) -> None:
        self.session = None


# --------------------------------------------------------------------------- CUDA memory


def _import_trt_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(
            f"the TensorRT backend needs '{name.split('.')[0]}': pip install 'promptseg[trt]' "
            "(tensorrt and cuda-python, or pycuda)"
        ) from exc


class _CudaPython:
    """Device buffers and a stream through cuda-python's runtime API."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            cudart = _import_trt_module("cuda.cudart")
        self.rt = cudart
        self.stream = self._call(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _call(self, result: tuple, what: str) -> Any:
        err, *rest = result
        if int(err) != 0:
            raise BackendError(f"CUDA runtime call {what} failed: {err}")
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    def alloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(nbytes), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def htod(self, ptr: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        result = self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self.stream)
        self._call(result, "cudaMemcpyAsync(H2D)")

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        result = self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self.stream)
        self._call(result, "cudaMemcpyAsync(D2H)")

    @property
    def handle(self) -> int:
        return int(self.stream)

    def synchronize(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


class _PyCuda:
    """Device buffers and a stream through pycuda, in the device's primary context.

    ``pycuda.autoprimaryctx`` (pycuda >= 2021.1) retains the primary context that TensorRT and
    the CUDA runtime also use; older pycuda only has ``pycuda.autoinit``, which creates a
    separate context of its own.
    """

    def __init__(self) -> None:
        self.cuda = importlib.import_module("pycuda.driver")
        try:
            importlib.import_module("pycuda.autoprimaryctx")
        except ImportError:
            importlib.import_module("pycuda.autoinit")
        self.stream = self.cuda.Stream()
        self._allocs: dict[int, Any] = {}

    def alloc(self, nbytes: int) -> int:
        mem = self.cuda.mem_alloc(nbytes)
        self._allocs[int(mem)] = mem
        return int(mem)

    def free(self, ptr: int) -> None:
        mem = self._allocs.pop(ptr, None)
        if mem is not None:
            mem.free()

    def htod(self, ptr: int, host: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(ptr, host, self.stream)

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        self.cuda.memcpy_dtoh_async(host, ptr, self.stream)

    @property
    def handle(self) -> int:
        return int(self.stream.handle)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.stream = None


def _cuda_runtime() -> _PyCuda | _CudaPython:
    """pycuda when importable, else cuda-python."""
    try:
        importlib.import_module("pycuda.driver")
    except ImportError:
        return _CudaPython()
    return _PyCuda()


def cuda_device_count() -> int:
    """Number of CUDA devices seen by cuda-python or pycuda (0 if neither works)."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef]
        err, count = cudart.cudaGetDeviceCount()
        return int(count) if int(err) == 0 else 0
    except Exception:  # noqa: BLE001 - any failure means no usable device
        pass
    try:
        drv = importlib.import_module("pycuda.driver")
        drv.init()
        return int(drv.Device.count())
    except Exception:  # noqa: BLE001
        return 0


# --------------------------------------------------------------------------- TensorRT


def plan_precision(manifest: dict[str, Any]) -> str:
    """Precision of ``model.plan``: that of the ONNX graph it was built from.

    The plan is strongly typed, so its precision is the source graph's (manifest
    ``tensorrt.source``: ``model.fp16.onnx`` with ``promptseg-export --fp16``, else
    ``model.onnx``), looked up in the manifest's ``graphs``.

    Raises:
        ValueError: The manifest names no source graph, or one that is not in ``graphs``.
    """
    source = (manifest.get("tensorrt") or {}).get("source")
    graphs = {str(v): str(k) for k, v in (manifest.get("graphs") or {}).items() if v}
    if not source or str(source) not in graphs:
        raise ValueError(
            f"tensorrt.source {source!r} is not one of the graphs {sorted(graphs)}; "
            "cannot tell the plan's precision"
        )
    return graphs[str(source)]


def _folder_plan_precision(folder: EngineFolder) -> str:
    """:func:`plan_precision` of a folder, as an InputError naming its manifest."""
    try:
        return plan_precision(folder.manifest)
    except ValueError as exc:
        raise InputError(folder.path / MANIFEST, str(exc)) from None


class TrtEngine(Engine):
    """The serialized TensorRT plan (``model.plan``).

    The plan is strongly typed: its precision is that of the graph it was built from
    (:func:`plan_precision`). Uses the name-based TensorRT 10/11 API:
    ``deserialize_cuda_engine``, ``create_execution_context``, ``set_input_shape``,
    ``set_tensor_address`` and ``execute_async_v3`` on a CUDA stream. Device buffers come from
    pycuda when importable, else from cuda-python. Batches larger than the plan's optimisation
    profile are split.

    Raises:
        ImportError: tensorrt (or both CUDA bindings) missing; names ``promptseg[trt]``.
        InputError: The folder has no plan, the plan's hash differs from the manifest, or the
            plan does not deserialize here.
    """

    def __init__(self, engine_dir: PathLike | EngineFolder) -> None:
        trt = _import_trt_module("tensorrt")
        folder = _open_folder(engine_dir)
        super().__init__(folder.inputs, folder.outputs)
        if folder.plan is None:
            raise InputError(
                folder.path, "no TensorRT plan (model.plan); re-export on a machine with TensorRT"
            )
        self.folder = folder
        self.precision = _folder_plan_precision(folder)
        plan = folder.file(folder.plan.name)  # SHA-256 checked before the plan is loaded
        self.trt = trt
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, capacity bytes)
        self.cuda: _PyCuda | _CudaPython | None = _cuda_runtime()
        try:
            self._load(folder, plan)
        except BaseException:
            self.close()  # release the stream (and buffers) before the error propagates
            raise

    def _load(self, folder: EngineFolder, plan: Path) -> None:
        """Deserialize the plan, create its context and check its I/O against the manifest."""
        trt = self.trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            built = folder.manifest.get("tensorrt", {})
            raise InputError(
                plan,
                f"TensorRT {trt.__version__} cannot deserialize the plan (built with TensorRT "
                f"{built.get('version', '?')} on {built.get('gpu', '?')}); rebuild it with "
                "promptseg-export on this machine",
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [
            n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        ]
        self.output_names = [n for n in names if n not in self.input_names]
        if sorted(self.input_names) != sorted(s.name for s in self.inputs):
            raise InputError(plan, f"plan inputs {self.input_names} differ from the manifest's")
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        first = self.input_names[0]
        self.max_batch = int(self.engine.get_tensor_profile_shape(first, 0)[2][0])
        self.backend = "tensorrt"
        self.providers = [f"TensorRT {trt.__version__}"]
        self.source = str(plan)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, capacity = self._buffers.get(name, (0, 0))
        if nbytes > capacity:
            if ptr:
                self.cuda.free(ptr)
            ptr = self.cuda.alloc(nbytes)
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = next(iter(inputs.values())).shape[0]
        if n <= self.max_batch:
            return self._run_chunk(inputs)  # one chunk: no concatenation copy
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, n, self.max_batch):
            chunk = {k: v[start : start + self.max_batch] for k, v in inputs.items()}
            parts.append(self._run_chunk(chunk))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _run_chunk(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hosts: dict[str, np.ndarray] = {}
        for name in self.input_names:
            host = np.ascontiguousarray(inputs[name], dtype=self.dtypes[name])
            if not self.context.set_input_shape(name, tuple(host.shape)):
                raise ValueError(f"TensorRT rejected input shape {host.shape} for {name!r}")
            ptr = self._buffer(name, host.nbytes)
            self.cuda.htod(ptr, host)
            self.context.set_tensor_address(name, ptr)
            hosts[name] = host  # keep alive until the stream is synchronised
        outputs: dict[str, np.ndarray] = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = np.empty(shape, dtype=self.dtypes[name])
            self.context.set_tensor_address(name, self._buffer(name, max(out.nbytes, 1)))
            outputs[name] = out
        if not self.context.execute_async_v3(self.cuda.handle):
            raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        for name, out in outputs.items():
            self.cuda.dtoh(out, self._buffers[name][0])
        self.cuda.synchronize()
        return {s.name: outputs[s.name].astype(s.dtype, copy=False) for s in self.outputs}

    def close(self) -> None:
        if getattr(self, "cuda", None) is None:
            return
        self.context = None
        self.engine = None
        try:
            for ptr, _ in self._buffers.values():
                self.cuda.free(ptr)
            self._buffers.clear()
        finally:
            self.cuda.close()
            self.cuda = None


# --------------------------------------------------------------------------- PyTorch


class TorchEngine(Engine):
    """The UNet of a checkpoint in PyTorch (parity checks and GPU timing).

    Args:
        checkpoint: A .pt path or ``"default"``.
        precision: "fp32", or "fp16" on CUDA (autocast).
        device: "cpu", "cuda" or None (CUDA when available).
    """

    def __init__(
        self, checkpoint: PathLike, precision: str = "fp32", device: str | None = None
    ) -> None:
        try:
            torch = importlib.import_module("torch")
        except ImportError as exc:
            raise ImportError(
                "the torch backend needs PyTorch: pip install 'promptseg[train]'"
            ) from exc
        from promptseg.checkpoint import load_checkpoint

        if precision not in ("fp32", "fp16"):
            raise ValueError(f"the torch backend runs fp32 or fp16 (CUDA), got {precision!r}")
        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision == "fp16" and self.device.type != "cuda":
            raise BackendError("the torch backend runs fp16 only on CUDA; use --precision fp32")
        try:
            loaded = load_checkpoint(checkpoint)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(
                checkpoint, f"cannot load the checkpoint for the torch backend ({first})"
            ) from exc
        self.unet = loaded.model.unet.eval().to(self.device)
        res = int(loaded.config.resolution)
        super().__init__(
            [
                TensorSpec(
                    "image", ("N", int(loaded.config.in_channels), res, res), np.dtype(np.float32)
                ),
                TensorSpec("film", ("N", int(self.unet.film_dim)), np.dtype(np.float32)),
            ],
            [
                TensorSpec("logits", ("N", 1, res, res), np.dtype(np.float32)),
                TensorSpec("presence", ("N", 1), np.dtype(np.float32)),
            ],
        )
        self.backend = "torch"
        self.precision = precision
        self.providers = [str(self.device)]
        self.source = str(loaded.path)

    @classmethod
    def from_engine(cls, folder: EngineFolder, precision: str = "fp32") -> TorchEngine:
        """The checkpoint an engine folder was exported from (path and SHA-256 in its manifest)."""
        facts = folder.manifest.get("checkpoint") or {}
        want = facts.get("sha256")
        candidates = [Path(facts["path"])] if facts.get("path") else []
        import promptseg

        candidates.append(Path(promptseg.__file__).with_name("weights") / "default.pt")
        for path in candidates:
            if path.is_file() and (not want or sha256_file(path) == want):
                engine = cls(path, precision)
                engine.folder = folder
                return engine
        raise InputError(
            folder.path / "manifest.json",
            f"the torch backend needs the checkpoint this engine was exported from "
            f"({facts.get('path', '?')}, sha256 {str(want)[:12]}...), which was not found",
        )

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        image = torch.from_numpy(np.ascontiguousarray(inputs["image"])).to(self.device)
        film = torch.from_numpy(np.ascontiguousarray(inputs["film"])).to(self.device)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.float16, enabled=self.precision == "fp16"),
        ):
            logits, presence = self.unet(image, film)
        return {
            "logits": logits.float().cpu().numpy(),
            "presence": presence.float().cpu().numpy(),
        }

    def close(self) -> None:
        self.unet = None


# --------------------------------------------------------------------------- selection


def check_backend(name: str) -> str:
    """Return ``name`` if it is a known backend, else raise a one-line ValueError."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    return name


def _default_precision(folder: EngineFolder, gpu: bool) -> str:
    fp16 = folder.manifest["graphs"].get("fp16")
    return "fp16" if gpu and fp16 and (folder.path / fp16).is_file() else "fp32"


def _tensorrt_ready(folder: EngineFolder) -> str | None:
    """None when TensorRT can run this folder, else why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    if folder.plan is None:
        return "the engine folder has no model.plan"
    if cuda_device_count() < 1:
        return "no CUDA device (or no CUDA Python bindings)"
    return None


def _trt_precision_mismatch(folder: EngineFolder, precision: str | None) -> str | None:
    """None when the plan runs ``precision`` (None: any), else why the tensorrt backend cannot."""
    if precision is None or folder.plan is None:
        return None
    try:
        built = plan_precision(folder.manifest)
    except ValueError as exc:
        return str(exc)
    if built == precision:
        return None
    return (
        f"the TensorRT plan is {built} (built from {folder.manifest['tensorrt']['source']}) "
        f"and --precision {precision} was asked"
    )


def select_backend(
    name: str,
    engine_dir: PathLike | EngineFolder,
    precision: str | None = None,
    *,
    threads: int | None = None,
) -> Engine:
    """Open the engine for a backend name.

    ``auto`` tries TensorRT (tensorrt imports, a CUDA device exists, the folder has
    ``model.plan``, and the precision is unset or the plan's, :func:`plan_precision`), then ONNX Runtime CUDA (provider
    available), then ONNX Runtime CPU; ``engine.notes`` say why earlier choices were skipped.
    Unset precision means fp16 on a GPU (when the folder has the graph) and fp32 on CPU.

    Raises:
        ValueError: Unknown backend or precision (one line listing the valid names).
        BackendError / ImportError / InputError: The named backend cannot run.
    """
    check_backend(name)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    folder = _open_folder(engine_dir)
    if name == "tensorrt":
        why = _trt_precision_mismatch(folder, precision)
        if why is not None:
            raise BackendError(why)
        return TrtEngine(folder)
    if name == "ort-cuda":
        return OrtEngine(
            folder, precision or _default_precision(folder, True), ("cuda",), threads=threads
        )
    if name == "ort-cpu":
        return OrtEngine(folder, precision or "fp32", ("cpu",), threads=threads)
    if name == "torch":
        return TorchEngine.from_engine(folder, precision or "fp32")
    why = _tensorrt_ready(folder) or _trt_precision_mismatch(folder, precision)
    if why is None:
        try:
            return TrtEngine(folder)
        except IntegrityError:
            raise  # a corrupted engine folder is bad input, not a reason to fall back
        except Exception as exc:  # noqa: BLE001 - auto falls back to ONNX Runtime
            why = (
                f"TensorRT failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            )
    notes = [f"tensorrt skipped: {why}"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        engine = OrtEngine(
            folder,
            precision or _default_precision(folder, True),
            ("cuda",),
            strict=False,
            threads=threads,
        )
        if engine.backend == "ort-cuda":
            engine.notes[:0] = notes
            return engine
        notes.extend(engine.notes)
        engine.close()
    else:
        notes.append("ort-cuda skipped: CUDAExecutionProvider is not available")
    engine = OrtEngine(folder, precision or "fp32", ("cpu",), threads=threads)
    engine.notes[:0] = notes
    return engine
