"""promptseg.calibration: INT8 calibration data, Q/DQ quantisation and accuracy parity.

``quantize_int8`` (ONNX Runtime static quantisation, symmetric INT8 Q/DQ) is what
``promptseg-export --int8`` calls; ``modelopt_quantize`` is the TensorRT Model Optimizer path
for GPU machines; ``mixed_precision_search`` is the sensitivity-driven float fallback that
``quantize_int8(fallback_tolerance=...)`` runs; ``python -m promptseg.calibration.parity``
compares Dice across backends.
Names are imported lazily so ``import promptseg.calibration`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CalibrationReader": "data",
    "CalibrationSet": "data",
    "PromptCache": "data",
    "build_calibration_set": "data",
    "read_prompt_cache": "data",
    "resolve_calibration": "data",
    "build_proxy_set": "mixed",
    "mixed_precision_search": "mixed",
    "count_qdq": "quantize",
    "modelopt_quantize": "quantize",
    "quantize_int8": "quantize",
    "run_parity": "parity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'promptseg.calibration' has no attribute {name!r}")
    return getattr(import_module(f"promptseg.calibration.{_EXPORTS[name]}"), name)
