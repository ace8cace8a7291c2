"""promptseg: text-prompted medical image segmentation.

``from promptseg import Segmenter`` is the in-memory API (:mod:`promptseg.runtime.segmenter`);
it is imported lazily and needs no PyTorch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Segmenter", "SegmenterResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Segmenter", "SegmenterResult"):
        from promptseg.runtime import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'promptseg' has no attribute {name!r}")
