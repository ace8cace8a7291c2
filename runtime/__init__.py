"""promptseg.runtime: torch-free inference on exported engine folders.

Imports and runs with numpy, nibabel, pydicom, onnxruntime, scipy, pillow, safetensors and
tqdm only (the package's required dependencies); TensorRT and PyTorch are imported lazily by the
engines that need them.

    >>> from promptseg.runtime import run
    >>> run(["image_1.nii.gz"], ["liver"], output="liver.nii.gz")  # doctest: +SKIP
"""

from promptseg.runtime.api import resolve_prompts, run
from promptseg.runtime.engines import (
    BACKENDS,
    PRECISIONS,
    BackendError,
    Engine,
    OrtEngine,
    TorchEngine,
    TrtEngine,
    check_inputs,
    select_backend,
)
from promptseg.runtime.io import Image2D, read_input
from promptseg.runtime.manifest import DEFAULT_ENGINE_DIR, EngineFolder, TensorSpec
from promptseg.runtime.orientation import Reorientation, reorientation
from promptseg.runtime.pipeline import SegmentationResult, choose_modality, segment
from promptseg.runtime.prompt_resolver import (
    PromptCache,
    PromptError,
    PromptResolver,
    ResolvedPrompt,
    normalise_prompt,
)
from promptseg.runtime.tokenizer import WordPieceTokenizer

__all__ = [
    "BACKENDS",
    "DEFAULT_ENGINE_DIR",
    "PRECISIONS",
    "BackendError",
    "Engine",
    "EngineFolder",
    "Image2D",
    "OrtEngine",
    "PromptCache",
    "PromptError",
    "PromptResolver",
    "Reorientation",
    "ResolvedPrompt",
    "SegmentationResult",
    "TensorSpec",
    "TorchEngine",
    "TrtEngine",
    "WordPieceTokenizer",
    "check_inputs",
    "choose_modality",
    "normalise_prompt",
    "read_input",
    "reorientation",
    "resolve_prompts",
    "run",
    "segment",
    "select_backend",
]
