"""promptseg.export: the engine folder written by the real CLI, checked with real components.

The round trip exports the tiny test checkpoint with ``--fp16`` through ``promptseg-export`` in a
subprocess once per module, then checks the folder against docs/engine_format.md with ONNX
Runtime, the real text encoder and real slices from ../shared/data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from promptseg.export import ExportError, ExportInputError, export_model  # noqa: E402
from promptseg.export.fp16 import audit_fp16, audit_fp32, convert_fp16, tidy_casts  # noqa: E402
from promptseg.export.image_graph import fold_batchnorm, rewrite_attention  # noqa: E402
from promptseg.export.prompt_cache import read_prompts_file  # noqa: E402
from promptseg.export.refusal import choose_threshold  # noqa: E402
from promptseg.runtime.engine_format import schema_problems  # noqa: E402
from promptseg.runtime.manifest import sha256_file  # noqa: E402
from promptseg.runtime.prompt_resolver import PromptCache  # noqa: E402

CONTRACT_FILES = (
    "model.onnx",
    "model.fp16.onnx",
    "prompt_cache.safetensors",
    "text_encoder.onnx",
    "vocab.txt",
    "film_generator.onnx",
    "manifest.json",
)
MANIFEST_KEYS = (
    "format",
    "version",
    "created",
    "checkpoint",
    "resolution",
    "inputs",
    "outputs",
    "film_dim",
    "embed_dim",
    "film_layout",
    "model_config",
    "preprocessing",
    "orientation",
    "targets",
    "vocabulary_sha256",
    "text_encoder",
    "prompt_refusal",
    "graphs",
    "fp16_audit",
    "verification",
    "opset",
    "versions",
    "files",
)
EXTRA_PROMPTS = (
    "# extra prompts\nhighlight the hepatic parenchyma please\nkidney, left side\tleft kidney\n"
)
PARITY_PROMPTS = ("Segment the liver", "Segment the glioma", "Segment the left kidney")


def _env(data_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PROMPTSEG_DATA_ROOT=str(data_root), PYTHONUNBUFFERED="1")
    return env


def _cli(args: list[str], data_root: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "promptseg.export.cli", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=_env(data_root), timeout=timeout, check=False
    )


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- the round trip


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint, data_root):
    """The tiny checkpoint exported with --fp16 and --prompts by the real CLI (subprocess)."""
    root = tmp_path_factory.mktemp("export")
    prompts = root / "prompts.txt"
    prompts.write_text(EXTRA_PROMPTS, encoding="utf-8")
    out = root / "engine"
    proc = _cli(
        [str(tiny_checkpoint), "-o", str(out), "--fp16", "--prompts", str(prompts)], data_root
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return {"out": out, "proc": proc, "manifest": manifest, "root": root}


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from promptseg.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def slices(loaded, data_root):
    from promptseg.export.samples import load_slices

    return load_slices(data_root, loaded.preprocessing, loaded.config.resolution).images


@pytest.mark.slow
def test_cli_writes_every_contract_file_with_matching_hashes(exported):
    out, manifest, proc = exported["out"], exported["manifest"], exported["proc"]
    for name in CONTRACT_FILES:
        assert (out / name).is_file(), name
    assert proc.stdout.strip().splitlines()[-1] == str(out / "manifest.json")
    listed = set(manifest["files"])
    present = {p.name for p in out.iterdir() if p.name != "manifest.json"}
    assert listed == present
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
    # no staging or backup folder left beside the engine folder
    assert sorted(p.name for p in exported["root"].iterdir()) == ["engine", "prompts.txt"]
    stages = [line for line in proc.stderr.splitlines() if line.startswith("[promptseg-export")]
    assert len(stages) >= 8 and "manifest.json written" in stages[-2]
    if "tensorrt" not in manifest:
        assert not (out / "model.plan").exists()


@pytest.mark.slow
def test_manifest_has_every_contract_field(exported, tiny_checkpoint, loaded):
    m = exported["manifest"]
    for key in MANIFEST_KEYS:
        assert key in m, key
    assert (m["format"], m["version"], m["opset"]) == ("promptseg-engine", 1, 17)
    assert schema_problems(m) == []  # docs/engine_format.schema.json
    assert 0 < m["prompt_refusal"]["ambiguity_margin"] < 1
    assert m["prompt_groups"]["kidneys"]["members"] == ["left kidney", "right kidney"]
    assert m["checkpoint"]["sha256"] == sha256_file(tiny_checkpoint)
    assert m["resolution"] == loaded.config.resolution == 32
    assert m["film_dim"] == loaded.model.unet.film_dim
    assert m["embed_dim"] == loaded.model.embed_dim == 384
    offset = 0
    for entry, (name, size) in zip(m["film_layout"], loaded.model.unet.layout):
        assert (entry["name"], entry["offset"], entry["size"]) == (name, offset, size)
        offset += size
    assert offset == m["film_dim"]
    assert m["orientation"]["axcodes"] == "LAS"
    assert m["targets"] == list(loaded.vocabulary.targets)
    assert m["vocabulary_sha256"] == loaded.vocabulary.sha256()
    assert m["graphs"] == {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}
    te = m["text_encoder"]
    assert (te["onnx"], te["vocab"], te["quantized"], te["lowercase"]) == (
        "text_encoder.onnx",
        "vocab.txt",
        "none",
        True,
    )
    assert te["max_tokens"] == 16 and te["hidden_size"] == 384
    audit = m["fp16_audit"]
    assert audit["limit"] == 65504.0 and 0 < audit["max_abs_activation"] < audit["threshold"]
    assert any("ReduceL2" in name for name in audit["kept_fp32"])
    v = m["verification"]
    assert v["max_abs_logit_diff"] <= 1e-3 and v["dice_agreement_min"] >= 0.99
    for r in v["graphs"]["fp16"]["per_prompt"].values():  # FP16: within 1 % of the logit range
        assert r["max_abs_logit_diff"] <= 1e-2 * r["max_abs_reference_logit"]
    assert v["slices"] >= 8 and len(v["prompts"]) >= 3
    assert {"torch", "onnx", "onnxruntime", "promptseg"} <= set(m["versions"])


@pytest.mark.slow
@pytest.mark.parametrize("fname", ["model.onnx", "model.fp16.onnx"])
def test_image_graph_io_metadata_and_no_batchnorm(exported, loaded, fname):
    model = onnx.load(str(exported["out"] / fname))
    onnx.checker.check_model(model)
    r, p = loaded.config.resolution, loaded.model.unet.film_dim

    def sig(values):
        return [
            (
                v.name,
                v.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        ]

    f32 = onnx.TensorProto.FLOAT
    assert sig(model.graph.input) == [
        ("image", f32, ["batch", 1, r, r]),
        ("film", f32, ["batch", p]),
    ]
    assert sig(model.graph.output) == [
        ("logits", f32, ["batch", 1, r, r]),
        ("presence", f32, ["batch", 1]),
    ]
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    meta = {e.key: e.value for e in model.metadata_props}
    assert meta["promptseg.vocabulary_sha256"] == loaded.vocabulary.sha256()
    assert meta["promptseg.resolution"] == str(r)
    assert meta["promptseg.checkpoint_sha256"] == exported["manifest"]["checkpoint"]["sha256"]
    assert json.loads(meta["promptseg.film_layout"]) == exported["manifest"]["film_layout"]
    if fname == "model.fp16.onnx":
        dtypes = {init.data_type for init in model.graph.initializer}
        assert onnx.TensorProto.FLOAT16 in dtypes


@pytest.mark.slow
def test_onnx_runtime_matches_torch_across_batches_and_prompts(exported, loaded, slices):
    cache = PromptCache.load(exported["out"] / "prompt_cache.safetensors")
    fp32 = _session(exported["out"] / "model.onnx")
    fp16 = _session(exported["out"] / "model.fp16.onnx")
    unet = loaded.model.unet.eval()
    for prompt in PARITY_PROMPTS:
        film = cache.film[cache.index(prompt)]
        with torch.no_grad():
            ref, ref_presence = unet(
                torch.from_numpy(slices), torch.from_numpy(np.repeat(film[None], len(slices), 0))
            )
        ref, ref_presence = ref.numpy(), ref_presence.numpy()
        for batch in (1, 2, 5):
            got32, got16, presence32 = [], [], []
            for i in range(0, len(slices), batch):
                feed = {
                    "image": slices[i : i + batch],
                    "film": np.repeat(film[None], len(slices[i : i + batch]), 0),
                }
                logits, presence = fp32.run(["logits", "presence"], feed)
                got32.append(logits)
                presence32.append(presence)
                got16.append(fp16.run(["logits"], feed)[0])
            got32, got16 = np.concatenate(got32), np.concatenate(got16)
            assert got32.dtype == got16.dtype == np.float32
            presence32 = np.concatenate(presence32)
            assert presence32.shape == ref_presence.shape == (len(slices), 1)
            assert np.max(np.abs(presence32 - ref_presence)) < 1e-4, (prompt, batch)
            assert np.max(np.abs(got32 - ref)) < 1e-4, (prompt, batch)
            assert np.max(np.abs(got16 - ref)) <= 1e-2 * np.max(np.abs(ref)), (prompt, batch)
            a, b = got16 > 0, ref > 0
            dice = 1.0 if a.sum() + b.sum() == 0 else 2 * (a & b).sum() / (a.sum() + b.sum())
            assert dice >= 0.98, (prompt, batch, dice)


@pytest.mark.slow
def test_different_prompts_give_different_logits(exported, slices):
    cache = PromptCache.load(exported["out"] / "prompt_cache.safetensors")
    sess = _session(exported["out"] / "model.onnx")
    outs = []
    for prompt in PARITY_PROMPTS:
        film = np.repeat(cache.film[cache.index(prompt)][None], len(slices), 0)
        outs.append(sess.run(["logits"], {"image": slices, "film": film})[0])
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert np.max(np.abs(outs[i] - outs[j])) > 1e-3


@pytest.mark.slow
def test_prompt_cache_rows_equal_torch_film_generator(exported, loaded, text_encoder):
    cache = PromptCache.load(exported["out"] / "prompt_cache.safetensors")
    meta = cache.meta
    m = exported["manifest"]
    assert (meta["format"], meta["version"]) == ("promptseg-prompt-cache", "1")
    assert (int(meta["film_dim"]), int(meta["embed_dim"])) == (m["film_dim"], m["embed_dim"])
    assert cache.film.shape == (len(cache), m["film_dim"]) and cache.film.dtype == np.float32
    assert cache.embedding.shape == (len(cache), m["embed_dim"])
    assert len(cache.targets) == len(cache.prompts) == m["prompt_cache"]["prompts"]
    assert set(cache.targets) == set(m["targets"])
    vocab = loaded.vocabulary
    expected = set(vocab.all_prompts()) | set(vocab.targets)
    expected |= {vocab.canonical(t) for t in vocab.targets}
    assert expected <= set(cache.prompts)
    for prompt, target in vocab.all_prompts().items():
        assert cache.targets[cache.index(prompt)] == target
    # extra prompts from --prompts: explicit target kept, missing target from nearest neighbour
    assert cache.targets[cache.index("kidney, left side")] == "left kidney"
    assert cache.targets[cache.index("highlight the hepatic parenchyma please")] == "liver"
    with torch.no_grad():
        film = loaded.model.film(torch.from_numpy(cache.embedding)).numpy()
    np.testing.assert_allclose(cache.film, film, atol=1e-5)
    sample = cache.prompts[::37]
    emb = text_encoder(sample).numpy()
    rows = np.stack([cache.embedding[cache.index(p)] for p in sample])
    np.testing.assert_allclose(rows, emb, atol=1e-4)


@pytest.mark.slow
def test_text_encoder_onnx_matches_torch(exported, text_encoder):
    out = exported["out"]
    sess = _session(out / "text_encoder.onnx")
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i.type == "tensor(int64)" for i in sess.get_inputs())
    assert [o.name for o in sess.get_outputs()] == ["embedding"]
    prompts = [
        "liver",
        "Please mark the splenic tissue",
        "segment the heart",
        "Where is the glioma?",
    ]
    tokens = text_encoder.tokenize(prompts)
    ids = tokens["input_ids"].numpy()
    feed = {
        "input_ids": ids,
        "attention_mask": tokens["attention_mask"].numpy(),
        "token_type_ids": np.zeros_like(ids),
    }
    got = sess.run(["embedding"], feed)[0]
    ref = text_encoder(prompts).numpy()
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert got.shape == (4, 384) and cos.min() > 0.999
    vocab_lines = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab_lines[exported["manifest"]["text_encoder"]["special_tokens"]["cls"]] == "[CLS]"


@pytest.mark.slow
def test_film_generator_onnx_matches_torch(exported, loaded, text_encoder):
    sess = _session(exported["out"] / "film_generator.onnx")
    emb = text_encoder(["Segment the spleen", "hepatic lesion", "a prompt from nowhere"]).numpy()
    got = sess.run(["film"], {"embedding": emb})[0]
    with torch.no_grad():
        ref = loaded.model.film(torch.from_numpy(emb)).numpy()
    assert got.shape == (3, loaded.model.unet.film_dim)
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.slow
def test_refusal_threshold_separates_on_and_off_target(exported, text_encoder):
    refusal = exported["manifest"]["prompt_refusal"]
    assert refusal["metric"] == "cosine" and "leave-one-out" in refusal["how"]
    t = refusal["threshold"]
    acc, ref = refusal["accept"], refusal["refuse"]
    assert ref["median"] < t < acc["median"]
    if refusal["separable"]:
        assert ref["max"] < t < acc["min"]
    cache = PromptCache.load(exported["out"] / "prompt_cache.safetensors")
    sess = _session(exported["out"] / "text_encoder.onnx")
    queries = ["kindly outline the liver", "what is the weather"]
    tokens = text_encoder.tokenize(queries)
    ids = tokens["input_ids"].numpy()
    emb = sess.run(
        ["embedding"],
        {
            "input_ids": ids,
            "attention_mask": tokens["attention_mask"].numpy(),
            "token_type_ids": np.zeros_like(ids),
        },
    )[0]
    keys = cache.embedding / np.linalg.norm(cache.embedding, axis=1, keepdims=True)
    nearest = (emb / np.linalg.norm(emb, axis=1, keepdims=True) @ keys.T).max(1)
    assert nearest[0] >= t > nearest[1]


@pytest.mark.slow
def test_export_replaces_earlier_folder_with_int8_text_encoder(
    tiny_checkpoint, data_root, text_encoder, tmp_path
):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "manifest.json").write_text("{}", encoding="utf-8")
    (out / "stale.bin").write_bytes(b"old")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    manifest = export_model(
        tiny_checkpoint,
        out,
        text_encoder_quant="int8",
        verify=False,
        progress=False,
        data_root=data_root,
    )
    assert manifest == out / "manifest.json"
    assert not (out / "stale.bin").exists() and not (out / "model.fp16.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    m = json.loads(manifest.read_text(encoding="utf-8"))
    assert m["verification"] == {"skipped": True} and "fp16_audit" not in m
    te = m["text_encoder"]
    assert (
        te["quantized"] == "int8-dynamic" and m["precision"]["text_encoder.onnx"] == "int8-dynamic"
    )
    q = te["quantization"]
    assert q["cosine_min"] >= 0.99 and q["prompts_checked"] == m["prompt_cache"]["prompts"]
    assert te["bytes"] == (out / "text_encoder.onnx").stat().st_size < 0.6 * q["fp32_bytes"]
    assert "int8-quantised text_encoder.onnx" in m["prompt_refusal"]["how"]
    # the shipped (quantised) graph really stays within the recorded cosine floor
    prompts = ["Segment the liver", "Where is the pituitary adenoma?", "splenic tissue"]
    tokens = text_encoder.tokenize(prompts)
    ids = tokens["input_ids"].numpy()
    got = _session(out / "text_encoder.onnx").run(
        ["embedding"],
        {
            "input_ids": ids,
            "attention_mask": tokens["attention_mask"].numpy(),
            "token_type_ids": np.zeros_like(ids),
        },
    )[0]
    ref = text_encoder(prompts).numpy()
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99


# ----------------------------------------------------------------------------- error paths


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("promptseg-export: error: ")
    return lines[0]


def test_missing_checkpoint_exits_2_with_one_line(tmp_path, data_root):
    out = tmp_path / "engine"
    proc = _cli([str(tmp_path / "nope.pt"), "-o", str(out)], data_root, timeout=300)
    line = _one_line_error(proc)
    assert "nope.pt" in line and "checkpoint not found" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_output_exits_2_with_one_line(tmp_path, tiny_checkpoint, data_root):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    proc = _cli([str(tiny_checkpoint), "-o", str(blocker / "engine")], data_root, timeout=300)
    line = _one_line_error(proc)
    assert "cannot create the output folder" in line and str(blocker) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_foreign_folder_is_not_replaced(tmp_path, tiny_checkpoint, data_root):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    proc = _cli([str(tiny_checkpoint), "-o", str(out)], data_root, timeout=300)
    assert "refusing to replace" in _one_line_error(proc)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_argument_validation(tmp_path, tiny_checkpoint):
    with pytest.raises(ExportInputError, match="calib_data"):
        export_model(tiny_checkpoint, tmp_path / "e", int8=True, progress=False)
    with pytest.raises(ExportInputError, match="opset"):
        export_model(tiny_checkpoint, tmp_path / "e", opset=7, progress=False)
    with pytest.raises(ExportInputError, match="text_encoder_quant"):
        export_model(tiny_checkpoint, tmp_path / "e", text_encoder_quant="int4", progress=False)
    for option, kwargs in (
        ("calib_samples", {"calib_samples": 8}),
        ("int8_fallback_tolerance", {"int8_fallback_tolerance": 0.01}),
        ("int8_fallback_tolerance=None", {"int8_fallback_tolerance": None}),
    ):
        with pytest.raises(ExportInputError, match=f"^{option} is only used with int8=True$"):
            export_model(tiny_checkpoint, tmp_path / "e", progress=False, **kwargs)
    assert not (tmp_path / "e").exists()


def _int8_cli_error(args: list[str], tmp_path: Path) -> str:
    """The one-line error of promptseg-export (subprocess) for INT8 options, nothing written.

    The checkpoint does not exist: an INT8 option error proves the options are checked first.
    """
    out = tmp_path / "engine"
    proc = _cli([str(tmp_path / "nope.pt"), "-o", str(out), *args], tmp_path, timeout=300)
    line = _one_line_error(proc)
    assert not out.exists()
    return line


def test_export_cli_rejects_fallback_options_without_int8(tmp_path):
    line = _int8_cli_error(["--int8-fallback-tolerance", "0.01"], tmp_path)
    assert line.endswith("--int8-fallback-tolerance is only used with --int8")
    line = _int8_cli_error(["--no-int8-fallback"], tmp_path)
    assert line.endswith("--no-int8-fallback is only used with --int8")
    data = tmp_path / "data"
    data.mkdir()
    both = ["--int8", "--calib-data", str(data), "--no-int8-fallback"]
    line = _int8_cli_error([*both, "--int8-fallback-tolerance", "0.01"], tmp_path)
    assert "not allowed with" in line


def test_export_cli_checks_the_npz_fallback_data_root_first(tmp_path):
    npz = tmp_path / "calib.npz"
    npz.write_bytes(b"")
    empty = tmp_path / "no-data"
    empty.mkdir()
    args = ["--int8", "--calib-data", str(npz), "--data-root", str(empty)]
    line = _int8_cli_error(args, tmp_path)
    assert str(npz) in line and "proxy cases" in line and "--no-int8-fallback" in line
    assert str(empty) in line
    # without the float fallback a saved set needs no data folder: the next check is reached
    line = _int8_cli_error([*args, "--no-int8-fallback"], tmp_path)
    assert "checkpoint not found" in line and "nope.pt" in line


def test_prompts_file_parsing(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\n  outline   the liver \nleft side kidney\tleft kidney\n", "utf-8")
    assert read_prompts_file(f, ("liver", "left kidney")) == [
        ("outline the liver", None),
        ("left side kidney", "left kidney"),
    ]
    f.write_text("heart\theart\n", "utf-8")
    with pytest.raises(ExportInputError, match="unknown target 'heart'"):
        read_prompts_file(f, ("liver",))


# ----------------------------------------------------------------------------- graph passes


def _export_small(module, example, path: Path) -> onnx.ModelProto:
    module.eval()
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        do_constant_folding=True,
        training=torch.onnx.TrainingMode.EVAL,
    )
    return onnx.load(str(path))


def test_fold_batchnorm_removes_every_bn_and_keeps_outputs(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.BatchNorm2d(4),  # not after a conv: becomes Mul + Add
    )
    for bn in (net[1], net[3]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    x = torch.rand(2, 1, 8, 8)
    model = _export_small(net, x, tmp_path / "bn.onnx")
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    folded = fold_batchnorm(model)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    sess = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(sess.run(["y"], {"x": x.numpy()})[0], ref, atol=1e-5)


class _Attention(torch.nn.Module):
    """SE then CBAM spatial attention (the UNet stage's tail) on ``channels`` channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        from promptseg.model.blocks import SpatialAttention, SqueezeExcitation

        self.se = SqueezeExcitation(channels, 2)
        self.cbam = SpatialAttention(channels)

    def forward(self, x):
        return self.cbam(self.se(x))


@pytest.mark.parametrize(("channels", "size"), [(16, 16), (5, 12), (3, 10)])
def test_rewrite_attention_keeps_outputs_and_drops_channel_reductions(tmp_path, channels, size):
    torch.manual_seed(channels)
    net = _Attention(channels)
    x = torch.randn(3, channels, size, size)
    model = _export_small(net, x, tmp_path / "attention.onnx")
    counts = rewrite_attention(model)
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert counts["channel_reductions"] == 1 and "ReduceMax" not in ops
    # the spatial ReduceMean of SE stays; the channel one is gone
    assert ops.count("ReduceMean") == 1
    # SpaceToDepth(4) needs H and W divisible by 4 (10 is not: the 7x7 conv stays)
    assert counts["space_to_depth_convs"] == (size % 4 == 0)
    assert ("SpaceToDepth" in ops) == (size % 4 == 0)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(sess.run(["y"], {"x": x.numpy()})[0], ref, atol=1e-5)


class _Scaled(torch.nn.Module):
    """(B, 1, H, W) -> (B, 3, H, W): activations near 2 * scale, then L2 norm over channels."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 1)
        self.scale = scale

    def forward(self, x):
        y = torch.relu(self.conv(x)) + (x + 1.0) * self.scale
        return torch.nn.functional.normalize(y, dim=1) * self.scale


def test_fp16_audit_keeps_large_nodes_and_l2_reduction(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 6, 6) + 0.5
    net = _Scaled(2e4)
    model = _export_small(net, x, tmp_path / "big.onnx")
    feeds = [{"x": x.numpy()}]
    audit = audit_fp32(model, feeds)
    ops = {n.name: n.op_type for n in model.graph.node}
    kept_ops = {ops[n] for n in audit.kept_fp32}
    assert "ReduceL2" in kept_ops and "Mul" in kept_ops
    assert audit.max_abs_activation > audit.threshold
    # the Div reading the (> 65504) norm stays FP32 although its own output is below 1
    assert any(ops[n] == "Div" for n in audit.kept_fp32)
    model16 = convert_fp16(model, audit.kept_fp32)
    audit_fp16(model16, feeds, audit)
    assert audit.fp16_max_abs_activation < audit.limit
    sess = ort.InferenceSession(model16.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["y"], {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = net(x).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-2)


def test_fp16_audit_fails_loudly_when_kept_graph_still_overflows(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 6, 6) + 0.5
    model = _export_small(_Scaled(1e6), x, tmp_path / "huge.onnx")
    feeds = [{"x": x.numpy()}]
    audit = audit_fp32(model, feeds)
    # Keep only the L2 reduction: the 1e6-scaled tensors overflow FP16.
    audit.kept_fp32 = [n for n in audit.kept_fp32 if "ReduceL2" in n]
    model16 = convert_fp16(model, audit.kept_fp32)
    with pytest.raises(ExportError, match="FP16 graph overflows"):
        audit_fp16(model16, feeds, audit)


def _cast_chain_model() -> onnx.ModelProto:
    """x -> Relu -> FP16 -> FP32 -> FP16 -> FP32 round trips, read by FP32 and FP16 nodes.

    y = 3 * (the chain's end), z = the chain's end as a graph output (a final Cast), and
    w = Neg in FP16 of the middle FP16 tensor (its Cast to FP16 must stay).
    """
    from onnx import TensorProto, helper

    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16

    def cast(src: str, dst: str, to: int):
        return helper.make_node("Cast", [src], [dst], to=to, name=f"cast_{dst}")

    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        cast("r", "r16", f16),
        cast("r16", "r32", f32),
        cast("r32", "s16", f16),
        cast("s16", "s32", f32),
        helper.make_node("Mul", ["s32", "k"], ["y"], name="mul"),
        cast("s16", "z", f32),
        helper.make_node("Neg", ["s16"], ["n16"], name="neg"),
        cast("n16", "w", f32),
    ]
    graph = helper.make_graph(
        nodes,
        "cast_chain",
        [helper.make_tensor_value_info("x", f32, [2, 3])],
        [helper.make_tensor_value_info(n, f32, [2, 3]) for n in ("y", "z", "w")],
        [helper.make_tensor("k", f32, [], [3.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_tidy_casts_resolves_chained_round_trips():
    model = _cast_chain_model()
    x = np.array([[-1.0, 0.1234567, 2.5], [3.3333333, -0.5, 1e-3]], np.float32)
    names = ["y", "z", "w"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    before = sess.run(names, {"x": x})
    tidy_casts(model)
    onnx.checker.check_model(model, full_check=True)
    producer = {o: n for n in model.graph.node for o in n.output}
    # y and z read the FP32 Relu output directly: no FP16 round trip left on their path
    assert list(producer["y"].input) == ["r", "k"]
    assert producer["z"].op_type == "Cast" and list(producer["z"].input) == ["r"]
    # the FP16 reader keeps its Cast to FP16, now fed by the FP32 tensor
    assert [producer[i].input[0] for i in producer["n16"].input] == ["r"]
    assert {"r16", "r32", "s32"}.isdisjoint(producer)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    after = sess.run(names, {"x": x})
    for name, a, b in zip(names, before, after):
        assert a.dtype == b.dtype == np.float32, name
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6, err_msg=name)
    # without the FP16 rounding, y and z are exact now
    np.testing.assert_array_equal(after[0], 3 * np.maximum(x, 0))
    np.testing.assert_array_equal(after[1], np.maximum(x, 0))


def test_refusal_leaves_out_what_the_runtime_serves_from_the_cache():
    from promptseg.export.refusal import nearest_cosine

    cache = PromptCache(
        prompts=["segment the liver", "segment the spleen"],
        targets=["liver", "spleen"],
        embedding=np.array([[1.0, 0.0], [0.6, 0.8]], np.float32),
        film=np.zeros((2, 3), np.float32),
    )
    queries = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    # the runtime resolves "Segment the liver." from the cache (case, trailing punctuation),
    # so leave-one-out drops that row for it; a different phrasing keeps it
    got = nearest_cosine(queries, ["  Segment the LIVER. ", "outline the liver"], cache, True)
    np.testing.assert_allclose(got, [0.6, 1.0], rtol=1e-6)


@pytest.mark.slow
def test_trailing_punctuation_resolves_to_the_cached_entry(exported):
    from promptseg.runtime.prompt_resolver import PromptResolver, normalise_prompt

    resolver = PromptResolver(exported["out"], threads=1)
    cache = PromptCache.load(exported["out"] / "prompt_cache.safetensors")
    for prompt in ("Segment the liver.", "segment the liver!", "Where is the liver"):
        assert prompt not in cache.prompts
        got = resolver.resolve(prompt)
        assert (got.how, got.target, got.similarity) == ("normalised", "liver", 1.0), prompt
        assert normalise_prompt(got.nearest) == normalise_prompt(prompt)
        np.testing.assert_array_equal(got.film, cache.film[cache.index(got.nearest)])


def test_choose_threshold_gap_and_overlap():
    t, bal, sep = choose_threshold(np.array([0.8, 0.9, 0.95]), np.array([0.3, 0.5, 0.6]))
    assert sep and bal == 1.0 and t == pytest.approx(0.7)
    t, bal, sep = choose_threshold(np.array([0.55, 0.8, 0.9, 0.95]), np.array([0.3, 0.5, 0.6]))
    assert not sep and 0.6 < t < 0.8 and bal == pytest.approx((0.75 + 1.0) / 2)


def test_default_engine_targets_the_runtime_package():
    from promptseg.export.default_engine import build_default_engine, default_engine_dir

    assert default_engine_dir().parts[-2:] == ("runtime", "default_engine")
    assert callable(build_default_engine)


# ----------------------------------------------------------------------------- TensorRT


@pytest.fixture
def build_engine():
    """The export's TensorRT plan builder; skips where TensorRT does not import."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"tensorrt does not import here ({type(exc).__name__}): no engine build")
    from promptseg.export.tensorrt_build import build_engine

    return build_engine


@pytest.mark.trt
@pytest.mark.slow
def test_tensorrt_plan_from_fp16_graph(exported, tmp_path, loaded, build_engine):
    r, p = loaded.config.resolution, loaded.model.unet.film_dim
    info = build_engine(
        exported["out"] / "model.fp16.onnx",
        tmp_path / "model.plan",
        tmp_path / "timing.cache",
        resolution=r,
        film_dim=p,
        max_batch=8,
    )
    assert (tmp_path / "model.plan").stat().st_size > 0
    assert (tmp_path / "timing.cache").stat().st_size > 0
    io = {t["name"]: t for t in info["io"]}
    assert io["image"]["mode"] == "input" and io["image"]["dtype"] == "float"
    assert io["logits"]["mode"] == "output" and io["logits"]["shape"][1:] == [1, r, r]
    assert info["profile"] == {"min": 1, "opt": 4, "max": 8} and info["version"]


@pytest.mark.trt
@pytest.mark.slow
def test_tensorrt_replaces_a_rejected_timing_cache(exported, tmp_path, loaded, build_engine):
    cache = tmp_path / "timing.cache"
    foreign = b"not a timing cache of this TensorRT" * 64
    cache.write_bytes(foreign)
    lines: list[str] = []
    kwargs = {
        "resolution": loaded.config.resolution,
        "film_dim": loaded.model.unet.film_dim,
        "max_batch": 2,
        "progress": lines.append,
    }
    source = exported["out"] / "model.fp16.onnx"
    info = build_engine(source, tmp_path / "model.plan", cache, **kwargs)
    assert "rejected the timing cache" in info["timing_cache_note"]
    assert any("rejected the timing cache" in line for line in lines)
    assert cache.read_bytes() != foreign and cache.stat().st_size > 0
    # the cache written back is this machine's: the next build takes it without a note
    info = build_engine(source, tmp_path / "model2.plan", cache, **kwargs)
    assert "timing_cache_note" not in info
