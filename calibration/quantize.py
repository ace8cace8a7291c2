"""Static INT8 quantisation of the image graph into a Q/DQ ONNX graph (``model.int8.onnx``).

:func:`quantize_int8` runs ONNX Runtime's ``quantize_static`` with ``QuantFormat.QDQ``, signed
INT8 activations and weights, both symmetric (zero point 0), per-channel weights by default,
calibrated on real train-split slices (:mod:`promptseg.calibration.data`). The graph keeps
float32 ``image``/``film``/``logits`` at its boundary, so every runtime feeds it like the FP32
graph; ``quant_pre_process`` (symbolic shape inference + ORT graph optimisation) runs first
and is skipped, with a note in the report, if it fails.

The defaults come from measurements on the shipped model (parity on validation cases) and the
tiny test model:

* only convolution-type ops get Q/DQ (``op_types="conv"``): quantising every op ONNX Runtime
  supports (also the FiLM split, attention gates, L2 normalisation) halved the tiny model's
  mask agreement with FP32;
* 7-bit weights (``reduce_range=True``): ONNX Runtime's fused INT8 kernels on x86 CPUs
  without VNNI (AVX2 ``vpmaddubsw`` adds pairs of 8-bit products in 16 bits) saturated and
  wiped out whole targets of the shipped model, while the float simulation of the same graph
  was fine; with 7-bit weights both agree;
* ``percentile`` calibration at 99.99 with the first and last convolution kept in float: the
  largest per-target Dice change against PyTorch fell from 0.028 (min-max) to about 0.006,
  and the mask agreement with FP32 rose to 0.96-0.995 per target.

That still left two small targets (glioma, liver tumour) outside the 0.005 Dice tolerance, so
``fallback_tolerance`` adds the step serious PTQ tools take: a sensitivity-driven float
fallback (:mod:`promptseg.calibration.mixed`) that keeps the fewest, most sensitive nodes in
float until a train-split proxy meets the tolerance; the ranges are calibrated once and reused
for every graph it tries (``quantize_static(calibration_cache_path=...)``).

TensorRT 11 path. TensorRT 11 removed implicit INT8 calibration: ``IInt8Calibrator`` and
``IBuilderConfig.int8_calibrator`` are gone, and so is ``BuilderFlag.INT8`` (like every
precision flag; networks are always strongly typed). INT8 on TensorRT 11 therefore means an
*explicitly quantised* ONNX graph with QuantizeLinear/DequantizeLinear pairs, which TensorRT
builds strongly typed, taking each tensor's precision from the graph. NVIDIA's tool for writing
such graphs is TensorRT Model Optimizer::

    from modelopt.onnx.quantization import quantize
    quantize(onnx_path="model.onnx", quantize_mode="int8",
             calibration_data={"image": (N, 1, R, R), "film": (N, P)},
             calibration_method="entropy",  # or "max"
             output_path="model.int8.onnx")

(signature as documented at https://nvidia.github.io/TensorRT-Model-Optimizer/reference/
generated/modelopt.onnx.quantization.quantize.html: ``quantize(onnx_path, quantize_mode='int8',
calibration_data=None, calibration_method=None, ..., calibration_eps=['cpu', 'cuda:0', 'trt'],
..., output_path=None, ..., high_precision_dtype='fp16', ...) -> None``; the removed TensorRT 11
APIs are listed at https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/
tensorrt-10x-to-11x-python-api-reference.html). The graph written here is the same format
(symmetric INT8 Q/DQ), so either one builds on TensorRT 10 (explicit quantisation) and 11;
:func:`modelopt_quantize` wraps the ModelOpt call for GPU machines.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from promptseg.calibration.data import (
    CalibrationReader,
    CalibrationSet,
    PromptCache,
    resolve_calibration,
)
from promptseg.preprocess import Preprocessing
from promptseg.runtime.errors import first_line
from promptseg.runtime.writers import atomic_write

__all__ = ["METHODS", "count_qdq", "modelopt_quantize", "quantize_int8"]

METHODS = ("minmax", "entropy", "percentile")
# Which ops get Q/DQ: "conv" quantises the compute-heavy ops (inputs and weights of convolutions
# and matrix products), the placement TensorRT fuses best; "all" is ONNX Runtime's full list
# (also element-wise ops, the FiLM split, the attention gates and the L2 normalisation).
OP_TYPES: dict[str, tuple[str, ...] | None] = {
    "conv": ("Conv", "ConvTranspose", "Gemm", "MatMul"),
    "all": None,
}
MODELOPT_METHODS = ("entropy", "max")
# Calibration pixels held in memory at once (batch x R x R); bounds the activation memory of
# ORT's calibrators (histogram methods keep every intermediate output of a stride).
_PIXELS_PER_BATCH = 16 * 128 * 128
_PIXELS_PER_STRIDE = 4 * _PIXELS_PER_BATCH


def count_qdq(onnx_path: str | Path) -> dict[str, Any]:
    """Count Q/DQ nodes and the compute nodes that consume dequantised tensors.

    Returns:
        ``{"quantize_linear", "dequantize_linear", "nodes_total", "nodes_quantized",
        "quantized_op_types": {op: count}}``; a node counts as quantised when at least one
        of its inputs is produced by a DequantizeLinear node.
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    compute = [n for n in graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    quantized = [n for n in compute if any(producer.get(i) == "DequantizeLinear" for i in n.input)]
    ops = Counter(n.op_type for n in graph.node)
    return {
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "nodes_total": len(compute),
        "nodes_quantized": len(quantized),
        "quantized_op_types": dict(sorted(Counter(n.op_type for n in quantized).items())),
    }


def _calibration_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    table = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in table:
        raise ValueError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
    return table[method]


def _batching(n: int, resolution: int, batch_size: int | None) -> tuple[int, int, int]:
    """(batch size, number of batches, stride in batches dividing the number of batches)."""
    batch = batch_size or max(1, min(16, _PIXELS_PER_BATCH // (resolution * resolution)))
    n_batches = -(-n // batch)
    limit = max(1, _PIXELS_PER_STRIDE // (batch * resolution * resolution))
    stride = max(d for d in range(1, min(limit, n_batches) + 1) if n_batches % d == 0)
    return batch, n_batches, stride


def _first_last_conv(onnx_path: Path) -> list[str]:
    """Convolutions reading the ``image`` input (conv and shortcut) and the last one (head)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose") and n.name]
    first = [n.name for n in convs if n.input and n.input[0] in inputs]
    return list(dict.fromkeys(first + [n.name for n in convs[-1:]]))


def _fallback(
    build: Any,
    fp32_onnx: Path,
    source: Path,
    tmp: Path,
    calib: CalibrationSet,
    calib_data: Any,
    excluded: list[str],
    *,
    tolerance: float,
    proxy_data: str | Path | None,
    prompt_cache: PromptCache | str | Path | None,
    preprocessing: Preprocessing | dict | None,
    quantized_ops: tuple[str, ...] | None,
    sensitivity_samples: int,
    max_float: int | None,
    proxy_cases: dict[str, int] | None,
    threads: int | None,
    progress: bool,
) -> tuple[list[str], dict[str, Any]]:
    """Set up and run :func:`promptseg.calibration.mixed.mixed_precision_search`."""
    import numpy as np
    import onnx

    from promptseg.calibration.data import PROMPT_CACHE, _onnx_io, cache_index, read_prompt_cache
    from promptseg.calibration.mixed import (
        build_proxy_set,
        conv_macs,
        mixed_precision_search,
    )
    from promptseg.calibration.parity import case_counts
    from promptseg.prompts import PromptVocabulary

    root = proxy_data
    if root is None and isinstance(calib_data, str | Path) and Path(calib_data).is_dir():
        root = calib_data
    root = root if root is not None else calib.meta.get("data_root")
    if root is None or not Path(root).is_dir():
        raise ValueError(
            f"the INT8 float fallback scores graphs on train-split cases: pass proxy_data (a "
            f"dataset root such as ../shared/data); got {root!r}"
        )
    cache = (prompt_cache if isinstance(prompt_cache, PromptCache)
             else read_prompt_cache(prompt_cache or fp32_onnx.parent / PROMPT_CACHE))  # fmt: skip
    vocab, films = PromptVocabulary(), {}
    for target in sorted(set(cache.targets)):
        i = cache_index(cache, vocab.canonical(target))
        if i is not None:
            films[target] = cache.film[i]
    if isinstance(preprocessing, dict):
        preprocessing = Preprocessing.from_dict(preprocessing)
    pre = preprocessing or _onnx_io(fp32_onnx)[2] or Preprocessing(resolution=calib.resolution)
    proxy = build_proxy_set(root, pre, list(films), exclude={str(c) for c in calib.case_id},
                            **(proxy_cases or {}))  # fmt: skip
    eval_cases = case_counts(root, list(films), split="val")
    n = min(int(sensitivity_samples), len(calib))
    idx = np.unique(np.linspace(0, len(calib) - 1, max(1, n)).round().astype(int))
    ops = set(quantized_ops or OP_TYPES["conv"] or ())
    graph = onnx.load(str(source), load_external_data=False).graph
    candidates = [n.name for n in graph.node if n.op_type in ops and n.name not in excluded]
    first_last = set(_first_last_conv(source))
    reasons = {
        n: "first/last convolution (reads the 1-channel image or writes the logits)"
        if n in first_last else "excluded by the caller"
        for n in excluded
    }  # fmt: skip

    def say(msg: str) -> None:
        if progress:
            print(f"[int8] {msg}", file=sys.stderr, flush=True)

    kept, report = mixed_precision_search(
        lambda only, exclude: build(only, exclude, tmp / "trial.onnx"),
        fp32_onnx, candidates, reasons, proxy, films,
        calib.image[idx], calib.film[idx], calib.target[idx],
        tolerance=tolerance, resolution=calib.resolution, eval_cases=eval_cases,
        max_float=max_float, threads=threads, macs=conv_macs(source), progress=say,
    )  # fmt: skip
    return kept, report


def _pre_process(src: Path, dst: Path) -> str | None:
    """Run ``quant_pre_process``; None on success, else the reason it was skipped."""
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception as exc:  # noqa: BLE001 - optional step; report and go on
        first = first_line(exc)
        return f"quant_pre_process failed, quantising the graph as exported ({first})"
    return None


def quantize_int8(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calib_data: CalibrationSet | CalibrationReader | str | Path | None,
    *,
    per_channel: bool = True,
    reduce_range: bool = True,
    method: str = "percentile",
    op_types: str | Sequence[str] = "conv",
    keep_first_last: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    n: int = 128,
    seed: int = 0,
    prompt_cache: PromptCache | str | Path | None = None,
    preprocessing: Preprocessing | dict | None = None,
    batch_size: int | None = None,
    pre_process: bool = True,
    percentile: float = 99.99,
    save_calibration: str | Path | None = None,
    fallback_tolerance: float | None = None,
    proxy_data: str | Path | None = None,
    sensitivity_samples: int = 64,
    max_float: int | None = None,
    proxy_cases: dict[str, int] | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a symmetric INT8 Q/DQ graph calibrated on real train-split slices.

    Args:
        fp32_onnx: The FP32 image graph (``model.onnx``), inputs ``image``/``film``.
        out_path: Where to write the Q/DQ graph (atomically).
        calib_data: A :class:`CalibrationSet` or reader, a calibration ``.npz`` or a dataset
            root (then ``n`` samples are drawn with ``seed``).
        per_channel: Per-output-channel weight scales.
        reduce_range: 7-bit weights (values in [-64, 64], still symmetric INT8). Default on:
            ONNX Runtime's fused INT8 kernels on x86 CPUs without VNNI accumulate 8-bit
            products in 16 bits and saturate (on the shipped model every brain-tumour and
            right-kidney mask vanished); TensorRT builds the 7-bit graph unchanged.
        method: "percentile" (default), "minmax" or "entropy" activation calibration.
        op_types: "conv" (default: Conv, ConvTranspose, Gemm, MatMul), "all" (every op ONNX
            Runtime can quantise) or an explicit list of op types.
        keep_first_last: Keep the convolutions that read the 1-channel image and the last one
            (the logit head) in float: little compute, most sensitive.
        nodes_to_exclude: Further node names kept in float.
        prompt_cache: FiLM source (default: ``prompt_cache.safetensors`` beside ``fp32_onnx``).
        preprocessing: Normalisation settings (default: the graph's metadata, else defaults).
        batch_size: Calibration batch (default: 16 at 128 x 128, fewer at larger R).
        pre_process: Run ``quant_pre_process`` first.
        percentile: Percentile of |activation| that sets the range for
            ``method="percentile"`` (99.99: outliers beyond it are clipped).
        save_calibration: Also save the calibration set used to this ``.npz``.
        fallback_tolerance: Run the sensitivity-driven float fallback
            (:mod:`promptseg.calibration.mixed`): keep the fewest most sensitive nodes in
            float so that, on a train-split proxy, every target's Dice difference to the FP32
            graph (``|mean| + 2 sd / sqrt(n)`` over its cases) and the macro-mean difference
            stay within this value. None (default): plain static INT8.
        proxy_data: Dataset root for the proxy cases (default: ``calib_data`` when it is a
            folder, else the root recorded in the calibration set).
        sensitivity_samples: Calibration samples the per-node sensitivity runs on.
        max_float: Most nodes the fallback may keep in float (default: half the candidates).
        proxy_cases: Proxy size, keyword arguments of
            :func:`promptseg.calibration.mixed.build_proxy_set` (``brain_per_class``,
            ``chaos_volumes``, ``btcv_slices``; defaults 30, 2, 40).
        threads: ONNX Runtime intra-op threads of the fallback's sessions (default:
            ``$OMP_NUM_THREADS``, else ONNX Runtime's choice).
        progress: Print one line per fallback step on stderr.

    Returns:
        Report dict: method, per_channel, symmetric, n_samples, calibration summary,
        pre_process note, Q/DQ and quantised node counts, seconds, output path.

    Raises:
        ValueError: Unknown method, missing or mismatching calibration data.
        FileNotFoundError: ``fp32_onnx`` or a calibration path does not exist.
    """
    import onnx
    import onnxruntime

    started = time.perf_counter()
    if fallback_tolerance is not None and fallback_tolerance < 0:
        raise ValueError(f"fallback_tolerance must be >= 0 or None, got {fallback_tolerance}")
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if not fp32_onnx.is_file():
        raise FileNotFoundError(f"{fp32_onnx}: FP32 graph not found")
    calibrate_method = _calibration_method(method)
    quantized_ops = _quantized_op_types(op_types)
    calib = resolve_calibration(
        calib_data, fp32_onnx, prompt_cache=prompt_cache, preprocessing=preprocessing, n=n,
        seed=seed,
    )  # fmt: skip
    if save_calibration is not None:
        calib.save(save_calibration)
    batch, n_batches, stride = _batching(len(calib), calib.resolution, batch_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    excluded = list(nodes_to_exclude)
    note = None
    mixed: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="promptseg-int8-") as tmp:
        source = fp32_onnx
        if pre_process:
            prepped = Path(tmp) / "model.pre.onnx"
            note = _pre_process(fp32_onnx, prepped)
            if note is None:
                source = prepped
        if keep_first_last:  # names of the graph that is quantised (pre-processing renames)
            excluded += [n for n in _first_last_conv(source) if n not in excluded]
        build = _static_builder(
            source, calib, batch, Path(tmp) / "ranges.json",
            per_channel=per_channel, reduce_range=reduce_range,
            calibrate_method=calibrate_method, quantized_ops=quantized_ops,
            extra=_extra_options(method, percentile, stride),
        )  # fmt: skip
        if fallback_tolerance is not None:
            kept, mixed = _fallback(
                build, fp32_onnx, source, Path(tmp), calib, calib_data, excluded,
                tolerance=fallback_tolerance, proxy_data=proxy_data, prompt_cache=prompt_cache,
                preprocessing=preprocessing, quantized_ops=quantized_ops,
                sensitivity_samples=sensitivity_samples, max_float=max_float,
                proxy_cases=proxy_cases, threads=threads, progress=progress,
            )  # fmt: skip
            excluded += kept

        def write(partial: Path) -> None:
            build(None, excluded, partial)
            onnx.checker.check_model(str(partial))

        atomic_write(out_path, write)
    counts = _checked_qdq_counts(out_path, fp32_onnx)
    return {
        "method": method,
        "format": "QDQ",
        "activation_type": "int8",
        "weight_type": "int8",
        "symmetric": True,
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "op_types": op_types if isinstance(op_types, str) else list(op_types),
        "kept_float": excluded,
        "n_samples": len(calib),
        "batch_size": batch,
        "n_batches": n_batches,
        "calibration": calib.summary(),
        "percentile": percentile if method == "percentile" else None,
        "pre_process": (note or "quant_pre_process applied") if pre_process else "skipped",
        "float_fallback": mixed,
        **counts,
        "onnxruntime": onnxruntime.__version__,
        "source": str(fp32_onnx),
        "output": str(out_path),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _quantized_op_types(op_types: str | Sequence[str]) -> tuple[str, ...] | None:
    """The op types to quantise: a named group of :data:`OP_TYPES` (None: all) or a list."""
    if not isinstance(op_types, str):
        return tuple(op_types)
    if op_types not in OP_TYPES:
        raise ValueError(f"unknown op_types {op_types!r}; valid: {', '.join(OP_TYPES)} or a list")
    return OP_TYPES[op_types]


def _extra_options(method: str, percentile: float, stride: int) -> dict[str, Any]:
    """``quantize_static`` extra options: symmetric ranges, strided calibration, percentile."""
    extra: dict[str, Any] = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "CalibStridedMinMax": stride,
    }
    if method == "percentile":
        extra["CalibPercentile"] = float(percentile)
    return extra


def _static_builder(
    source: Path,
    calib: CalibrationSet,
    batch: int,
    cache: Path,
    *,
    per_channel: bool,
    reduce_range: bool,
    calibrate_method: Any,
    quantized_ops: Sequence[str] | None,
    extra: dict[str, Any],
) -> Callable[[Sequence[str] | None, Sequence[str], Path], Path]:
    """``build(only, exclude, dst)``: one Q/DQ graph of ``source`` calibrated on ``calib``.

    The ranges are calibrated once (cached in ``cache`` where ONNX Runtime supports it);
    every further graph (the fallback's trials) reuses them.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    cached = "calibration_cache_path" in inspect.signature(quantize_static).parameters

    def build(only: Sequence[str] | None, exclude: Sequence[str], dst: Path) -> Path:
        quantize_static(
            str(source),
            str(dst),
            CalibrationReader(calib, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method,
            op_types_to_quantize=list(quantized_ops) if quantized_ops else None,
            nodes_to_quantize=list(only) if only else None,
            nodes_to_exclude=list(exclude) or None,
            extra_options=extra,
            **({"calibration_cache_path": str(cache)} if cached else {}),
        )
        return dst

    return build


def _checked_qdq_counts(out_path: Path, fp32_onnx: Path) -> dict[str, Any]:
    """:func:`count_qdq` of the written graph; an error when nothing was quantised."""
    counts = count_qdq(out_path)
    if counts["quantize_linear"] == 0 or counts["nodes_quantized"] == 0:
        raise RuntimeError(f"{out_path}: quantize_static inserted no Q/DQ nodes into {fp32_onnx}")
    return counts


def modelopt_quantize(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calib_data: CalibrationSet | CalibrationReader | str | Path | None,
    *,
    method: str = "entropy",
    high_precision_dtype: str = "fp16",
    calibration_eps: tuple[str, ...] = ("cuda:0", "cpu"),
    nodes_to_exclude: Sequence[str] = (),
    n: int = 128,
    seed: int = 0,
    prompt_cache: PromptCache | str | Path | None = None,
    preprocessing: Preprocessing | dict | None = None,
) -> dict[str, Any]:
    """INT8 Q/DQ graph for TensorRT 11 through NVIDIA TensorRT Model Optimizer (GPU machines).

    Calls ``modelopt.onnx.quantization.quantize(onnx_path, quantize_mode="int8",
    calibration_data={"image", "film"}, calibration_method=method, calibration_eps=...,
    high_precision_dtype=..., output_path=...)`` on the same calibration set as
    :func:`quantize_int8`; ModelOpt writes TensorRT-friendly Q/DQ placement and keeps the
    non-quantised part in ``high_precision_dtype``.

    Args:
        method: "entropy" (ModelOpt's default) or "max".
        high_precision_dtype: "fp16" (TensorRT default), "bf16" or "fp32" for unquantised ops.
        calibration_eps: Execution providers ModelOpt calibrates with, in priority order.
        nodes_to_exclude: Nodes left unquantised, for example the manifest's
            ``int8.kept_float`` (first/last convolutions and the float fallback's choice).

    Returns:
        Report dict like :func:`quantize_int8`'s.

    Raises:
        ImportError: ``nvidia-modelopt`` is not installed (names the extra to install).
        ValueError: Unknown method or bad calibration data.
    """
    if method not in MODELOPT_METHODS:
        raise ValueError(
            f"unknown ModelOpt method {method!r}; valid: {', '.join(MODELOPT_METHODS)}"
        )
    try:
        from modelopt.onnx.quantization import quantize as mo_quantize
    except ImportError as exc:
        raise ImportError(
            "modelopt_quantize needs NVIDIA TensorRT Model Optimizer: pip install "
            "'promptseg[modelopt]' (nvidia-modelopt[onnx]; a GPU machine with 'promptseg[trt]')"
        ) from exc
    started = time.perf_counter()
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    calib = resolve_calibration(
        calib_data, fp32_onnx, prompt_cache=prompt_cache, preprocessing=preprocessing, n=n,
        seed=seed,
    )  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mo_quantize(
        onnx_path=str(fp32_onnx),
        quantize_mode="int8",
        calibration_data=calib.inputs(),
        calibration_method=method,
        calibration_eps=list(calibration_eps),
        high_precision_dtype=high_precision_dtype,
        nodes_to_exclude=list(nodes_to_exclude) or None,
        output_path=str(out_path),
    )
    return {
        "method": f"modelopt-{method}",
        "format": "QDQ",
        "high_precision_dtype": high_precision_dtype,
        "kept_float": list(nodes_to_exclude),
        "n_samples": len(calib),
        "calibration": calib.summary(),
        **count_qdq(out_path),
        "source": str(fp32_onnx),
        "output": str(out_path),
        "seconds": round(time.perf_counter() - started, 2),
    }
