"""The C++ host (cpp/): CMake build, ctest, and promptseg_inspect against Python's reading.

The build runs once per session into a pytest temporary folder (or into
``$PROMPTSEG_CPP_BUILD_DIR`` when set, to reuse an earlier build while developing). Engine folders are written here
with Python (safetensors + hashlib), so these tests do not depend on the export code; when
``promptseg.export.export_model`` imports, a real export of the tiny checkpoint is checked too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from promptseg.preprocess import Preprocessing
from promptseg.prompts import PromptVocabulary

REPO = Path(__file__).resolve().parents[1]
CPP = REPO / "cpp"
BUILD_TIMEOUT_S = 900  # generous: the CI machines share 2 cores with other jobs
STATUS_PREFIX = "promptseg: TensorRT host promptseg_trt:"

# Tiny-preset layout (widths [4, 8, 8, 16], fusion film+cbn): P = 4 * 16 + 2 * 4 = 72.
LAYOUT = [
    ("film_gamma", 16),
    ("film_beta", 16),
    ("cbn_gamma", 16),
    ("cbn_beta", 16),
    ("dec_gamma", 4),
    ("dec_beta", 4),
]
RESOLUTION = 32
EMBED_DIM = 384
NON_ASCII_PROMPT = "Segmentez le foie (h\u00e9patique)"


def _nice(cmd: list[object]) -> list[object]:
    """Run at niceness 15 (the build shares the CPUs with other jobs), without stacking a second
    increment on a process that is already niced."""
    increment = 15 - os.nice(0) if hasattr(os, "nice") else 0
    if increment <= 0 or shutil.which("nice") is None:
        return cmd
    return ["nice", "-n", str(increment), *cmd]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LC_ALL": "C"}


def _run(
    cmd: list[object], timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command; on timeout kill its whole process group (make and compilers too)."""
    args = [str(c) for c in cmd]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=_env(),
        cwd=cwd,
        start_new_session=os.name == "posix",
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Configure and build cpp/ once (Release, warnings as errors); the build folder + log."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found on PATH; the C++ host cannot be built")
    compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        pytest.skip("no C++ compiler found (CXX, c++, g++, clang++)")
    # PROMPTSEG_CPP_BUILD_DIR reuses (and incrementally rebuilds) a build folder during
    # development; by default every session builds from clean, as CI does.
    reuse = os.environ.get("PROMPTSEG_CPP_BUILD_DIR")
    build = Path(reuse).absolute() if reuse else tmp_path_factory.mktemp("cpp_build")
    configure = _run(
        _nice(
            [cmake, "-S", CPP, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DPROMPTSEG_WERROR=ON"]
        ),
        timeout=BUILD_TIMEOUT_S,
    )
    assert configure.returncode == 0, (
        f"cmake configure failed:\n{configure.stdout}\n{configure.stderr}"
    )
    compile_ = _run(_nice([cmake, "--build", build, "-j2"]), timeout=BUILD_TIMEOUT_S)
    assert compile_.returncode == 0, (
        f"cmake build failed:\n{compile_.stdout[-4000:]}\n{compile_.stderr[-4000:]}"
    )
    inspect = build / ("promptseg_inspect.exe" if os.name == "nt" else "promptseg_inspect")
    assert inspect.is_file(), f"{inspect} was not built"
    return {"dir": build, "inspect": inspect, "configure_log": configure.stdout}


# ----------------------------------------------------------------------------- engine folders


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_prompts() -> list[tuple[str, str]]:
    """Every phrasing of the real vocabulary plus one non-ASCII prompt, with targets."""
    vocab = PromptVocabulary()
    pairs = [(vocab.canonical(t), t) for t in vocab.targets]
    seen = {p for p, _ in pairs}
    pairs += [(p, t) for p, t in vocab.all_prompts().items() if p not in seen]
    pairs.append((NON_ASCII_PROMPT, "liver"))
    return pairs


def _write_manifest(
    folder: Path,
    film_dim: int,
    embed_dim: int,
    targets: list[str],
    presence_thresholds: dict[str, float] | None = None,
) -> Path:
    """manifest.json per docs/engine_format.md, listing every other file with sha256 + bytes.

    With ``presence_thresholds`` the image graph gets the second output ``presence`` [N, 1]
    and the manifest those thresholds, as newer exports write them.
    """
    files = {
        p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
    offsets = np.cumsum([0] + [size for _, size in LAYOUT])
    manifest = {
        "format": "promptseg-engine",
        "version": 1,
        "created": "2024-01-01T00:00:00+00:00",
        "checkpoint": {"path": "tests", "sha256": "0" * 64},
        "resolution": RESOLUTION,
        "inputs": [
            {"name": "image", "shape": ["N", 1, RESOLUTION, RESOLUTION], "dtype": "float32"},
            {"name": "film", "shape": ["N", film_dim], "dtype": "float32"},
        ],
        "outputs": [
            {"name": "logits", "shape": ["N", 1, RESOLUTION, RESOLUTION], "dtype": "float32"}
        ],
        "film_dim": film_dim,
        "embed_dim": embed_dim,
        "film_layout": [
            {"name": name, "offset": int(offsets[i]), "size": size}
            for i, (name, size) in enumerate(LAYOUT)
        ],
        "preprocessing": Preprocessing(resolution=RESOLUTION).to_dict(),
        "orientation": {
            "axcodes": "LAS",
            "description": "rows: patient right -> left; columns: posterior -> anterior; "
            "slices: inferior -> superior",
        },
        "targets": targets,
        "graphs": {"fp32": "model.onnx"},
        "opset": 17,
        "files": files,
    }
    if presence_thresholds is not None:
        manifest["outputs"].append({"name": "presence", "shape": ["N", 1], "dtype": "float32"})
        manifest["presence_thresholds"] = presence_thresholds
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return path


def _write_engine(
    folder: Path, seed: int = 0, presence_thresholds: dict[str, float] | None = None
) -> dict[str, object]:
    """A contract-shaped engine folder (manifest + prompt cache) with float32 values that stress
    printing: normal, tiny, huge, negative zero (and the presence output with
    ``presence_thresholds`` when given)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    pairs = _cache_prompts()
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    film_dim = sum(size for _, size in LAYOUT)
    rng = np.random.default_rng(seed)
    film = rng.normal(0.0, 1.0, (len(prompts), film_dim)).astype(np.float32)
    film[:, 0] = 1.0 + rng.normal(0, 1e-3, len(prompts))  # gammas near 1
    film[0, 1], film[0, 2], film[0, 3] = 3.0e-39, -1.0e30, -0.0
    embedding = rng.normal(0.0, 0.05, (len(prompts), EMBED_DIM)).astype(np.float32)
    save_file(
        {"film": film, "embedding": embedding},
        str(folder / "prompt_cache.safetensors"),
        metadata={
            "format": "promptseg-prompt-cache",
            "version": "1",
            "prompts": json.dumps(prompts),
            "targets": json.dumps(targets),
            "film_dim": str(film_dim),
            "embed_dim": str(EMBED_DIM),
        },
    )
    vocab_targets = list(PromptVocabulary().targets)
    _write_manifest(folder, film_dim, EMBED_DIM, vocab_targets, presence_thresholds)
    return {"dir": folder, "prompts": prompts, "targets": targets, "film": film}


def _python_view(folder: Path) -> dict[str, object]:
    """What Python reads from an engine folder: the manifest and the cache's tensors/metadata."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    cache_path = folder / "prompt_cache.safetensors"
    with safe_open(str(cache_path), framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(str(cache_path))
    return {
        "manifest": json.loads((folder / "manifest.json").read_text(encoding="utf-8")),
        "prompts": json.loads(metadata["prompts"]),
        "targets": json.loads(metadata["targets"]),
        "film": tensors["film"],
        "embedding": tensors["embedding"],
    }


def _inspect(
    build: dict[str, object], folder: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return _run([build["inspect"], folder, *args])


def _inspect_json(build: dict[str, object], folder: Path, *args: str) -> dict:
    result = _inspect(build, folder, *args)
    assert result.returncode == 0, (
        f"promptseg_inspect failed ({result.returncode}): {result.stderr}"
    )
    return json.loads(result.stdout)


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert lines[0].startswith("promptseg_inspect: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def _compare_with_python(report: dict, view: dict[str, object], folder: Path) -> None:
    """Manifest summary and cache counts from C++ equal Python's reading of the same files."""
    manifest = view["manifest"]
    assert report["format"] == "promptseg-engine" and report["version"] == 1
    assert report["resolution"] == manifest["resolution"]
    assert report["film_dim"] == manifest["film_dim"]
    assert report["embed_dim"] == manifest["embed_dim"]
    assert report["film_layout"] == [
        {"name": s["name"], "offset": s["offset"], "size": s["size"]}
        for s in manifest["film_layout"]
    ]
    assert report["inputs"] == [
        {"name": t["name"], "shape": t["shape"], "dtype": t["dtype"]} for t in manifest["inputs"]
    ]
    assert report["outputs"] == [
        {"name": t["name"], "shape": t["shape"], "dtype": t["dtype"]} for t in manifest["outputs"]
    ]
    pre = manifest["preprocessing"]
    assert report["preprocessing"]["ct_window"] == list(pre["ct_window"])
    assert report["preprocessing"]["mr_percentiles"] == list(pre["mr_percentiles"])
    assert report["orientation"] == manifest["orientation"]["axcodes"] == "LAS"
    assert report["targets"] == manifest["targets"]
    assert report["presence_output"] == ("presence" in [t["name"] for t in manifest["outputs"]])
    assert report["presence_thresholds"] == manifest.get("presence_thresholds", {})
    assert report["graphs"] == {k: v for k, v in manifest["graphs"].items() if v is not None}
    assert (report["tensorrt"] is None) == ("tensorrt" not in manifest)
    assert {f["name"]: f["sha256"] for f in report["files"]} == {
        name: entry["sha256"] for name, entry in manifest["files"].items()
    }
    for name, entry in manifest["files"].items():
        assert _sha256(folder / name) == entry["sha256"]
    film = view["film"]
    assert report["cache"]["prompts"] == len(view["prompts"]) == film.shape[0]
    assert report["cache"]["film_dim"] == film.shape[1] == manifest["film_dim"]
    assert report["cache"]["embed_dim"] == view["embedding"].shape[1]
    assert report["cache"]["targets"] == list(dict.fromkeys(view["targets"]))


def _check_lookups(report: dict, view: dict[str, object], expected: list[tuple[str, str, str]]):
    """Each lookup equals Python's row bit for bit: (asked, cached string, match kind)."""
    prompts, targets, film = view["prompts"], view["targets"], view["film"]
    assert len(report["lookups"]) == len(expected)
    for lookup, (asked, cached, kind) in zip(report["lookups"], expected):
        row = prompts.index(cached)
        assert lookup["prompt"] == asked
        assert lookup["matched"] == cached
        assert lookup["match"] == kind
        assert lookup["index"] == row
        assert lookup["target"] == targets[row]
        taus = view["manifest"].get("presence_thresholds", {})
        assert lookup["presence_threshold"] == taus.get(targets[row])
        assert lookup["length"] == film.shape[1]
        values = np.asarray(lookup["values"], dtype=np.float64)
        expected_row = film[row].astype(np.float64)
        np.testing.assert_array_equal(values, expected_row[: len(values)])
        assert np.signbit(values).tolist() == np.signbit(expected_row[: len(values)]).tolist()
        assert lookup["l2_norm"] == pytest.approx(np.linalg.norm(expected_row), rel=1e-12)
        assert lookup["sum"] == pytest.approx(expected_row.sum(), rel=1e-9, abs=1e-9)


# ----------------------------------------------------------------------------- tests


def test_configure_reports_tensorrt_host(cpp_build):
    lines = [line for line in str(cpp_build["configure_log"]).splitlines() if STATUS_PREFIX in line]
    assert len(lines) == 1, cpp_build["configure_log"]
    assert ": built (TensorRT " in lines[0] or ": not built: " in lines[0], lines[0]
    built = (Path(cpp_build["dir"]) / "promptseg_trt").is_file()
    assert built == (": built (" in lines[0])


def test_ctest_reader(cpp_build):
    ctest = shutil.which("ctest") or str(Path(shutil.which("cmake") or "cmake").with_name("ctest"))
    result = _run([ctest, "--output-on-failure"], timeout=BUILD_TIMEOUT_S, cwd=cpp_build["dir"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout


def test_inspect_matches_python_on_written_engine(cpp_build, tmp_path):
    engine = _write_engine(tmp_path / "engine")
    view = _python_view(engine["dir"])
    vocab = PromptVocabulary()
    asked = [
        ("Segment the liver", "Segment the liver", "exact"),
        ("Segment the left kidney", "Segment the left kidney", "exact"),
        ("Where is the right kidney?", "Where is the right kidney?", "exact"),
        ("  segment THE   spleen  ", "Segment the spleen", "normalized"),
        ("Outline the glioma.", "Outline the glioma", "normalized"),
        (NON_ASCII_PROMPT, NON_ASCII_PROMPT, "exact"),
        (vocab.heldout_prompts("pituitary tumour")[0],) * 2 + ("exact",),
    ]
    args = [a for prompt, _, _ in asked for a in ("--prompt", prompt)]
    report = _inspect_json(cpp_build, engine["dir"], "--verify", "--values", "all", *args)
    assert report["verified"] is True
    _compare_with_python(report, view, engine["dir"])
    _check_lookups(report, view, asked)
    # The extreme values of row 0 (subnormal, huge, negative zero) survive printing.
    first = _inspect_json(cpp_build, engine["dir"], "--prompt", view["prompts"][0])
    assert len(first["lookups"][0]["values"]) == 8  # the default head
    np.testing.assert_array_equal(np.float32(first["lookups"][0]["values"]), view["film"][0, :8])


def test_inspect_normalisation_agrees_with_python_runtime(cpp_build, tmp_path):
    resolver = pytest.importorskip("promptseg.runtime.prompt_resolver")
    engine = _write_engine(tmp_path / "engine")
    view = _python_view(engine["dir"])
    keys: dict[str, int] = {}
    for i, p in enumerate(view["prompts"]):
        keys.setdefault(resolver.normalise_prompt(p), i)
    variants = ["WHERE IS THE LIVER ?", "find the  Spleen!!", "left kidney", "Hepatic lesion."]
    args = [a for v in variants for a in ("--prompt", v)]
    report = _inspect_json(cpp_build, engine["dir"], *args)
    for variant, lookup in zip(variants, report["lookups"]):
        assert lookup["index"] == keys[resolver.normalise_prompt(variant)], variant


def test_inspect_error_paths(cpp_build, tmp_path):
    engine = _write_engine(tmp_path / "engine")
    folder: Path = engine["dir"]
    cache = folder / "prompt_cache.safetensors"
    original = cache.read_bytes()

    # Unknown prompt: names the cache and lists the known targets.
    line = _assert_one_line_error(
        _inspect(cpp_build, folder, "--prompt", "segment the pancreas"),
        "prompt_cache.safetensors",
        '"segment the pancreas"',
        "known targets: liver, spleen",
    )
    assert "pituitary tumour" in line

    # One byte of film data changed, same size: only --verify notices.
    flipped = bytearray(original)
    flipped[-1] ^= 0x01
    cache.write_bytes(bytes(flipped))
    assert _inspect(cpp_build, folder).returncode == 0
    _assert_one_line_error(_inspect(cpp_build, folder, "--verify"), str(cache), "sha256 mismatch")

    def rehash() -> None:
        """Re-list the files as they are now, so that only the cache reader can object."""
        (folder / "manifest.json").unlink()
        film_dim = sum(size for _, size in LAYOUT)
        _write_manifest(folder, film_dim, EMBED_DIM, list(PromptVocabulary().targets))

    # Truncated cache: the size check names it even without --verify ...
    cache.write_bytes(original[:-100])
    _assert_one_line_error(_inspect(cpp_build, folder), str(cache), f"lists {len(original)}")
    # ... and with a manifest re-hashed for the truncated file, the reader itself refuses it.
    rehash()
    _assert_one_line_error(_inspect(cpp_build, folder, "--verify"), str(cache), "truncated")

    # A header length that runs past the end of the file; a header that is not JSON.
    cache.write_bytes((10**6).to_bytes(8, "little") + original[8:64])
    rehash()
    _assert_one_line_error(_inspect(cpp_build, folder), str(cache), "runs past the end")
    cache.write_bytes((8).to_bytes(8, "little") + b"not json")
    rehash()
    _assert_one_line_error(_inspect(cpp_build, folder), str(cache), "header: invalid JSON")

    # Missing file.
    cache.unlink()
    _assert_one_line_error(_inspect(cpp_build, folder), str(cache), "missing")
    cache.write_bytes(original)

    # Manifest problems name manifest.json and the field.
    manifest_path = folder / "manifest.json"
    good = json.loads(manifest_path.read_text(encoding="utf-8"))
    good["files"]["prompt_cache.safetensors"] = {"sha256": _sha256(cache), "bytes": len(original)}
    broken = {**good, "film_layout": good["film_layout"][:-1]}
    manifest_path.write_text(json.dumps(broken), encoding="utf-8")
    _assert_one_line_error(_inspect(cpp_build, folder), "manifest.json", "field 'film_layout'")
    manifest_path.write_text(json.dumps({**good, "film_dim": 73}), encoding="utf-8")
    _assert_one_line_error(
        _inspect(cpp_build, folder), "manifest.json", "field 'inputs[1].shape[1]'"
    )
    manifest_path.write_text(json.dumps(good)[:-20], encoding="utf-8")
    _assert_one_line_error(_inspect(cpp_build, folder), "manifest.json", "invalid JSON at line 1")
    manifest_path.write_text(json.dumps(good), encoding="utf-8")
    assert _inspect(cpp_build, folder, "--verify").returncode == 0

    # Bad command lines and folders.
    _assert_one_line_error(_run([cpp_build["inspect"]]), "missing ENGINE_DIR")
    _assert_one_line_error(_inspect(cpp_build, folder, "--bogus"), "unknown option '--bogus'")
    _assert_one_line_error(_inspect(cpp_build, tmp_path / "nowhere"), "nowhere", "not a directory")


def test_inspect_reads_presence_output_and_thresholds(cpp_build, tmp_path):
    """Newer engines: the ``presence`` output and per-target thresholds, as Python reads them;
    older engines: neither."""
    taus = {"liver": 0.35, "spleen": 0.6, "left kidney": 1.0, "glioma": 0.0}
    engine = _write_engine(tmp_path / "engine", presence_thresholds=taus)
    view = _python_view(engine["dir"])
    asked = [
        ("Segment the liver", "Segment the liver", "exact"),
        ("Segment the right kidney", "Segment the right kidney", "exact"),
        ("segment the spleen.", "Segment the spleen", "normalized"),
    ]
    args = [a for prompt, _, _ in asked for a in ("--prompt", prompt)]
    report = _inspect_json(cpp_build, engine["dir"], "--verify", *args)
    _compare_with_python(report, view, engine["dir"])
    _check_lookups(report, view, asked)
    assert report["presence_output"] is True
    assert report["outputs"][1] == {"name": "presence", "shape": ["N", 1], "dtype": "float32"}
    assert report["presence_thresholds"] == taus
    assert [lookup["presence_threshold"] for lookup in report["lookups"]] == [0.35, None, 0.6]

    older = _inspect_json(cpp_build, _write_engine(tmp_path / "older")["dir"], *args)
    assert older["presence_output"] is False and older["presence_thresholds"] == {}
    assert len(older["outputs"]) == 1
    assert [lookup["presence_threshold"] for lookup in older["lookups"]] == [None] * 3


def test_inspect_refuses_bad_presence_fields(cpp_build, tmp_path):
    """A bad threshold or presence output: exit 2, one line naming manifest.json and the field."""
    engine = _write_engine(tmp_path / "engine", presence_thresholds={"liver": 0.5})
    manifest_path = Path(engine["dir"]) / "manifest.json"
    good = json.loads(manifest_path.read_text(encoding="utf-8"))
    logits_only = good["outputs"][:1]
    presence = dict(good["outputs"][1])
    cases = [
        ({"presence_thresholds": {"liver": 1.5}}, "field 'presence_thresholds.liver'", "[0, 1]"),
        ({"presence_thresholds": {"liver": "high"}}, "field 'presence_thresholds.liver'", "string"),
        ({"presence_thresholds": [0.5]}, "field 'presence_thresholds'", "an object"),
        (
            {"outputs": [*logits_only, {**presence, "shape": ["N", 1, 1]}]},
            "field 'outputs[1].shape'",
            "[N, 1]",
        ),
        (
            {"outputs": [*logits_only, {**presence, "shape": ["N", 2]}]},
            "field 'outputs[1].shape[1]'",
            "expected 1",
        ),
        (
            {"outputs": [*logits_only, {**presence, "name": "scores"}]},
            "field 'outputs'",
            "presence",
        ),
    ]
    for change, *fragments in cases:
        manifest_path.write_text(json.dumps({**good, **change}), encoding="utf-8")
        _assert_one_line_error(_inspect(cpp_build, engine["dir"]), "manifest.json", *fragments)
    manifest_path.write_text(json.dumps(good), encoding="utf-8")
    assert _inspect(cpp_build, engine["dir"]).returncode == 0


def test_vendored_libraries_are_unchanged_upstream_copies():
    """cpp/third_party holds nlohmann/json and PicoSHA2 as released, with their MIT licences;
    third_party/README.md records the versions and the hashes checked here."""
    third = CPP / "third_party"
    readme = (third / "README.md").read_text(encoding="utf-8")
    recorded = {
        path: digest for digest, path in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M)
    }
    assert set(recorded) == {
        "nlohmann_json/include/nlohmann/json.hpp",
        "picosha2/include/picosha2.h",
    }
    for path, digest in recorded.items():
        assert _sha256(third / path) == digest, f"{path} differs from the recorded upstream copy"
    for licence in ("nlohmann_json/LICENSE.MIT", "picosha2/LICENSE"):
        assert (third / licence).read_text(encoding="utf-8").startswith("MIT License")
    header = (third / "nlohmann_json/include/nlohmann/json.hpp").read_text(encoding="utf-8")
    version = ".".join(
        re.search(rf"#define NLOHMANN_JSON_VERSION_{part} (\d+)", header).group(1)
        for part in ("MAJOR", "MINOR", "PATCH")
    )
    assert f"v{version}" in readme


@pytest.mark.slow
def test_inspect_matches_python_on_real_export(cpp_build, tiny_checkpoint, tmp_path):
    export = pytest.importorskip("promptseg.export")
    if not hasattr(export, "export_model"):
        pytest.skip("promptseg.export.export_model is not available yet")
    manifest_path = export.export_model(
        tiny_checkpoint, tmp_path / "engine", verify=False, progress=False
    )
    folder = Path(manifest_path).parent
    view = _python_view(folder)
    vocab = PromptVocabulary()
    asked = [(vocab.canonical(t), vocab.canonical(t), "exact") for t in vocab.targets[:4]]
    asked.append(("segment the LIVER ", "Segment the liver", "normalized"))
    args = [a for prompt, _, _ in asked for a in ("--prompt", prompt)]
    report = _inspect_json(cpp_build, folder, "--verify", "--values", "all", *args)
    assert report["verified"] is True
    _compare_with_python(report, view, folder)
    _check_lookups(report, view, asked)
    # The seeded FiLM heads are non-trivial, so different targets get different vectors.
    liver, spleen = report["lookups"][0]["values"], report["lookups"][1]["values"]
    assert liver != spleen


def test_inspect_follows_the_engine_format_schema(cpp_build, tmp_path):
    """The C++ host accepts what docs/engine_format.schema.json allows and refuses the rest."""
    from test_engine_format import engine_copy, engine_variants

    for name, (manifest, allowed) in engine_variants().items():
        folder = engine_copy(tmp_path / name, manifest)
        result = _inspect(cpp_build, folder)
        if allowed:
            assert result.returncode == 0, (name, result.stderr)
        else:
            _assert_one_line_error(result, "manifest.json")
