"""Inference engines behind one contract (ONNX Runtime, TensorRT, PyTorch) and backend selection.

One module per backend: the contract in :mod:`~promptseg.runtime.engine_base`, then
:mod:`~promptseg.runtime.ort_engine`, :mod:`~promptseg.runtime.trt_engine` and
:mod:`~promptseg.runtime.torch_engine`; this module picks one (:func:`select_backend`) and
re-exports them. Heavy backends are imported inside the classes that need them: importing this
module needs numpy only.

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

from promptseg.runtime.engine_base import (  # noqa: F401 - the contract, re-exported
    BACKENDS,
    MASK_OUTPUT,
    PRECISIONS,
    PRESENCE_OUTPUT,
    BackendError,
    Engine,
    check_inputs,
    has_presence,
    open_folder,
)
from promptseg.runtime.errors import PathLike, first_line
from promptseg.runtime.manifest import EngineFolder, IntegrityError
from promptseg.runtime.ort_engine import PROVIDER_ALIASES, OrtEngine, ort_session  # noqa: F401
from promptseg.runtime.torch_engine import TorchEngine
from promptseg.runtime.trt_engine import (  # noqa: F401
    TrtEngine,
    cuda_device_count,
    plan_precision,
)


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
    folder = open_folder(engine_dir)
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
            why = f"TensorRT failed ({first_line(exc)})"
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
