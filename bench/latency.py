"""Latency and throughput of every backend present, on one engine folder (stand-alone script).

Backends: PyTorch eager (CPU; CUDA when available), ONNX Runtime CPU (FP32, and the INT8 Q/DQ
graph when the folder has one), ONNX Runtime CUDA, TensorRT (the runtime's ``TrtEngine`` on
``model.plan``, built from the FP16 or FP32 graph; TensorRT INT8 is not benchmarked: no export
builds an INT8 plan, and the report's ``tensorrt-int8`` row says so). Per backend:

* ``infer_b1``: one slice through ``engine.infer`` (host arrays in and out, so GPU backends
  include their copies), after ``--warmup`` untimed calls, ``--iters`` timed calls.
* ``compute_b1`` (GPU only): device time of the network alone, inputs already on the device
  (TensorRT ``execute_async_v3`` + stream sync, ORT CUDA I/O binding, torch CUDA events).
* ``e2e_b1``: one raw slice of the example volume end to end: normalisation + resize to R +
  inference + logits resized to the input grid + sigmoid + threshold.
* ``infer_batch`` / ``compute_batch``: the same at ``--batch`` slices; throughput in slices/s.
  Above a TensorRT plan's ``max_batch`` both cover every chunk the batch is split into
  (``compute_batch_chunks`` lists them).
* whole volume: ``promptseg.runtime.run`` (promptseg-run's Python API) from reading the example
  volume to the written mask, for ort-cpu and each GPU backend.

Medians, p95 and p99 are in milliseconds. ``--json FILE`` records machine facts (CPU model,
cores, GPU, library versions, thread settings) and the manifest's SHA-256. The ONNX Runtime CPU
/ PyTorch eager median ratio (batch 1, same run) is printed. ``--check`` exits 1 when a GPU
backend's batch-1 p95 is >= 50 ms, and says "no GPU present: GPU latency gate not checked"
(exit 0) without a GPU. ``--preset paper --resolution 256`` exports a randomly initialised
paper-preset UNet on the fly (FP16, and a TensorRT plan, where a GPU exists) to measure the GPU
goals: batch-1 p95 < 2 ms and >= 3000 slices/s batched.

Usage::

    python bench/latency.py [--engine DIR] [--checkpoint CKPT] [--iters 200] [--warmup 20]
        [--batch 16] [--threads N] [--volume PATH] [--json FILE] [--check]
    python bench/latency.py --preset paper --resolution 256 --check --json paper.json
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from argparse import Namespace
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.runtime.errors import first_line

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VOLUME = REPO / "promptseg" / "examples" / "chaos_mr_1.nii.gz"
PROG = "bench/latency.py"
GATE_P95_MS = 50.0
GOAL_P95_MS = 2.0
GOAL_SLICES_PER_S = 3000.0
NO_GPU_LINE = "no GPU present: GPU latency gate not checked"
TRT_INT8_REASON = (
    "not benchmarked: the export builds model.plan from model.fp16.onnx (or model.onnx) only; "
    "TensorRT INT8 would need a plan built from model.int8.onnx"
)

__all__ = ["GATE_P95_MS", "NO_GPU_LINE", "main", "run_benchmark", "stats_ms"]


# --------------------------------------------------------------------------- helpers


def stats_ms(seconds: Sequence[float]) -> dict[str, float | int]:
    """Median, p95, p99, mean, min and max of durations given in seconds, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timings to summarise")
    return {
        "n": int(ms.size),
        "median_ms": float(np.median(ms)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }


def _time(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 - absent or broken: not installed here
        return None


def _torch() -> Any | None:
    try:
        import torch
    except ImportError:
        return None
    return torch


def gpu_facts() -> dict[str, Any]:
    """Whether a CUDA GPU is usable here, and its name."""
    from promptseg.runtime.engines import cuda_device_count

    torch = _torch()
    name = None
    count = 0
    if torch is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0)
    if not count:
        count = cuda_device_count()
        if count:
            from promptseg.export.tensorrt_build import gpu_name

            name = gpu_name()
    return {"present": count > 0, "count": count, "name": name}


def machine_facts(threads: int) -> dict[str, Any]:
    """CPU, cores, GPU, library versions and thread settings of this run."""
    import onnxruntime as ort

    torch = _torch()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpu_facts(),
        "onnxruntime_providers": ort.get_available_providers(),
        "versions": {
            m: _version(m)
            for m in ("promptseg", "numpy", "onnxruntime", "onnx", "torch", "tensorrt")
        },
        "threads": {
            "requested": threads,
            "torch_intra_op": torch.get_num_threads() if torch is not None else None,
            "onnxruntime_intra_op": threads,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        },
    }


