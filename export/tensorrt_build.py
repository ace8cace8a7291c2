"""TensorRT engine (``model.plan``) from the exported ONNX graph, TensorRT 10 and 11.

The network is strongly typed: precision comes from the ONNX graph (``model.fp16.onnx`` carries
its FP16 casts), not from builder flags. TensorRT 11 is always strongly typed and ignores the
``STRONGLY_TYPED`` creation flag; TensorRT 10 needs it, and both reject the removed weak-typing
flags (``BuilderFlag.FP16``), which are therefore never set. ``tensorrt`` is imported inside the
functions so the package imports without it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from promptseg.export.files import ExportError, atomic_write_bytes


def tensorrt_available() -> bool:
    """Whether ``import tensorrt`` works here."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def gpu_name() -> str:
    """Name of CUDA device 0 (cuda-python, then torch, then nvidia-smi), or ``"unknown"``."""
    for probe in (_gpu_name_cuda_python, _gpu_name_torch, _gpu_name_smi):
        try:
            name = probe()
        except Exception:  # noqa: BLE001 - try the next probe
            name = None
        if name:
            return name
    return "unknown"


def _gpu_name_cuda_python() -> str | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    err, prop = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        return None
    name = prop.name
    return (name.split(b"\0")[0].decode() if isinstance(name, bytes) else str(name)).strip()


def _gpu_name_torch() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _gpu_name_smi() -> str | None:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return out.stdout.strip().splitlines()[0] or None


def _network_flags(trt: Any) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _attach_timing_cache(config: Any, cache_file: Path) -> tuple[Any, str]:
    """Attach the timing cache at ``cache_file`` (or a new empty one) to ``config``.

    ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch=False)`` returns False when the
    cache's verification header does not match this TensorRT version or GPU, and the cache is
    then not used; an empty one (``create_timing_cache(b"")``) is attached instead, so the file
    written back after the build is this machine's cache, not the rejected one.

    Returns:
        The attached cache and a note ("" when the cache on disk, if any, was used).
    """
    cache_bytes = cache_file.read_bytes() if cache_file.is_file() else b""
    if cache_bytes:
        try:
            timing_cache = config.create_timing_cache(cache_bytes)
        except Exception:  # noqa: BLE001 - unreadable bytes: start afresh, as on a mismatch
            timing_cache = None
        if timing_cache is not None and config.set_timing_cache(
            timing_cache, ignore_mismatch=False
        ):
            return timing_cache, ""
        note = (
            f"{cache_file.name}: TensorRT rejected the timing cache (another TensorRT version "
            "or GPU); building with an empty one, which replaces it"
        )
    else:
        note = ""
    timing_cache = config.create_timing_cache(b"")
    if timing_cache is None or not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        raise ExportError(f"{cache_file}: TensorRT could not attach an empty timing cache")
    return timing_cache, note


def build_engine(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    timing_cache_path: str | os.PathLike[str],
    *,
    resolution: int,
    film_dim: int,
    max_batch: int,
    workspace_bytes: int = 2 << 30,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build and serialize a TensorRT engine for ``image`` (N,1,R,R) and ``film`` (N,P).

    The optimisation profile covers N from 1 to ``max_batch`` (optimum ``max(1, max_batch//2)``).
    A timing cache already at ``timing_cache_path`` is reused and the updated one written back;
    one TensorRT rejects (another version or GPU) is replaced by a fresh one, with a progress
    line and ``timing_cache_note`` in the returned entry.

    Returns:
        The manifest's ``tensorrt`` entry (version, GPU, plan, profile, I/O).

    Raises:
        ExportError: parsing or building failed (parser errors are listed).
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    opt = max(1, max_batch // 2)
    profile = builder.create_optimization_profile()
    profile.set_shape(
        "image",
        (1, 1, resolution, resolution),
        (opt, 1, resolution, resolution),
        (max_batch, 1, resolution, resolution),
    )
    profile.set_shape("film", (1, film_dim), (opt, film_dim), (max_batch, film_dim))
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache_path)
    timing_cache, cache_note = _attach_timing_cache(config, cache_file)
    if progress is not None and cache_note:
        progress(cache_note)
    if progress is not None:
        progress(f"TensorRT {trt.__version__}: building engine (batch 1..{max_batch}, opt {opt})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT build_serialized_network failed (see log above)")
    atomic_write_bytes(plan_path, bytes(memoryview(serialized)))
    atomic_write_bytes(cache_file, bytes(memoryview(timing_cache.serialize())))
    info: dict[str, Any] = {
        "version": str(trt.__version__),
        "gpu": gpu_name(),
        "plan": Path(plan_path).name,
        "timing_cache": cache_file.name,
        "source": Path(onnx_path).name,
        "strongly_typed": True,
        "max_batch": max_batch,
        "profile": {"min": 1, "opt": opt, "max": max_batch},
        "io": engine_io(plan_path),
    }
    if cache_note:
        info["timing_cache_note"] = cache_note
    return info


def engine_io(plan_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Name, mode, dtype and shape of every I/O tensor of a serialized engine."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise ExportError(f"{plan_path}: TensorRT could not deserialize the engine it just built")
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        out.append(
            {
                "name": name,
                "mode": "input"
                if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                else "output",
                "dtype": str(engine.get_tensor_dtype(name)).split(".")[-1].lower(),
                "shape": [int(d) for d in engine.get_tensor_shape(name)],
            }
        )
    return out


def maybe_build_engine(
    onnx_path: Path,
    out_dir: Path,
    *,
    resolution: int,
    film_dim: int,
    max_batch: int,
    progress: Callable[[str], None],
) -> dict[str, Any] | None:
    """:func:`build_engine` into ``out_dir`` where TensorRT imports; else log a line, ``None``."""
    if not tensorrt_available():
        progress("TensorRT not importable here: no model.plan (install promptseg[trt] on a GPU)")
        return None
    return build_engine(
        onnx_path,
        out_dir / "model.plan",
        out_dir / "timing.cache",
        resolution=resolution,
        film_dim=film_dim,
        max_batch=max_batch,
        progress=progress,
    )
