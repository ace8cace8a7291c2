"""The engine format: one schema that export, the Python runtime and the C++ host all follow.

The C++ host's side of the same variants is in ``tests/test_cpp_host.py``
(``test_inspect_follows_the_engine_format_schema``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from promptseg.data.readers import InputError
from promptseg.runtime.engine_format import manifest_schema, schema_problems
from promptseg.runtime.manifest import DEFAULT_ENGINE_DIR, EngineFolder

REPO = Path(__file__).resolve().parents[1]


def engine_variants() -> dict[str, tuple[dict, bool]]:
    """name -> (manifest built from the packaged one, whether the format allows it)."""
    packaged = json.loads((DEFAULT_ENGINE_DIR / "manifest.json").read_text(encoding="utf-8"))
    base = copy.deepcopy(packaged)  # an older export: none of the optional fields
    base["outputs"] = base["outputs"][:1]
    for key in ("presence_thresholds", "prompt_groups"):
        base.pop(key, None)
    base["prompt_refusal"].pop("ambiguity_margin", None)
    newer = copy.deepcopy(base)  # the optional fields of newer exports
    newer["outputs"].append({"name": "presence", "shape": ["N", 1], "dtype": "float32"})
    newer["presence_thresholds"] = {t: 0.5 for t in base["targets"]}
    newer["prompt_groups"] = {"kidneys": {"members": ["left kidney", "right kidney"],
                                          "phrasings": ["kidneys"]}}  # fmt: skip
    newer["prompt_refusal"]["ambiguity_margin"] = 0.12
    version = copy.deepcopy(base)
    version["version"] = 2
    film = copy.deepcopy(base)
    film["film_dim"] = 0
    digest = copy.deepcopy(base)
    digest["files"]["model.onnx"]["sha256"] = "not hex"
    output = copy.deepcopy(base)
    output["outputs"][0]["name"] = "mask"
    tau = copy.deepcopy(newer)
    tau["presence_thresholds"]["liver"] = 1.5
    presence_rank = copy.deepcopy(newer)
    presence_rank["outputs"][1]["shape"] = ["N", 1, 1]
    return {
        "packaged": (packaged, True),
        "older": (base, True),
        "newer": (newer, True),
        "version": (version, False),
        "film_dim": (film, False),
        "sha256": (digest, False),
        "output_name": (output, False),
        "presence_threshold": (tau, False),
        "presence_rank": (presence_rank, False),
    }


def engine_copy(folder: Path, manifest: dict) -> Path:
    """The packaged engine's files (symlinked) with ``manifest`` as its manifest.json."""
    folder.mkdir()
    for p in DEFAULT_ENGINE_DIR.iterdir():
        if p.is_file() and p.name != "manifest.json":
            os.symlink(p, folder / p.name)
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def test_docs_schema_is_the_module_schema() -> None:
    on_disk = json.loads((REPO / "docs" / "engine_format.schema.json").read_text("utf-8"))
    assert on_disk == manifest_schema(), (
        "docs/engine_format.schema.json is stale: "
        "python -m promptseg.runtime.engine_format docs/engine_format.schema.json"
    )


@pytest.mark.parametrize("name", list(engine_variants()))
def test_runtime_follows_the_schema(name: str, tmp_path: Path) -> None:
    manifest, allowed = engine_variants()[name]
    assert (schema_problems(manifest) == []) is allowed, schema_problems(manifest)
    folder = engine_copy(tmp_path / name, manifest)
    if allowed:
        opened = EngineFolder.open(folder)
        assert [s.name for s in opened.outputs][0] == "logits"
    else:
        with pytest.raises(InputError) as info:
            EngineFolder.open(folder)
        assert "manifest.json" in str(info.value) and "\n" not in str(info.value)