# --------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """One engine to time, with an optional device-only compute timer factory."""

    name: str
    device: str
    precision: str
    engine: Any = None
    status: str = "ok"
    reason: str = ""
    # (image, film) -> zero-argument callable that runs the network on device-resident inputs
    compute: Callable[[np.ndarray, np.ndarray], Callable[[], float]] | None = None
    notes: list[str] = field(default_factory=list)


def chunk_sizes(batch: int, max_batch: int) -> list[int]:
    """The chunks ``TrtEngine.infer`` splits a batch into (the plan's profile ends at max_batch)."""
    if batch < 1 or max_batch < 1:
        raise ValueError(f"need batch >= 1 and max_batch >= 1, got {batch} and {max_batch}")
    return [min(max_batch, batch - start) for start in range(0, batch, max_batch)]


def _trt_compute(engine: Any) -> Callable[[np.ndarray, np.ndarray], Callable[[], float]]:
    """TensorRT: after one ``infer`` of the whole batch, re-run ``execute_async_v3`` + sync.

    A batch above the plan's ``max_batch`` runs as ``infer`` runs it: chunk by chunk, each
    enqueued and synchronised. The time is the sum over all chunks, so ``compute_batch`` is the
    device time of the whole batch; setting a chunk's input shape (host work, done while the
    device is idle) is not timed. The device buffers ``infer`` left bound were sized for the
    first, largest chunk, so they serve every chunk.
    """

    def make(image: np.ndarray, film: np.ndarray) -> Callable[[], float]:
        engine.infer({"image": image, "film": film})  # binds device addresses
        sizes = chunk_sizes(len(image), int(engine.max_batch))
        rows = {"image": tuple(image.shape[1:]), "film": tuple(film.shape[1:])}
        ctx = engine.context
        bound = [sizes[-1]]  # infer left its last chunk's shape set

        def run() -> float:
            total = 0.0
            for n in sizes:
                if n != bound[0]:
                    for name in engine.input_names:
                        if not ctx.set_input_shape(name, (n, *rows[name])):
                            raise RuntimeError(f"TensorRT rejected batch {n} for {name!r}")
                    bound[0] = n
                t = time.perf_counter()
                if not ctx.execute_async_v3(engine.cuda.handle):
                    raise RuntimeError("TensorRT execute_async_v3 failed")
                engine.cuda.synchronize()
                total += time.perf_counter() - t
            return total

        run.chunks = sizes  # type: ignore[attr-defined]
        return run

    return make


def _ort_cuda_compute(engine: Any) -> Callable[[np.ndarray, np.ndarray], Callable[[], float]]:
    """ONNX Runtime CUDA: inputs and output bound on the device (I/O binding)."""
    import onnxruntime as ort

    def make(image: np.ndarray, film: np.ndarray) -> Callable[[], float]:
        sess = engine.session
        binding = sess.io_binding()
        values = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0)
            for a in (image, film)
        ]
        binding.bind_ortvalue_input("image", values[0])
        binding.bind_ortvalue_input("film", values[1])
        binding.bind_output("logits", "cuda", 0)

        def run() -> float:
            t = time.perf_counter()
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return time.perf_counter() - t

        return run

    return make


