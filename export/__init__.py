"""promptseg.export: checkpoint -> verified engine folder (ONNX, prompt cache, manifest, plan).

See docs/engine_format.md for the folder contract. ``export_model`` mirrors the
``promptseg-export`` CLI.
"""

from __future__ import annotations

from promptseg.export.api import export_model, verify_folder_hashes
from promptseg.export.files import ExportError, ExportInputError

__all__ = ["ExportError", "ExportInputError", "export_model", "verify_folder_hashes"]
