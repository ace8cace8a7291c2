"""bench/latency.py: statistics, the GPU gate, and a real CPU run in a subprocess."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "latency.py"


def _latency_module():
    """bench/latency.py imported from its path (it is a script, not part of the package)."""
    if "bench_latency" in sys.modules:
        return sys.modules["bench_latency"]
    spec = importlib.util.spec_from_file_location("bench_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_latency"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_stats_ms_percentiles():
    latency = _latency_module()
    s = latency.stats_ms(np.arange(1, 101) / 1e3)  # 1..100 ms
    assert s["n"] == 100
    assert s["median_ms"] == pytest.approx(50.5)
    assert s["p95_ms"] == pytest.approx(95.05)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no timings"):
        latency.stats_ms([])


def _report(gpu: bool, p95: float | None) -> dict:
    rows = []
    if p95 is not None:
        rows.append({"name": "tensorrt-fp16", "device": "cuda", "status": "ok",
                     "infer_b1": {"p95_ms": p95}})  # fmt: skip
    rows.append({"name": "ort-cpu", "device": "cpu", "status": "ok", "infer_b1": {"p95_ms": 80.0}})
    return {"machine": {"gpu": {"present": gpu}}, "backends": rows}


def test_gpu_gate():
    latency = _latency_module()
    assert latency.gpu_check(_report(False, None)) == (True, [latency.NO_GPU_LINE])
    ok, lines = latency.gpu_check(_report(True, 3.0))
    assert ok and "pass" in lines[0]
    ok, lines = latency.gpu_check(_report(True, 50.0))
    assert not ok and "FAIL" in lines[0]
    ok, _ = latency.gpu_check(_report(True, None))
    assert not ok  # a GPU machine where no GPU backend ran fails the gate


def test_chunk_sizes_cover_the_whole_batch():
    latency = _latency_module()
    assert latency.chunk_sizes(70, 32) == [32, 32, 6]
    assert latency.chunk_sizes(64, 32) == [32, 32]
    assert latency.chunk_sizes(4, 32) == [4]
    for batch, max_batch in ((1, 1), (33, 32), (100, 7)):
        sizes = latency.chunk_sizes(batch, max_batch)
        assert sum(sizes) == batch and max(sizes) <= max_batch
    with pytest.raises(ValueError, match="max_batch >= 1"):
        latency.chunk_sizes(4, 0)


def test_example_slice_window_follows_the_runtime_modality(tmp_path):
    nib = pytest.importorskip("nibabel")
    latency = _latency_module()
    from promptseg.preprocess import Preprocessing

    rng = np.random.default_rng(0)
    ct = rng.uniform(-1024, 1500, (16, 16, 4)).astype(np.float32)
    # below -500 but also below any CT scale: promptseg-run treats it as MR (percentile window)
    signed = rng.uniform(-5000, 5000, (16, 16, 4)).astype(np.float32)
    for name, data in (("ct.nii.gz", ct), ("signed.nii.gz", signed)):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / name))
    _, _, bounds = latency._example_slice(tmp_path / "ct.nii.gz", 32, rng)
    assert bounds == Preprocessing(resolution=32).ct_window
    _, _, bounds = latency._example_slice(tmp_path / "signed.nii.gz", 32, rng)
    lo, hi = np.percentile(signed, Preprocessing().mr_percentiles)
    assert bounds == pytest.approx((lo, hi), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory, tiny_checkpoint, data_root) -> Path:
    from promptseg.export import export_model

    out = tmp_path_factory.mktemp("bench") / "engine"
    export_model(tiny_checkpoint, out, data_root=data_root, progress=False)
    return out


@pytest.mark.slow
def test_latency_script_on_the_tiny_export(tiny_engine, tiny_checkpoint, data_root, tmp_path):
    latency = _latency_module()
    volume = data_root / "chaos-mr-t2spir" / "image_1.nii.gz"
    out = tmp_path / "latency.json"
    cmd = [sys.executable, str(SCRIPT), "--engine", str(tiny_engine), "--checkpoint",
           str(tiny_checkpoint), "--iters", "5", "--warmup", "1", "--batch", "4", "--threads",
           "1", "--volume", str(volume), "--volume-repeats", "1", "--json", str(out), "--check"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    report = json.loads(out.read_text())
    gpu = report["machine"]["gpu"]["present"]
    assert proc.returncode == (0 if report["check"]["passed"] else 1), proc.stderr
    if not gpu:
        assert proc.returncode == 0
        assert latency.NO_GPU_LINE in proc.stdout
    # Machine facts, settings and the engine's identity.
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cpu_count"] >= 1
    assert machine["threads"]["requested"] == 1 and machine["threads"]["torch_intra_op"] == 1
    assert machine["versions"]["onnxruntime"] and machine["versions"]["numpy"]
    manifest = (tiny_engine / "manifest.json").read_bytes()
    assert report["engine"]["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert report["settings"]["iters"] == 5 and report["settings"]["batch"] == 4
    # CPU backends ran with the requested iterations; every statistic is there and ordered.
    rows = {r["name"]: r for r in report["backends"]}
    for name in ("torch-cpu", "ort-cpu"):
        row = rows[name]
        assert row["status"] == "ok", row.get("reason")
        for key in ("infer_b1", "e2e_b1", "infer_batch"):
            s = row[key]
            assert s["n"] == 5
            assert 0 < s["min_ms"] <= s["median_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert row["throughput_slices_per_s"]["infer"] > 0
    skipped = [r for r in report["backends"] if r["status"] == "skipped"]
    assert all(r["reason"] for r in skipped)
    if not gpu:
        assert {"tensorrt-fp16", "ort-cuda"} <= {r["name"] for r in skipped}
    # no export builds an INT8 plan: the report says TensorRT INT8 is not benchmarked
    assert rows["tensorrt-int8"]["status"] == "skipped"
    assert rows["tensorrt-int8"]["reason"].startswith("not benchmarked")
    # The ratio printed is the one measured in this run.
    ratio = report["ratio_ort_cpu_over_torch_cpu"]
    expected = rows["ort-cpu"]["infer_b1"]["median_ms"] / rows["torch-cpu"]["infer_b1"]["median_ms"]
    assert ratio == pytest.approx(expected)
    assert f"{ratio:.3f}" in proc.stdout and "median ratio" in proc.stdout
    # Whole volume through promptseg-run's Python API, read -> written mask.
    vol = report["volume"][0]
    assert vol["status"] == "ok", vol.get("reason")
    assert vol["backend"] == "ort-cpu" and vol["stats"]["n"] == 1 and vol["stats"]["median_ms"] > 0


def test_latency_script_rejects_bad_options(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--engine", str(tmp_path / "missing"), "--iters", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--iters: must be an integer >= 1" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.slow
def test_latency_preset_mode_exports_a_random_unet(tmp_path):
    out = tmp_path / "preset.json"
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--resolution", "32", "--iters", "3",
           "--warmup", "1", "--batch", "2", "--threads", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["engine"]["preset"] == "tiny" and report["engine"]["resolution"] == 32
    rows = {r["name"]: r for r in report["backends"]}
    for name in ("torch-cpu", "ort-cpu"):
        assert rows[name]["status"] == "ok", rows[name]["reason"]
        assert rows[name]["infer_b1"]["n"] == 3 and rows[name]["infer_batch"]["n"] == 3
    assert report["volume"][0]["status"] == "skipped" and "preset" in report["volume"][0]["reason"]
    assert report["ratio_ort_cpu_over_torch_cpu"] > 0