def _torch_cuda_compute(engine: Any) -> Callable[[np.ndarray, np.ndarray], Callable[[], float]]:
    """PyTorch CUDA: device tensors, CUDA events around the forward pass."""
    torch = engine.torch

    def make(image: np.ndarray, film: np.ndarray) -> Callable[[], float]:
        x = torch.from_numpy(np.ascontiguousarray(image)).to(engine.device)
        f = torch.from_numpy(np.ascontiguousarray(film)).to(engine.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run() -> float:
            with (
                torch.inference_mode(),
                torch.autocast("cuda", dtype=torch.float16, enabled=engine.precision == "fp16"),
            ):
                start.record()
                engine.unet(x, f)
                end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return run

    return make


def _try(backends: list[Backend], name: str, device: str, precision: str,
         open_engine: Callable[[], Any], compute: Callable[[Any], Any] | None = None) -> None:  # fmt: skip
    """Open an engine; record a skipped backend with the reason when it cannot run here."""
    try:
        engine = open_engine()
    except Exception as exc:  # noqa: BLE001 - any failure: this backend is not available here
        backends.append(Backend(name, device, precision, status="skipped", reason=first_line(exc)))
        return
    backends.append(
        Backend(
            name,
            device,
            precision,
            engine,
            compute=compute(engine) if compute else None,
            notes=list(getattr(engine, "notes", [])),
        )  # fmt: skip
    )


def open_backends(folder: Any, checkpoint: Path | None, why_no_ckpt: str, threads: int,
                  gpu: bool) -> list[Backend]:  # fmt: skip
    """Every backend of the folder that can run here (the rest listed as skipped, with why)."""
    import onnxruntime as ort

    from promptseg.runtime.engines import OrtEngine, TorchEngine, TrtEngine, plan_precision

    backends: list[Backend] = []
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
    if checkpoint is None:
        backends.append(Backend("torch-cpu", "cpu", "fp32", status="skipped", reason=why_no_ckpt))
    else:
        _try(backends, "torch-cpu", "cpu", "fp32", lambda: TorchEngine(checkpoint, "fp32", "cpu"))
        if gpu and torch is not None and torch.cuda.is_available():
            _try(backends, "torch-cuda", "cuda", "fp32",
                 lambda: TorchEngine(checkpoint, "fp32", "cuda"), _torch_cuda_compute)  # fmt: skip
    _try(backends, "ort-cpu", "cpu", "fp32",
         lambda: OrtEngine(folder, "fp32", ("cpu",), threads=threads))  # fmt: skip
    graphs = folder.manifest.get("graphs") or {}
    if graphs.get("int8") and (folder.path / graphs["int8"]).is_file():
        _try(backends, "ort-cpu-int8", "cpu", "int8",
             lambda: OrtEngine(folder, "int8", ("cpu",), threads=threads))  # fmt: skip
    fp16 = bool(graphs.get("fp16")) and (folder.path / str(graphs.get("fp16"))).is_file()
    if "CUDAExecutionProvider" in ort.get_available_providers() and gpu:
        precision = "fp16" if fp16 else "fp32"
        _try(backends, f"ort-cuda-{precision}", "cuda", precision,
             lambda: OrtEngine(folder, precision, ("cuda",), threads=threads),
             _ort_cuda_compute)  # fmt: skip
    else:
        backends.append(Backend("ort-cuda", "cuda", "fp16", status="skipped",
                                reason="no GPU or no CUDAExecutionProvider"))  # fmt: skip
    if not gpu:
        backends.append(Backend("tensorrt-fp16", "cuda", "fp16", status="skipped",
                                reason="no GPU present"))  # fmt: skip
    elif folder.plan is None:
        backends.append(Backend("tensorrt-fp16", "cuda", "fp16", status="skipped",
                                reason="the engine folder has no model.plan"))  # fmt: skip
    else:
        try:
            plan = plan_precision(folder.manifest)  # the plan is as precise as its source graph
        except ValueError as exc:
            backends.append(Backend("tensorrt", "cuda", "unknown", status="error", reason=str(exc)))
        else:
            _try(backends, f"tensorrt-{plan}", "cuda", plan, lambda: TrtEngine(folder),
                 _trt_compute)  # fmt: skip
    backends.append(Backend("tensorrt-int8", "cuda", "int8", status="skipped",
                            reason=TRT_INT8_REASON))  # fmt: skip
    return backends


# --------------------------------------------------------------------------- measurement


def _example_slice(volume: Path | None, resolution: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, str, tuple[float, float]]:  # fmt: skip
    """A raw (H, W) slice and its normalisation window, from the example volume if any.

    The window follows the modality promptseg-run would pick (``choose_modality``).
    """
    from promptseg.preprocess import Preprocessing, intensity_bounds

    if volume is not None and volume.is_file():
        from promptseg.data.readers import read_volume
        from promptseg.runtime.pipeline import choose_modality

        vol = read_volume(volume)
        data = np.asarray(vol.data, dtype=np.float32)
        mod = choose_modality(vol)
        bounds = intensity_bounds(data, mod, Preprocessing(resolution=resolution))
        return np.ascontiguousarray(data[:, :, data.shape[2] // 2]), str(volume), bounds
    raw = rng.uniform(0, 1000, size=(256, 256)).astype(np.float32)
    return raw, "synthetic 256x256 (no example volume)", (0.0, 1000.0)


def measure_backend(backend: Backend, *, resolution: int, film: np.ndarray, raw: np.ndarray,
                    bounds: tuple[float, float], iters: int, warmup: int,
                    batch: int, batch_iters: int) -> dict[str, Any]:  # fmt: skip
    """All per-backend numbers (see the module docstring)."""
    from dataclasses import replace

    from promptseg.preprocess import Preprocessing
    from promptseg.runtime.slices import segment_slices

    row: dict[str, Any] = {
        "name": backend.name,
        "device": backend.device,
        "precision": backend.precision,
        "status": backend.status,
        "reason": backend.reason,
        "notes": backend.notes,
    }
    if backend.status != "ok":
        return row
    engine = backend.engine
    rng = np.random.default_rng(0)
    one = {
        "image": rng.uniform(0, 1, (1, 1, resolution, resolution)).astype(np.float32),
        "film": film[None].astype(np.float32),
    }
    many = {
        "image": rng.uniform(0, 1, (batch, 1, resolution, resolution)).astype(np.float32),
        "film": np.repeat(film[None], batch, 0).astype(np.float32),
    }
    try:
        row["source"] = engine.describe().get("source", "")
        row["providers"] = engine.describe().get("providers", [])
        row["infer_b1"] = stats_ms(_time(lambda: engine.infer(one), iters, warmup))
        window = replace(Preprocessing(resolution=resolution), ct_window=bounds)

        def end_to_end() -> None:  # the runtime's slice path, threshold at the input size
            segment_slices(engine, raw[None], [film], window, "ct", batch=1, threshold=0.5)

        row["e2e_b1"] = stats_ms(_time(end_to_end, iters, warmup))
        row["infer_batch"] = stats_ms(_time(lambda: engine.infer(many), batch_iters, warmup))
        row["batch"] = batch
        row["throughput_slices_per_s"] = {
            "infer": batch / (row["infer_batch"]["median_ms"] / 1e3),
        }
        if backend.compute is not None:
            for key, feed in (("compute_b1", one), ("compute_batch", many)):
                run = backend.compute(feed["image"], feed["film"])
                for _ in range(warmup):
                    run()
                n = iters if key == "compute_b1" else batch_iters
                row[key] = stats_ms([run() for _ in range(n)])
                chunks = getattr(run, "chunks", None)
                if chunks and len(chunks) > 1:  # above the plan's profile: all chunks timed
                    row[f"{key}_chunks"] = chunks
            row["throughput_slices_per_s"]["compute"] = batch / (
                row["compute_batch"]["median_ms"] / 1e3
            )
    except Exception as exc:  # noqa: BLE001 - a backend failing mid-run is reported, not fatal
        row["status"], row["reason"] = "error", first_line(exc)
    return row


def measure_volume(engine_dir: Path, volume: Path, backend: str, precision: str | None,
                   threads: int, repeats: int) -> dict[str, Any]:  # fmt: skip
    """promptseg-run's Python API on the example volume, read to written mask."""
    from promptseg.runtime.api import run

    row: dict[str, Any] = {"backend": backend, "precision": precision, "volume": str(volume)}
    try:
        with tempfile.TemporaryDirectory(prefix="promptseg-bench-") as tmp:
            out = Path(tmp) / "mask.nii.gz"
            times = []
            summary: list[dict] = []
            for _ in range(repeats):
                t = time.perf_counter()
                summary = run(volume, "Segment the liver", out, engine_dir, backend=backend,
                              precision=precision, threads=threads)  # fmt: skip
                times.append(time.perf_counter() - t)
                out.unlink(missing_ok=True)
        row["status"] = "ok"
        row["stats"] = stats_ms(times)
        row["summary"] = summary[0] if summary else {}
    except Exception as exc:  # noqa: BLE001 - reported per backend
        row["status"], row["reason"] = "error", first_line(exc)
    return row


# --------------------------------------------------------------------------- preset mode


@contextlib.contextmanager
def preset_folder(
    preset: str, resolution: int, gpu: bool, max_batch: int
) -> Iterator[tuple[Any, Path]]:
    """A throw-away engine folder for a random ``preset`` UNet: model.onnx (+ FP16, + plan).

    Yields the runtime's ``EngineFolder`` (built in memory: no prompt cache or text encoder,
    so whole-volume timing is not available) and a checkpoint for the PyTorch backends.
    """
    import torch

    from promptseg.checkpoint import save_checkpoint
    from promptseg.export.files import save_onnx
    from promptseg.export.fp16 import convert_fp16, l2_norm_nodes
    from promptseg.export.image_graph import export_unet
    from promptseg.model.unet import PromptSegModel, preset_config
    from promptseg.preprocess import Preprocessing
    from promptseg.prompts import PromptVocabulary
    from promptseg.runtime.manifest import EngineFolder, TensorSpec

    torch.manual_seed(0)
    config = preset_config(preset, resolution=resolution)
    model = PromptSegModel(config, embed_dim=384).eval()
    film_dim = model.unet.film_dim
    with tempfile.TemporaryDirectory(prefix=f"promptseg-bench-{preset}-") as tmp:
        folder_path = Path(tmp)
        ckpt = save_checkpoint(
            folder_path / "random.pt", model,
            text_encoder={"name": "none", "model_type": "bert", "hidden_size": 384,
                          "max_tokens": 16, "weights_sha256": ""},
            vocabulary=PromptVocabulary(), preprocessing=Preprocessing(resolution=resolution),
            prompt_embeddings={}, train={"note": f"random {preset} UNet for bench/latency.py"},
        )  # fmt: skip
        onnx_model, _ = export_unet(model.unet, resolution=resolution, film_dim=film_dim, opset=17)
        save_onnx(onnx_model, folder_path / "model.onnx")
        graphs: dict[str, str] = {"fp32": "model.onnx"}
        manifest: dict[str, Any] = {"graphs": graphs, "resolution": resolution,
                                    "film_dim": film_dim, "preset": preset}  # fmt: skip
        if gpu:
            fp16 = convert_fp16(onnx_model, sorted(l2_norm_nodes(onnx_model)))
            save_onnx(fp16, folder_path / "model.fp16.onnx")
            graphs["fp16"] = "model.fp16.onnx"
            from promptseg.export.tensorrt_build import build_engine, tensorrt_available

            if tensorrt_available():
                manifest["tensorrt"] = build_engine(
                    folder_path / "model.fp16.onnx", folder_path / "model.plan",
                    folder_path / "timing.cache", resolution=resolution, film_dim=film_dim,
                    max_batch=max_batch,
                )  # fmt: skip
        raw = json.dumps(manifest, sort_keys=True).encode()
        f32 = np.dtype(np.float32)
        folder = EngineFolder(
            folder_path, manifest, hashlib.sha256(raw).hexdigest(),
            (TensorSpec("image", ("N", 1, resolution, resolution), f32),
             TensorSpec("film", ("N", film_dim), f32)),
            (TensorSpec("logits", ("N", 1, resolution, resolution), f32),),
            Preprocessing(resolution=resolution),
        )  # fmt: skip
        yield folder, ckpt


# --------------------------------------------------------------------------- the run


def _checkpoint_for(folder: Any, checkpoint: str | None) -> tuple[Path | None, str]:
    if checkpoint:
        from promptseg.checkpoint import resolve_checkpoint

        return resolve_checkpoint(checkpoint), ""
    facts = folder.manifest.get("checkpoint") or {}
    path = Path(facts["path"]) if facts.get("path") else None
    if path is not None and path.is_file():
        return path, ""
    return None, f"no --checkpoint and the manifest's checkpoint {facts.get('path')!r} is missing"


def _film(folder: Any) -> np.ndarray:
    """The FiLM vector of the canonical liver prompt (identity FiLM without a cache)."""
    cache = folder.path / "prompt_cache.safetensors"
    if cache.is_file():
        from promptseg.runtime.prompt_resolver import PromptResolver

        return PromptResolver(folder).resolve("Segment the liver").film.astype(np.float32)
    return np.ones(int(folder.manifest["film_dim"]), np.float32)


def gpu_check(report: dict[str, Any]) -> tuple[bool, list[str]]:
    """The ``--check`` gate: every GPU backend's batch-1 p95 below 50 ms."""
    if not report["machine"]["gpu"]["present"]:
        return True, [NO_GPU_LINE]
    rows = [r for r in report["backends"] if r["device"] == "cuda" and r["status"] == "ok"]
    if not rows:
        return False, ["GPU present but no GPU backend ran: GPU latency gate failed"]
    lines, ok = [], True
    for r in rows:
        p95 = r["infer_b1"]["p95_ms"]
        passed = p95 < GATE_P95_MS
        ok &= passed
        lines.append(f"{r['name']}: batch-1 p95 {p95:.3f} ms "
                     f"({'<' if passed else '>='} {GATE_P95_MS:g} ms gate: {'pass' if passed else 'FAIL'})")  # fmt: skip
    return ok, lines


def _goals(report: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in report["backends"] if r["device"] == "cuda" and r["status"] == "ok"]
    out = {}
    for r in rows:
        p95 = (r.get("compute_b1") or r["infer_b1"])["p95_ms"]
        tput = r["throughput_slices_per_s"].get("compute", r["throughput_slices_per_s"]["infer"])
        out[r["name"]] = {
            "batch1_p95_ms": p95,
            "batch1_p95_below_2ms": p95 < GOAL_P95_MS,
            "slices_per_s": tput,
            "at_least_3000_slices_per_s": tput >= GOAL_SLICES_PER_S,
        }
    return out


def run_benchmark(
    *,
    engine: str | Path | None = None,
    checkpoint: str | None = None,
    iters: int = 200,
    warmup: int = 20,
    batch: int = 16,
    batch_iters: int | None = None,
    threads: int | None = None,
    volume: str | Path | None = None,
    volume_repeats: int = 3,
    preset: str | None = None,
    resolution: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time every backend present; returns the JSON report (see the module docstring)."""
    if iters < 1 or warmup < 0 or batch < 1 or volume_repeats < 1:
        raise ValueError(
            f"need iters >= 1, warmup >= 0, batch >= 1, volume repeats >= 1; got {iters}, "
            f"{warmup}, {batch}, {volume_repeats}"
        )
    threads = int(threads or os.cpu_count() or 1)
    batch_iters = int(batch_iters or iters)
    gpu = gpu_facts()["present"]
    vol = Path(volume) if volume else (DEFAULT_VOLUME if DEFAULT_VOLUME.is_file() else None)
    if vol is not None and not vol.exists():
        raise FileNotFoundError(f"{vol}: example volume not found")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if preset:
            res = int(resolution or 256)
            folder, ckpt = stack.enter_context(preset_folder(preset, res, gpu, max(batch, 32)))
            why = ""
            engine_facts = {"preset": preset, "resolution": res, "film_dim": folder.manifest["film_dim"],
                            "manifest_sha256": None, "note": "random weights, exported on the fly"}  # fmt: skip
        else:
            from promptseg.runtime.manifest import EngineFolder

            folder = EngineFolder.open(engine)
            res = folder.resolution
            ckpt, why = _checkpoint_for(folder, checkpoint)
            engine_facts = {
                "path": str(folder.path),
                "manifest_sha256": folder.manifest_sha256,
                "resolution": res,
                "film_dim": folder.film_dim,
                "graphs": folder.manifest.get("graphs"),
                "tensorrt": folder.manifest.get("tensorrt"),
            }
        backends = open_backends(folder, ckpt, why, threads, gpu)
        film = _film(folder)
        raw, raw_source, bounds = _example_slice(vol, res, np.random.default_rng(0))
        rows = []
        for b in backends:
            log(f"timing {b.name} ..." if b.status == "ok" else f"skip {b.name}: {b.reason}")
            rows.append(measure_backend(b, resolution=res, film=film, raw=raw, bounds=bounds,
                                        iters=iters, warmup=warmup, batch=batch,
                                        batch_iters=batch_iters))  # fmt: skip
            if b.engine is not None:
                b.engine.close()
        volumes = []
        if preset:
            volumes.append({"status": "skipped", "reason": "preset mode has no prompt cache or "
                            "text encoder; whole-volume timing needs an exported engine folder"})  # fmt: skip
        elif vol is None:
            volumes.append({"status": "skipped", "reason": f"no example volume ({DEFAULT_VOLUME} "
                            "missing; pass --volume PATH)"})  # fmt: skip
        else:
            wanted = [("ort-cpu", "fp32")]
            ok = {r["name"] for r in rows if r["status"] == "ok"}
            wanted += [("ort-cuda", None)] if any(n.startswith("ort-cuda") for n in ok) else []
            trt = [n for n in ok if n.startswith("tensorrt-")]
            wanted += [("tensorrt", trt[0].removeprefix("tensorrt-"))] if trt else []
            for backend, precision in wanted:
                log(f"timing whole volume with {backend} ...")
                volumes.append(measure_volume(folder.path, vol, backend, precision, threads,
                                              volume_repeats))  # fmt: skip
    by_name = {r["name"]: r for r in rows if r["status"] == "ok"}
    ratio = None
    if "ort-cpu" in by_name and "torch-cpu" in by_name:
        ratio = (
            by_name["ort-cpu"]["infer_b1"]["median_ms"]
            / by_name["torch-cpu"]["infer_b1"]["median_ms"]
        )
    report: dict[str, Any] = {
        "format": "promptseg-bench-latency",
        "version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts(threads),
        "settings": {
            "iters": iters,
            "warmup": warmup,
            "batch": batch,
            "batch_iters": batch_iters,
            "threads": threads,
            "volume_repeats": volume_repeats,
            "preset": preset,
            "example_slice": raw_source,
        },  # fmt: skip
        "engine": engine_facts,
        "backends": rows,
        "volume": volumes,
        "ratio_ort_cpu_over_torch_cpu": ratio,
        "seconds": round(time.perf_counter() - started, 1),
    }
    report["goals"] = _goals(report)
    ok, lines = gpu_check(report)
    report["check"] = {"gate_p95_ms": GATE_P95_MS, "passed": ok, "lines": lines}
    return report


def format_table(report: dict[str, Any]) -> str:
    """Human-readable summary of a report."""
    lines = [f"{'backend':16s} {'b1 median':>10s} {'b1 p95':>9s} {'b1 p99':>9s} {'e2e p95':>9s} "
             f"{'compute p95':>11s} {'slices/s':>10s}"]  # fmt: skip
    for r in report["backends"]:
        if r["status"] != "ok":
            lines.append(f"{r['name']:16s} {r['status']}: {r['reason']}")
            continue
        comp = r.get("compute_b1")
        comp_text = f"{comp['p95_ms']:9.3f}ms" if comp else f"{'–':>11s}"
        tput = r["throughput_slices_per_s"]
        lines.append(
            f"{r['name']:16s} {r['infer_b1']['median_ms']:8.3f}ms {r['infer_b1']['p95_ms']:7.3f}ms "
            f"{r['infer_b1']['p99_ms']:7.3f}ms {r['e2e_b1']['p95_ms']:7.3f}ms {comp_text} "
            f"{tput.get('compute', tput['infer']):10.1f}"
        )
    for v in report["volume"]:
        if v.get("status") == "ok":
            lines.append(f"whole volume ({v['backend']}): median {v['stats']['median_ms']:.1f} ms "
                         f"read -> written mask ({Path(v['volume']).name})")  # fmt: skip
        else:
            lines.append(f"whole volume: {v.get('status')}: {v.get('reason')}")
    ratio = report["ratio_ort_cpu_over_torch_cpu"]
    if ratio is not None:
        lines.append(f"ONNX Runtime CPU / PyTorch eager (CPU) median ratio, batch 1, same run: "
                     f"{ratio:.3f}")  # fmt: skip
    else:
        lines.append(
            "ONNX Runtime CPU / PyTorch eager median ratio: not measured (a backend is missing)"
        )
    return "\n".join(lines)


def _command() -> Any:
    """The click command (built on use: click is imported only by the CLI)."""
    import click

    from promptseg.cliargs import CONTEXT, non_negative_int, positive_int, version_option

    path = click.Path(path_type=Path)

    @click.command(context_settings=CONTEXT, help=__doc__.split("\n\n")[0])
    @click.option("--engine", type=path, help="engine folder [default: runtime/default_engine]")
    @click.option("--checkpoint", help="checkpoint for the PyTorch backends (.pt or 'default')")
    @click.option("--iters", type=positive_int, default=200, help="timed iterations")
    @click.option("--warmup", type=non_negative_int, default=20, help="untimed warm-up iterations")
    @click.option("--batch", type=positive_int, default=16, help="batch for throughput")
    @click.option(
        "--batch-iters", type=positive_int, help="timed batched iterations [default: --iters]"
    )
    @click.option("--threads", type=positive_int, help="CPU threads [default: all cores]")
    @click.option("--volume", type=path, help=f"example volume [default: {DEFAULT_VOLUME}]")
    @click.option("--volume-repeats", type=positive_int, default=3)
    @click.option(
        "--preset",
        type=click.Choice(("tiny", "small", "paper")),
        help="random UNet, exported on the fly",
    )
    @click.option("--resolution", type=positive_int, help="resolution for --preset [default: 256]")
    @click.option("--json", "json_path", type=path, help="write the report here")
    @click.option("--check", is_flag=True, help="exit 1 when a GPU p95 >= 50 ms")
    @version_option(PROG)
    def command(**options: Any) -> int:
        if options["resolution"] and not options["preset"]:
            raise click.UsageError("--resolution needs --preset")
        return _main(Namespace(**options))

    return command


def main(argv: Sequence[str] | None = None) -> int:
    """``python bench/latency.py``; exit 2 on bad input, 1 when ``--check`` fails."""
    from promptseg.cliargs import run_command

    return run_command(_command(), PROG, argv)


def _main(args: Namespace) -> int:
    try:
        report = run_benchmark(
            engine=args.engine, checkpoint=args.checkpoint, iters=args.iters,
            warmup=args.warmup, batch=args.batch, batch_iters=args.batch_iters,
            threads=args.threads, volume=args.volume, volume_repeats=args.volume_repeats,
            preset=args.preset, resolution=args.resolution,
            log=lambda line: print(line, file=sys.stderr),
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        print(f"latency: error: {first_line(exc)}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json_path:
        from promptseg.runtime.writers import write_text_atomic

        write_text_atomic(json.dumps(report, indent=2) + "\n", args.json_path)
        print(f"wrote {args.json_path}")
    if args.check:
        for line in report["check"]["lines"]:
            print(line)
        return 0 if report["check"]["passed"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
