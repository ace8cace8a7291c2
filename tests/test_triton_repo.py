"""``promptseg-export --triton-repo``: configs parse as Triton ModelConfig, and the Python-backend
model loads and answers in the tritonserver binary that PyTriton ships."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from promptseg.runtime.manifest import DEFAULT_ENGINE_DIR

pytest.importorskip("tritonclient.grpc")


def _export(*args: object) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("promptseg-export")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "promptseg.export.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    if not (DEFAULT_ENGINE_DIR / "manifest.json").is_file():
        pytest.skip(f"the shipped default engine is missing ({DEFAULT_ENGINE_DIR})")
    out = tmp_path_factory.mktemp("triton") / "repo"
    proc = _export(DEFAULT_ENGINE_DIR, "--triton-repo", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_configs_parse_as_triton_model_configs(repo: Path) -> None:
    from promptseg.export.triton_repo import PLAN_MODEL, image_config, parse_config
    from promptseg.runtime import EngineFolder

    folder = EngineFolder.open(DEFAULT_ENGINE_DIR)
    r, p = folder.resolution, folder.film_dim
    assert sorted(d.name for d in repo.iterdir()) == [
        "promptseg",
        "promptseg_film",
        "promptseg_image",
    ]
    image = parse_config((repo / "promptseg_image" / "config.pbtxt").read_text())
    assert image.backend == "onnxruntime" and image.max_batch_size == 64
    assert {t.name: list(t.dims) for t in image.input} == {"image": [1, r, r], "film": [p]}
    assert [t.name for t in image.output] == [s.name for s in folder.outputs]
    assert image.HasField("dynamic_batching")
    film = parse_config((repo / "promptseg_film" / "config.pbtxt").read_text())
    assert film.backend == "python" and list(film.output[0].dims) == [p]
    ensemble = parse_config((repo / "promptseg" / "config.pbtxt").read_text())
    assert ensemble.platform == "ensemble"
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["promptseg_film", "promptseg_image"]
    assert dict(steps[1].input_map) == {"image": "image", "film": "film"}
    assert dict(steps[0].output_map) == {"film": "film"}
    plan = parse_config(image_config(folder, PLAN_MODEL, 8, plan=True))
    assert plan.platform == "tensorrt_plan" and plan.max_batch_size == 8
    digest = hashlib.sha256((repo / "promptseg_image" / "1" / "model.onnx").read_bytes())
    assert digest.hexdigest() == folder.manifest["files"]["model.onnx"]["sha256"]
    # A mistyped field is refused by the parser (the check is not vacuous).
    from google.protobuf import text_format

    with pytest.raises(text_format.ParseError):
        parse_config('name: "x"\nbackend: "python"\nmax_batch: 4\n')


def test_a_used_repo_folder_is_refused(repo: Path) -> None:
    proc = _export(DEFAULT_ENGINE_DIR, "--triton-repo", repo)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"promptseg-export: error: {repo}: exists and is not an empty folder; "
        "choose a new --triton-repo"
    )


def test_python_backend_model_answers_in_pytritons_server(repo: Path, tmp_path: Path) -> None:
    pytest.importorskip("pytriton")
    http = pytest.importorskip("tritonclient.http")
    from promptseg.runtime import EngineFolder, PromptResolver
    from promptseg.runtime.serve_process import BundledTriton

    server = BundledTriton(repo, ["promptseg_film"], tmp_path, tmp_path / "tritonserver.log")
    client = http.InferenceServerClient(server.url)
    try:

        def film(*prompts: str):
            arr = np.array([[p.encode()] for p in prompts], dtype=np.object_)
            item = http.InferInput("prompt", list(arr.shape), "BYTES")
            item.set_data_from_numpy(arr)
            return client.infer("promptseg_film", [item]).as_numpy("film")

        resolver = PromptResolver(EngineFolder.open(DEFAULT_ENGINE_DIR))
        got = film("liver", "  Segment the SPLEEN. ")
        assert got.shape == (2, resolver.cache.film.shape[1])
        np.testing.assert_array_equal(got[0], resolver.resolve("liver").film)
        np.testing.assert_array_equal(got[1], resolver.resolve("segment the spleen").film)
        with pytest.raises(Exception) as info:
            film("xyzzy grob")
        message = info.value.message()
        assert "'xyzzy grob' is not in the prompt cache" in message and "spleen" in message
        assert film("right kidney").shape[0] == 1  # still serving
        assert server.ready()
    finally:
        client.close()
        code = server.stop()
    assert code == 0, server.tail()
