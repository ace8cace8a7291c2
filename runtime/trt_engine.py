"""The TensorRT engine (``model.plan``) and its CUDA memory helpers (pycuda or cuda-python)."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from promptseg.runtime.engine_base import BackendError, Engine, open_folder
from promptseg.runtime.errors import InputError, PathLike
from promptseg.runtime.manifest import MANIFEST, EngineFolder


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
        folder = open_folder(engine_dir)
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
