"""An engine folder as a standalone Triton Inference Server model repository.

Layout (docs/serving.md, "Model repository"):

    REPO/promptseg_image/     the image graph, ``onnxruntime`` backend, dynamic batching
    REPO/promptseg_image_trt/ the TensorRT plan, ``tensorrt_plan`` platform (when model.plan exists)
    REPO/promptseg_film/      prompt -> FiLM vector, ``python`` backend reading the prompt cache
    REPO/promptseg/           ensemble: (image [1, R, R], prompt [1]) -> film -> logits

Every ``config.pbtxt`` is checked by parsing it as Triton's ``ModelConfig`` protobuf message
(``tritonclient.grpc.model_config_pb2``) when tritonclient is installed.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

from promptseg.data.readers import InputError, PathLike, write_text_atomic
from promptseg.runtime.manifest import EngineFolder, TensorSpec
from promptseg.runtime.prompt_resolver import normalise_prompt

IMAGE_MODEL = "promptseg_image"
PLAN_MODEL = "promptseg_image_trt"
FILM_MODEL = "promptseg_film"
ENSEMBLE = "promptseg"
FILM_SOURCE = Path(__file__).with_name("triton_film_model.py")


def _dims(spec: TensorSpec) -> str:
    """Triton dims of a manifest tensor without its batch dimension: ``[1, 128, 128]``."""
    return "[" + ", ".join(str(int(d)) for d in spec.shape[1:]) + "]"


def _tensor(name: str, data_type: str, dims: str) -> str:
    return f'  {{\n    name: "{name}"\n    data_type: {data_type}\n    dims: {dims}\n  }}'


def _tensors(kind: str, items: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def image_config(folder: EngineFolder, name: str, max_batch: int, plan: bool) -> str:
    """``config.pbtxt`` of the image graph (ONNX Runtime) or the TensorRT plan."""
    head = 'platform: "tensorrt_plan"' if plan else 'backend: "onnxruntime"'
    inputs = [_tensor(s.name, "TYPE_FP32", _dims(s)) for s in folder.inputs]
    outputs = [_tensor(s.name, "TYPE_FP32", _dims(s)) for s in folder.outputs]
    return (
        f'name: "{name}"\n{head}\nmax_batch_size: {int(max_batch)}\n'
        + _tensors("input", inputs)
        + _tensors("output", outputs)
        + "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}\n"
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]\n"
    )


def film_config(folder: EngineFolder, max_batch: int) -> str:
    """``config.pbtxt`` of the Python-backend prompt -> FiLM model."""
    return (
        f'name: "{FILM_MODEL}"\nbackend: "python"\nmax_batch_size: {int(max_batch)}\n'
        + _tensors("input", [_tensor("prompt", "TYPE_STRING", "[1]")])
        + _tensors("output", [_tensor("film", "TYPE_FP32", f"[{int(folder.film_dim)}]")])
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
    )


def ensemble_config(folder: EngineFolder, max_batch: int, image_model: str) -> str:
    """``config.pbtxt`` of the ensemble: film from the prompt, then the image graph."""
    image = next(s for s in folder.inputs if s.name == "image")
    outputs = [_tensor(s.name, "TYPE_FP32", _dims(s)) for s in folder.outputs]
    out_map = "".join(
        f'      output_map {{\n        key: "{s.name}"\n        value: "{s.name}"\n      }}\n'
        for s in folder.outputs
    )
    return (
        f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: {int(max_batch)}\n'
        + _tensors(
            "input",
            [_tensor("image", "TYPE_FP32", _dims(image)), _tensor("prompt", "TYPE_STRING", "[1]")],
        )
        + _tensors("output", outputs)
        + "ensemble_scheduling {\n  step [\n"
        + f'    {{\n      model_name: "{FILM_MODEL}"\n      model_version: -1\n'
        + '      input_map {\n        key: "prompt"\n        value: "prompt"\n      }\n'
        + '      output_map {\n        key: "film"\n        value: "film"\n      }\n    },\n'
        + f'    {{\n      model_name: "{image_model}"\n      model_version: -1\n'
        + '      input_map {\n        key: "image"\n        value: "image"\n      }\n'
        + '      input_map {\n        key: "film"\n        value: "film"\n      }\n'
        + out_map
        + "    }\n  ]\n}\n"
    )


def film_model_source() -> str:
    """``model.py`` of the Python-backend model: the template plus ``normalise_prompt``."""
    helper = inspect.getsource(normalise_prompt)
    return (
        FILM_SOURCE.read_text()
        + "\n\nimport unicodedata  # noqa: E402 - used by normalise_prompt below\n\n\n"
        + helper
    )


def parse_config(text: str) -> Any:
    """Parse ``config.pbtxt`` text as Triton's ``ModelConfig`` (needs tritonclient[grpc]).

    Raises:
        google.protobuf.text_format.ParseError: Text that is not a valid ModelConfig.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _check_parses(configs: dict[str, str]) -> None:
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2  # noqa: F401
    except ImportError:
        return  # checked in the tests; the repository does not need tritonclient
    for name, text in configs.items():
        try:
            parse_config(text)
        except text_format.ParseError as exc:  # a bug here, not a user error: say where
            raise ValueError(f"{name}/config.pbtxt is not a Triton ModelConfig: {exc}") from exc


def write_triton_repo(
    engine: PathLike | EngineFolder | None,
    out: PathLike,
    *,
    max_batch: int = 64,
    precision: str = "fp32",
) -> dict[str, Path]:
    """Write a Triton model repository for an engine folder.

    Args:
        engine: Engine folder (default: the packaged one).
        out: Repository folder to create (must not exist, or be empty).
        max_batch: ``max_batch_size`` of every model (slices per batch).
        precision: Which ONNX image graph goes under ``onnxruntime``: fp32, fp16 or int8.

    Returns:
        Model name -> its folder.

    Raises:
        InputError: A bad engine folder, a missing graph, or an output folder in the way.
    """
    folder = engine if isinstance(engine, EngineFolder) else EngineFolder.open(engine)
    repo = Path(out)
    if repo.exists() and (not repo.is_dir() or any(repo.iterdir())):
        raise InputError(repo, "exists and is not an empty folder; choose a new --triton-repo")
    if int(max_batch) < 1:
        raise InputError("--max-batch", f"must be at least 1, got {max_batch}")
    graph = folder.graph(precision)
    plan = folder.plan
    configs = {
        IMAGE_MODEL: image_config(folder, IMAGE_MODEL, max_batch, plan=False),
        FILM_MODEL: film_config(folder, max_batch),
        ENSEMBLE: ensemble_config(folder, max_batch, IMAGE_MODEL),
    }
    if plan is not None:
        configs[PLAN_MODEL] = image_config(folder, PLAN_MODEL, max_batch, plan=True)
    _check_parses(configs)
    tmp = repo.with_name(f".tmp-{repo.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for name, text in configs.items():
            (tmp / name / "1").mkdir(parents=True)
            write_text_atomic(text, tmp / name / "config.pbtxt")
        shutil.copyfile(graph, tmp / IMAGE_MODEL / "1" / "model.onnx")
        if plan is not None:
            shutil.copyfile(plan, tmp / PLAN_MODEL / "1" / "model.plan")
        film_dir = tmp / FILM_MODEL / "1"
        write_text_atomic(film_model_source(), film_dir / "model.py")
        shutil.copyfile(
            folder.file("prompt_cache.safetensors"), film_dir / "prompt_cache.safetensors"
        )
        if repo.exists():
            repo.rmdir()
        tmp.rename(repo)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {name: repo / name for name in configs}
