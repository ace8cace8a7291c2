"""promptseg.runtime in-process: engine contract, ORT vs PyTorch parity, prompt resolution,
orientation round trips and the segmentation pipeline.

Engine folders are built once per session with the real exporter
(``promptseg.export.export_model``) from the tiny test checkpoint.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from promptseg.data.readers import InputError, Volume, read_volume
from promptseg.preprocess import normalize, resize_bilinear
from promptseg.runtime import (
    BackendError,
    EngineFolder,
    Image2D,
    OrtEngine,
    PromptCache,
    PromptError,
    PromptResolver,
    TensorSpec,
    TorchEngine,
    TrtEngine,
    check_inputs,
    choose_modality,
    normalise_prompt,
    reorientation,
    segment,
    select_backend,
)
from promptseg.runtime.engines import plan_precision
from promptseg.runtime.manifest import IntegrityError, sha256_file
from promptseg.runtime.orientation import volume_reorientation
from promptseg.runtime.pipeline import LabelVotes, logit_cutoff

CHAOS_1 = Path("chaos-mr-t2spir") / "image_1.nii.gz"


# --------------------------------------------------------------------------- fixtures


def export_engine_once(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    """Export ``checkpoint`` with the real exporter once per session (shared by the runtime tests)."""
    export = pytest.importorskip("promptseg.export", reason="promptseg.export is not importable")
    if not hasattr(export, "export_model"):
        pytest.skip("promptseg.export.export_model is not available yet")
    out = tmp_path_factory.getbasetemp() / "runtime-tiny-engine"
    if not (out / "manifest.json").is_file():
        export.export_model(checkpoint, out, verify=False, progress=False)
    return out


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    return export_engine_once(tmp_path_factory, tiny_checkpoint)


@pytest.fixture(scope="session")
def folder(engine_dir: Path) -> EngineFolder:
    return EngineFolder.open(engine_dir)


@pytest.fixture(scope="session")
def resolver(folder: EngineFolder) -> PromptResolver:
    return PromptResolver(folder, threads=1)


@pytest.fixture(scope="session")
def chaos_volume(data_root: Path) -> Volume:
    return read_volume(data_root / CHAOS_1)


def _copy_engine(engine_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "engine"
    shutil.copytree(engine_dir, dst)
    return dst


def _rehash(engine: Path, name: str) -> None:
    """Update the manifest entry of ``name`` after the test changed the file on purpose."""
    manifest = json.loads((engine / "manifest.json").read_text())
    p = engine / name
    manifest["files"][name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    (engine / "manifest.json").write_text(json.dumps(manifest))


def _slices(volume: Volume, folder: EngineFolder, count: int = 5) -> np.ndarray:
    """Real CHAOS slices at model resolution: (count, 1, R, R) float32."""
    data = normalize(volume.data, "mr", folder.preprocessing).transpose(2, 0, 1)
    pick = np.linspace(5, data.shape[0] - 5, count).astype(int)
    r = folder.resolution
    return np.ascontiguousarray(resize_bilinear(data[pick], (r, r))[:, None])


# --------------------------------------------------------------------------- engine contract


def test_engine_folder_reads_the_contract(folder: EngineFolder) -> None:
    assert [s.name for s in folder.inputs] == ["image", "film"]
    assert folder.inputs[0].shape[1:] == (1, folder.resolution, folder.resolution)
    assert folder.inputs[1].shape[1:] == (folder.film_dim,)
    assert isinstance(folder.inputs[0].shape[0], str)  # dynamic batch
    assert folder.axcodes == "LAS"
    assert len(folder.manifest_sha256) == 64
    assert "liver" in folder.targets


def test_check_inputs_reports_what_it_expected() -> None:
    specs = (
        TensorSpec("image", ("N", 1, 8, 8), np.dtype(np.float32)),
        TensorSpec("film", ("N", 4), np.dtype(np.float32)),
    )
    good = {"image": np.zeros((3, 1, 8, 8), np.float32), "film": np.zeros((3, 4), np.float32)}
    assert check_inputs(specs, good) == 3
    cases = [
        ({"image": good["image"]}, r"missing \['film'\].*expected image float32 \[N, 1, 8, 8\]"),
        ({**good, "extra": good["film"]}, r"unexpected \['extra'\]"),
        (
            {**good, "image": good["image"].astype(np.float64)},
            r"'image' has dtype float64; expected float32",
        ),
        (
            {**good, "image": np.zeros((3, 8, 8), np.float32)},
            r"shape \(3, 8, 8\); expected 4 dimensions",
        ),
        (
            {**good, "image": np.zeros((3, 1, 8, 9), np.float32)},
            r"expected image float32 \[N, 1, 8, 8\]",
        ),
        ({**good, "film": np.zeros((2, 4), np.float32)}, r"N=2 .* another input has N=3"),
        ({**good, "film": [[0.0] * 4] * 3}, r"'film' is a list; expected a numpy array"),
    ]
    for inputs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            check_inputs(specs, inputs)


def test_ort_engine_contract_errors(folder: EngineFolder) -> None:
    with OrtEngine(folder, threads=1) as engine:
        r = folder.resolution
        with pytest.raises(ValueError, match="expected image float32"):
            engine.infer(
                {
                    "image": np.zeros((2, 1, r + 1, r), np.float32),
                    "film": np.zeros((2, folder.film_dim), np.float32),
                }
            )
        with pytest.raises(ValueError, match="dtype float64"):
            engine.infer(
                {
                    "image": np.zeros((2, 1, r, r)),
                    "film": np.zeros((2, folder.film_dim), np.float32),
                }
            )
        assert engine.backend == "ort-cpu" and engine.providers == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        OrtEngine(folder, precision="fp8")


def test_missing_graph_precision_lists_available(folder: EngineFolder) -> None:
    missing = [p for p in ("fp16", "int8") if p not in folder.manifest["graphs"]]
    if not missing:
        pytest.skip("this engine folder has every precision")
    with pytest.raises(InputError, match=f"no {missing[-1]} image graph.*available: fp32"):
        OrtEngine(folder, precision=missing[-1])


@pytest.mark.parametrize("batch", [1, 3])
def test_ort_matches_torch(
    folder: EngineFolder,
    resolver: PromptResolver,
    chaos_volume: Volume,
    tiny_checkpoint: Path,
    batch: int,
) -> None:
    images = _slices(chaos_volume, folder, batch)
    with (
        OrtEngine(folder, threads=1) as ort_engine,
        TorchEngine(tiny_checkpoint, device="cpu") as torch_engine,
    ):
        assert torch_engine.inputs == ort_engine.inputs
        outputs = []
        for prompt in ("liver", "left kidney", "glioma"):
            film = np.repeat(resolver.resolve(prompt).film[None], batch, axis=0)
            a = ort_engine.infer({"image": images, "film": film})["logits"]
            b = torch_engine.infer({"image": images, "film": film})["logits"]
            assert a.shape == (batch, 1, folder.resolution, folder.resolution)
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
            outputs.append(a)
        assert not np.allclose(outputs[0], outputs[1], atol=1e-6)  # prompts change the output


def test_torch_engine_from_engine_folder(folder: EngineFolder) -> None:
    engine = TorchEngine.from_engine(folder)
    assert engine.backend == "torch" and engine.precision == "fp32"
    broken = EngineFolder(
        folder.path,
        {**folder.manifest, "checkpoint": {"path": "/nonexistent.pt", "sha256": "0" * 64}},
        folder.manifest_sha256,
        folder.inputs,
        folder.outputs,
        folder.preprocessing,
    )
    with pytest.raises(InputError, match="needs the checkpoint this engine was exported from"):
        TorchEngine.from_engine(broken)


def test_select_backend(folder: EngineFolder) -> None:
    with pytest.raises(
        ValueError, match="unknown backend 'onnx'; valid: auto, tensorrt, ort-cuda, ort-cpu, torch"
    ):
        select_backend("onnx", folder)
    with select_backend("ort-cpu", folder, threads=1) as engine:
        assert engine.backend == "ort-cpu" and engine.precision == "fp32"
    import onnxruntime as ort

    with select_backend("auto", folder, threads=1) as engine:
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        assert engine.backend in (("ort-cuda", "tensorrt") if has_cuda else ("ort-cpu", "tensorrt"))
        if engine.backend == "ort-cpu":
            assert any("tensorrt skipped" in n for n in engine.notes)
    if not has_cuda:
        with pytest.raises(BackendError, match="CUDAExecutionProvider is not available"):
            select_backend("ort-cuda", folder)


def test_tensorrt_backend_without_tensorrt_names_the_extra(folder: EngineFolder) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"promptseg\[trt\]"):
            TrtEngine(folder)
    else:
        pytest.skip("tensorrt is installed; see the trt-marked test")


def test_plan_precision_comes_from_its_source_graph() -> None:
    graphs = {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}
    assert plan_precision({"graphs": graphs, "tensorrt": {"source": "model.onnx"}}) == "fp32"
    assert plan_precision({"graphs": graphs, "tensorrt": {"source": "model.fp16.onnx"}}) == "fp16"
    with pytest.raises(ValueError, match="cannot tell the plan's precision"):
        plan_precision({"graphs": graphs, "tensorrt": {"plan": "model.plan"}})


def test_tensorrt_backend_checks_the_plan_precision(
    folder: EngineFolder, engine_dir: Path, tmp_path: Path
) -> None:
    """A plan built without --fp16 comes from model.onnx: it is fp32, not fp16."""
    path = _copy_engine(engine_dir, tmp_path)
    (path / "model.plan").write_bytes(b"a plan built from model.onnx")
    manifest = {**folder.manifest, "tensorrt": {"plan": "model.plan", "source": "model.onnx"}}
    fp32_plan = EngineFolder(
        path, manifest, folder.manifest_sha256, folder.inputs, folder.outputs, folder.preprocessing
    )
    with pytest.raises(
        BackendError, match=r"plan is fp32 \(built from model\.onnx\) and --precision fp16"
    ):
        select_backend("tensorrt", fp32_plan, "fp16")
    try:
        import tensorrt  # noqa: F401
    except ImportError:  # fp32 is the plan's precision: accepted, then tensorrt is missing
        with pytest.raises(ImportError, match=r"promptseg\[trt\]"):
            select_backend("tensorrt", fp32_plan, "fp32")


@pytest.mark.trt
def test_tensorrt_engine_matches_onnxruntime(
    folder: EngineFolder, resolver: PromptResolver, chaos_volume: Volume
) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    if folder.plan is None:
        pytest.skip("the engine folder has no model.plan (exported without TensorRT)")
    images = _slices(chaos_volume, folder, 4)
    film = np.repeat(resolver.resolve("liver").film[None], 4, axis=0)
    with TrtEngine(folder) as trt_engine, OrtEngine(folder) as ort_engine:
        a = trt_engine.infer({"image": images, "film": film})["logits"]
        b = ort_engine.infer({"image": images, "film": film})["logits"]
        assert trt_engine.precision == plan_precision(folder.manifest)
    np.testing.assert_allclose(a, b, atol=5e-2)


# --------------------------------------------------------------------------- engine folder checks


def test_engine_folder_errors_name_the_file(engine_dir: Path, tmp_path: Path) -> None:
    broken = _copy_engine(engine_dir, tmp_path)
    (broken / "film_generator.onnx").unlink()
    with pytest.raises(InputError, match=r"film_generator\.onnx: missing from the engine folder"):
        EngineFolder.open(broken)
    tampered = _copy_engine(engine_dir, tmp_path / "t")
    with open(tampered / "model.onnx", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    # Hashes are checked on first use: opening works, loading the graph does not.
    opened = EngineFolder.open(tampered)
    with pytest.raises(IntegrityError, match=r"model\.onnx: SHA-256 differs from manifest\.json"):
        opened.graph("fp32")
    with pytest.raises(InputError, match=r"model\.onnx: SHA-256 differs from manifest\.json"):
        OrtEngine(tampered, threads=1)
    assert EngineFolder.open(tampered, verify_hashes=False).graph("fp32").is_file()
    truncated = _copy_engine(engine_dir, tmp_path / "s")
    encoder = truncated / "text_encoder.onnx"
    encoder.write_bytes(encoder.read_bytes()[:-1])
    with pytest.raises(IntegrityError, match=r"text_encoder\.onnx: size \d+ bytes differs"):
        EngineFolder.open(truncated)
    with pytest.raises(InputError, match="engine folder not found"):
        EngineFolder.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"manifest\.json: missing"):
        EngineFolder.open(tmp_path / "empty")


def test_default_engine_missing_says_so() -> None:
    from promptseg.runtime.manifest import DEFAULT_ENGINE_DIR

    if (DEFAULT_ENGINE_DIR / "manifest.json").is_file():
        assert EngineFolder.open(None).path == DEFAULT_ENGINE_DIR
    else:
        with pytest.raises(InputError, match="packaged default engine is missing"):
            EngineFolder.open(None)


def test_corrupted_prompt_cache_names_the_file(engine_dir: Path, tmp_path: Path) -> None:
    engine = _copy_engine(engine_dir, tmp_path)
    cache = engine / "prompt_cache.safetensors"
    cache.write_bytes(cache.read_bytes()[:200])
    _rehash(engine, "prompt_cache.safetensors")
    with pytest.raises(InputError, match=r"prompt_cache\.safetensors: corrupted prompt cache"):
        PromptResolver(engine)


def test_prompt_cache_validates_shapes_and_metadata(engine_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    good = PromptCache.load(engine_dir / "prompt_cache.safetensors")
    k, p = good.film.shape
    meta = {
        "format": "promptseg-prompt-cache",
        "version": "1",
        "prompts": json.dumps(good.prompts),
        "targets": json.dumps(good.targets),
    }
    bad = tmp_path / "bad.safetensors"
    save_file({"film": good.film[:-1], "embedding": good.embedding}, str(bad), metadata=meta)
    with pytest.raises(InputError, match=r"bad\.safetensors: film .* expected"):
        PromptCache.load(bad)
    save_file(
        {"film": good.film, "embedding": good.embedding}, str(bad), metadata={**meta, "format": "x"}
    )
    with pytest.raises(InputError, match="metadata format='x'"):
        PromptCache.load(bad)
    save_file({"film": good.film, "embedding": good.embedding}, str(bad), metadata=meta)
    with pytest.raises(
        InputError, match=f"film_dim {p} differs from the engine manifest's {p + 1}"
    ):
        PromptCache.load(bad, film_dim=p + 1)


def test_text_encoder_hash_is_checked_only_for_a_prompt_outside_the_cache(
    engine_dir: Path, tmp_path: Path
) -> None:
    engine = _copy_engine(engine_dir, tmp_path)
    encoder = engine / "text_encoder.onnx"
    data = bytearray(encoder.read_bytes())
    data[-10] ^= 0xFF  # same size: only the hash can tell
    encoder.write_bytes(bytes(data))
    resolver = PromptResolver(engine, threads=1)
    assert resolver.resolve("Segment the liver").how == "cache"  # the encoder is never read
    with pytest.raises(IntegrityError, match=r"text_encoder\.onnx: SHA-256 differs"):
        resolver.resolve("hepatic organ tissue")


# --------------------------------------------------------------------------- prompt resolution


def test_prompt_cache_hit(resolver: PromptResolver) -> None:
    i = resolver.cache.prompts.index("Segment the liver")
    rp = resolver.resolve("Segment the liver")
    assert rp.how == "cache" and rp.target == "liver"
    np.testing.assert_array_equal(rp.film, resolver.cache.film[i])


def test_prompt_normalised_hit(resolver: PromptResolver) -> None:
    assert normalise_prompt("  Segment   the LIVER. ") == "segment the liver"
    rp = resolver.resolve("  SEGMENT   the liver!! ")
    assert rp.how == "normalised" and rp.target == "liver" and rp.nearest == "Segment the liver"
    held = resolver.resolve("where is the left kidney")  # cached as "Where is the left kidney?"
    assert held.how == "normalised" and held.target == "left kidney"


def test_prompt_encoder_path_matches_torch(
    resolver: PromptResolver, text_encoder, tiny_checkpoint: Path
) -> None:
    import torch

    from promptseg.checkpoint import load_checkpoint

    prompt = "please delineate the entire hepatic organ"
    assert normalise_prompt(prompt) not in {normalise_prompt(p) for p in resolver.cache.prompts}
    embedding = resolver.embed([prompt])[0]
    reference = text_encoder([prompt])[0].numpy()
    cosine = float(embedding @ reference / np.linalg.norm(embedding) / np.linalg.norm(reference))
    assert cosine > 0.99
    i, sim = resolver.nearest(embedding)
    resolver_threshold = resolver.threshold
    if sim < resolver_threshold:
        pytest.fail(f"{prompt!r} refused (similarity {sim:.3f} < {resolver_threshold:.3f})")
    rp = resolver.resolve(prompt)
    assert rp.how == "encoder" and rp.target == resolver.cache.targets[i] == "liver"
    assert rp.similarity == pytest.approx(sim)
    model = load_checkpoint(tiny_checkpoint).model
    with torch.no_grad():
        film = model.film(torch.from_numpy(embedding[None])).numpy()[0]
    np.testing.assert_allclose(rp.film, film, atol=1e-4)


def test_prompt_refusal_lists_known_targets(engine_dir: Path) -> None:
    strict = PromptResolver(engine_dir, threads=1)
    strict.threshold = 0.999  # every prompt that is not cached is too far
    with pytest.raises(PromptError) as info:
        strict.resolve("segment the heart")
    message = str(info.value)
    assert message.startswith("--prompt: 'segment the heart' is not a known target (nearest: ")
    assert "< 1.00); known targets: liver, spleen, left kidney, right kidney" in message
    assert "\n" not in message
    with pytest.raises(PromptError, match="empty prompt"):
        strict.resolve("   ")


def test_far_prompt_refused_with_calibrated_threshold(resolver: PromptResolver) -> None:
    with pytest.raises(PromptError, match="'what is the weather' is not a known target"):
        resolver.resolve("what is the weather")


# --------------------------------------------------------------------------- orientation


def _all_orientations() -> list[np.ndarray]:
    out = []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            out.append(np.array([[perm[i], flips[i]] for i in range(3)], dtype=float))
    return out


@pytest.mark.parametrize(
    "ornt",
    _all_orientations(),
    ids=lambda o: "".join(f"{int(a)}{'+' if f > 0 else '-'}" for a, f in o),
)
def test_orientation_round_trip_is_exact(ornt: np.ndarray) -> None:
    from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff

    rng = np.random.default_rng(0)
    canonical = rng.normal(size=(7, 5, 4)).astype(np.float32)
    las = np.diag([-1.25, 1.25, 7.7, 1.0])
    las[:3, 3] = (100.0, -50.0, 20.0)
    data = apply_orientation(canonical, ornt)  # the same anatomy stored in another voxel order
    affine = las @ inv_ornt_aff(ornt, canonical.shape)
    reo = reorientation(affine, data.shape, "LAS")
    np.testing.assert_array_equal(reo.apply(data), canonical)
    slices = reo.slices(data)  # (slices, rows, columns), one contiguous copy
    assert slices.flags.c_contiguous and not np.shares_memory(slices, data)
    np.testing.assert_array_equal(slices, canonical.transpose(2, 0, 1))
    np.testing.assert_allclose(reo.canonical_affine, las, atol=1e-9)
    assert "".join(aff2axcodes(reo.canonical_affine)) == "LAS"
    labels = (rng.random(canonical.shape) > 0.5).astype(np.uint8)
    back = reo.undo(labels)
    assert back.shape == data.shape
    np.testing.assert_array_equal(reo.apply(back), labels)
    np.testing.assert_array_equal(reo.undo(reo.apply(data)), data)


def test_orientation_of_oblique_and_dicom_affines(tmp_path: Path) -> None:
    from promptseg.data.dicom_writer import write_dicom_series

    angle = np.deg2rad(10)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.0, -1.0, 2.0])  # close to R P S
    reo = reorientation(affine, (6, 5, 4))
    assert reo.input_axcodes == "RPS"
    data = np.arange(120, dtype=np.float32).reshape(6, 5, 4)
    np.testing.assert_array_equal(reo.apply(data), data[::-1, ::-1, :])
    # A DICOM series in the standard axial orientation reads back as LPS (the reader's affine).
    volume = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    write_dicom_series(volume, tmp_path / "dcm", spacing=(1.0, 1.0, 2.0), shuffle_files=False)
    dicom = read_volume(tmp_path / "dcm")
    reo = reorientation(dicom.affine, dicom.data.shape)
    assert reo.input_axcodes == "LPS"
    np.testing.assert_array_equal(reo.apply(dicom.data), volume[:, ::-1, :])


# --------------------------------------------------------------------------- pipeline


def test_modality_rules(chaos_volume: Volume) -> None:
    assert choose_modality(chaos_volume) == "mr"
    ct = Volume(np.full((4, 4, 2), -1024.0, np.float32), np.eye(4), (1, 1, 1), "x.nii.gz", "nifti")
    ct.data[0, 0, 0] = 1500
    assert choose_modality(ct) == "ct"
    assert choose_modality(ct, "mr") == "mr"
    mr_negative = Volume(
        np.linspace(-3, 3, 32, dtype=np.float32).reshape(4, 4, 2),
        np.eye(4),
        (1, 1, 1),
        "z",
        "nifti",
    )
    assert choose_modality(mr_negative) == "mr"
    tagged = Volume(
        np.zeros((2, 2, 2), np.float32), np.eye(4), (1, 1, 1), "d", "dicom", {"modality": "CT"}
    )
    assert choose_modality(tagged) == "ct"
    png8 = Image2D(np.zeros((4, 4), np.float32), {"bit_depth": 8}, "a.png")
    png16 = Image2D(np.zeros((4, 4), np.float32), {"bit_depth": 16}, "b.png")
    assert choose_modality(png8) == "uint8" and choose_modality(png16) == "mr"
    with pytest.raises(InputError, match="unknown modality 'pet'"):
        choose_modality(png8, "pet")


def test_segment_volume_label_map(
    folder: EngineFolder, resolver: PromptResolver, chaos_volume: Volume
) -> None:
    prompts = ["liver", "spleen"]
    with OrtEngine(folder, threads=1) as engine:
        done: list[int] = []
        # The lower of the two prompts' median probabilities gives non-trivial masks for both
        # (the tiny model's liver probabilities are a little higher: its masks overlap).
        images = _slices(chaos_volume, folder, 8)
        from promptseg.preprocess import sigmoid

        medians = []
        for p in prompts:
            film = np.repeat(resolver.resolve(p).film[None], 8, axis=0)
            logits = engine.infer({"image": images, "film": film})["logits"]
            medians.append(float(np.median(sigmoid(logits))))
        threshold = min(medians)
        result = segment(
            chaos_volume,
            prompts,
            engine,
            resolver,
            folder.preprocessing,
            batch=7,
            threshold=threshold,
            progress=done.append,
        )
        single = segment(
            chaos_volume,
            ["liver"],
            engine,
            resolver,
            folder.preprocessing,
            batch=16,
            threshold=threshold,
        )
        spleen = segment(
            chaos_volume,
            ["spleen"],
            engine,
            resolver,
            folder.preprocessing,
            batch=16,
            threshold=threshold,
        )
    assert result.labels.shape == chaos_volume.data.shape and result.labels.dtype == np.uint8
    assert sum(done) == chaos_volume.data.shape[2]
    assert set(np.unique(result.labels)) <= {0, 1, 2}
    liver = result.stats[0]
    assert liver["label"] == 1 and liver["voxels"] == int((result.labels == 1).sum()) > 0
    assert liver["volume_ml"] == pytest.approx(liver["voxels"] * 1.25 * 1.25 * 7.7 / 1000, rel=1e-3)
    assert 0 < liver["slices_with_target"] <= chaos_volume.data.shape[2]
    # Each prompt keeps the largest component of its own mask (its single-prompt mask), and
    # only then do the prompts compete: where one mask is on alone, its label is there.
    liver_mask, spleen_mask = single.labels == 1, spleen.labels == 1
    assert np.any(liver_mask & ~spleen_mask) and np.any(liver_mask & spleen_mask)
    np.testing.assert_array_equal(result.labels > 0, liver_mask | spleen_mask)
    assert np.all(result.labels[liver_mask & ~spleen_mask] == 1)
    assert np.all(result.labels[spleen_mask & ~liver_mask] == 2)
    assert set(result.seconds) == {"preprocess", "infer", "postprocess"}


def test_logit_cutoff_is_the_sigmoid_threshold_exactly() -> None:
    from promptseg.preprocess import sigmoid

    rng = np.random.default_rng(0)
    for t in (0.5, 0.3, 0.9, 0.999, 1e-6, 0.123456):
        c = logit_cutoff(t)
        x = np.concatenate(
            [
                c + np.spacing(c) * np.arange(-2000, 2000, dtype=np.float32),  # adjacent floats
                np.linspace(c - 1, c + 1, 100_001, dtype=np.float32),
                rng.normal(0, 8, 100_000).astype(np.float32),
            ]
        ).astype(np.float32)
        np.testing.assert_array_equal(x >= c, sigmoid(x) > t)
        below = np.nextafter(c, np.float32(-np.inf))
        # array against threshold, as the runtime compares (a float32 scalar against a Python
        # float compares in float64 on numpy 1.x)
        assert (sigmoid(np.array([c, below])) > t).tolist() == [True, False]
    assert np.isnan(logit_cutoff(1 - 1e-9))  # rounds to 1.0 in float32: nothing exceeds it


def _reference_labels(logits: np.ndarray, threshold: float, reduce: list[int]) -> np.ndarray:
    """The rule spelled out on full arrays: sigmoid, threshold, most probable wins, reduce."""
    from promptseg.postprocess import largest_component
    from promptseg.preprocess import sigmoid

    prob = sigmoid(logits)
    on = prob > threshold
    out = np.zeros(logits.shape[1:], np.uint8)
    best = np.zeros(logits.shape[1:], np.float32)
    for k in range(len(logits)):
        win = on[k] & (prob[k] > best)  # strictly greater: ties keep the lower label
        out[win], best[win] = k + 1, prob[k][win]
    for k in reduce:
        out[(out == k) & ~largest_component(out == k)] = 0
    return out


def _votes(logits: np.ndarray, threshold: float, batch: int) -> LabelVotes:
    votes = LabelVotes(logits.shape[1:], threshold)
    for start in range(0, logits.shape[1], batch):
        for k in range(len(logits)):
            votes.add(start, k + 1, logits[k, start : start + batch])
    return votes


def test_label_votes_settle_overlaps_before_keeping_one_piece() -> None:
    """The spleen band cuts the liver bar in two: the liver keeps its larger side only."""
    liver = np.full((4, 12, 12), -5.0, np.float32)
    liver[:, 2:10, 1:11] = 3.0  # one connected bar
    liver[0:2, 11, 11] = 3.0  # a stray blob, not touching the bar
    spleen = np.full_like(liver, -5.0)
    spleen[:, :, 4:7] = 6.0  # a band across the bar, more probable than the liver there
    spleen[3, 11, 0:2] = 6.0  # a stray blob of its own
    labels = _votes(np.stack([liver, spleen]), 0.5, batch=3).labels([1, 2])
    assert np.all(labels[:, 2:10, 1:4] == 0) and np.all(labels[:, 2:10, 7:11] == 1)
    assert np.all(labels[:, :, 4:7] == 2)
    for k in (1, 2):  # one piece each
        assert ndimage.label(labels == k, structure=np.ones((3, 3, 3)))[1] == 1
    assert labels[0, 11, 11] == 0 and labels[3, 11, 0] == 0
    # Without post-processing both sides and the blobs stay.
    kept = _votes(np.stack([liver, spleen]), 0.5, batch=4).labels([])
    assert kept[0, 11, 11] == 1 and kept[3, 11, 0] == 2 and np.all(kept[:, 2:10, 1:4] == 1)


@pytest.mark.parametrize("seed", range(6))
def test_label_votes_match_the_rule_on_full_arrays(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 5))
    logits = rng.normal(0, 2, (k, 7, 9, 11)).astype(np.float32)
    logits[:, :, :3] = 20.0  # saturated: equal probabilities, the lower label wins
    if k > 1:
        logits[-1, 3] = logits[0, 3]  # exactly equal logits on a whole slice
    threshold = float(rng.uniform(0.2, 0.8))
    reduce = [i for i in range(1, k + 1) if rng.random() < 0.6]
    got = _votes(logits, threshold, batch=int(rng.integers(1, 5))).labels(reduce)
    np.testing.assert_array_equal(got, _reference_labels(logits, threshold, reduce))


def test_engine_resolution_mismatch_is_an_input_error(
    folder: EngineFolder, resolver: PromptResolver, chaos_volume: Volume
) -> None:
    import re
    from dataclasses import replace

    wrong = replace(folder.preprocessing, resolution=folder.resolution * 2)
    with (
        OrtEngine(folder, threads=1) as engine,
        pytest.raises(
            InputError,
            match=re.escape(str(folder.path)) + ": engine image input .* does not match",
        ),
    ):
        segment(chaos_volume, ["liver"], engine, resolver, wrong)


def test_volume_reorientation_says_when_the_orientation_is_unknown(tmp_path: Path) -> None:
    data = np.zeros((4, 3, 2), np.float32)
    rps = np.diag([1.0, -1.0, 2.0, 1.0])
    reo, warning = volume_reorientation(Volume(data, rps, (1, 1, 2), "a", "nifti"), "LAS")
    assert warning is None and reo.input_axcodes == "RPS"
    reo, warning = volume_reorientation(Volume(data, rps, (1, 1, 2), "b.mrc", "mrc"), "LAS")
    assert reo.input_axcodes == "unknown" and "stores no patient orientation" in warning
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, None), str(tmp_path / "no_orientation.nii"))  # codes 0
    volume = read_volume(tmp_path / "no_orientation.nii")
    reo, warning = volume_reorientation(volume, "RAS")
    assert reo.input_axcodes == "unknown" and "assumed RAS" in warning
    np.testing.assert_array_equal(reo.slices(volume.data), volume.data.transpose(2, 0, 1))


def test_segment_warns_about_a_missing_voxel_size(
    folder: EngineFolder, resolver: PromptResolver
) -> None:
    rng = np.random.default_rng(0)
    mrc = Volume(
        rng.normal(0, 1, (20, 20, 3)).astype(np.float32),
        np.eye(4),
        (1.0, 1.0, 1.0),
        "x.mrc",
        "mrc",
        {"voxel_size_missing": True, "orientation_known": False},
    )
    with OrtEngine(folder, threads=1) as engine:
        result = segment(mrc, ["liver"], engine, resolver, folder.preprocessing)
    assert any("no patient orientation" in w for w in result.warnings)
    assert any("volume_ml assumes 1 mm voxels" in w for w in result.warnings)


def test_segment_constant_volume_warns(folder: EngineFolder, resolver: PromptResolver) -> None:
    flat = Volume(
        np.full((20, 30, 3), 7.0, np.float32),
        np.diag([1.0, 1.0, 3.0, 1.0]),
        (1, 1, 3),
        "flat.nii.gz",
        "nifti",
    )
    with OrtEngine(folder, threads=1) as engine:
        result = segment(flat, ["liver"], engine, resolver, folder.preprocessing)
    assert result.labels.shape == (20, 30, 3) and not result.labels.any()
    assert result.warnings and "nothing to segment" in result.warnings[0]
    assert result.stats[0]["voxels"] == 0 and result.stats[0]["volume_ml"] == 0.0


def test_segment_2d_image(folder: EngineFolder, resolver: PromptResolver, data_root: Path) -> None:
    from promptseg.data.readers import read_image_2d

    data, info = read_image_2d(data_root / "brain-tumor-cheng" / "images" / "188.png")
    with OrtEngine(folder, threads=1) as engine:
        result = segment(
            Image2D(data, info, "188.png"), ["meningioma"], engine, resolver, folder.preprocessing
        )
    assert result.labels.shape == data.shape and result.modality == "uint8"
    assert result.reorientation is None and result.stats[0]["volume_ml"] is None
    with (
        OrtEngine(folder, threads=1) as engine,
        pytest.raises(InputError, match="--batch: must be at least 1"),
    ):
        segment(
            Image2D(data, info, "188.png"),
            ["meningioma"],
            engine,
            resolver,
            folder.preprocessing,
            batch=0,
        )
