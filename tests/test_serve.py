"""``promptseg serve`` (a real Triton server from PyTriton) and ``promptseg-run --server``.

One server per module, on free loopback ports, shut down with SIGINT at the end. Every answer
is compared voxel for voxel with a local ``promptseg-run`` of the same input.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.test_dicom_seg import CHAOS_IMAGE, seg_content, write_chaos_series
from tests.test_runtime_cli import _command, _ok, run_cli

pytest.importorskip("pytriton")
http = pytest.importorskip("tritonclient.http")

PROMPTS = ("--prompt", "liver", "--prompt", "spleen")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from promptseg.runtime.serve_process import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("serve") / "server.log")
    yield srv
    code = srv.stop()
    assert code == 0, f"promptseg serve exited with {code}:\n{srv.tail()}"


@pytest.fixture(scope="module")
def chaos(data_root: Path) -> Path:
    return data_root / CHAOS_IMAGE


@pytest.fixture(scope="module")
def series(data_root: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve-series") / "chaos1"
    write_chaos_series(data_root / CHAOS_IMAGE, folder)
    return folder


def _start_cli(*args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [*_command(), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_concurrent_server_runs_equal_local_runs(
    server, chaos: Path, series: Path, tmp_path: Path
) -> None:
    assert server.ready()
    remote = tmp_path / "remote"
    remote.mkdir()
    # Three clients at once: a NIfTI volume, a DICOM series (NIfTI out) and a DICOM SEG.
    jobs = [
        _start_cli(chaos, *PROMPTS, "-o", remote / "chaos.nii.gz", "--server", server.url),
        _start_cli(series, *PROMPTS, "-o", remote / "series.nii.gz", "--server", server.url),
        _start_cli(series, *PROMPTS, "-o", remote / "series.dcm", "--server", server.url),
    ]
    for job in jobs:
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, f"stdout: {out}\nstderr: {err}\nserver:\n{server.tail()}"
    local = tmp_path / "local"
    local.mkdir()
    _ok(run_cli(chaos, *PROMPTS, "-o", local / "chaos.nii.gz", "--quiet"))
    _ok(run_cli(series, *PROMPTS, "-o", local / "series.nii.gz", "--quiet"))
    _ok(run_cli(series, *PROMPTS, "-o", local / "series.dcm", "--quiet"))
    for name in ("chaos.nii.gz", "series.nii.gz"):
        a, b = nib.load(str(remote / name)), nib.load(str(local / name))
        assert (np.asarray(b.dataobj) == 1).sum() > 1000  # a real liver mask, not two blanks
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)
        sidecar = name.replace(".nii.gz", ".labels.json")
        assert (remote / sidecar).read_text().count('"target"') == 2
    seg_remote, seg_local = seg_content(remote / "series.dcm"), seg_content(local / "series.dcm")
    assert seg_remote[0] == seg_local[0]
    assert sorted(seg_remote[1]) == sorted(seg_local[1])
    for pos, plane in seg_local[1].items():
        np.testing.assert_array_equal(seg_remote[1][pos], plane)
    metrics = server.metrics_text()
    assert 'nv_inference_request_success{model="promptseg",version="1"}' in metrics


def _infer(server, arrays: dict[str, np.ndarray]):
    client = http.InferenceServerClient(server.url, network_timeout=300)
    feed = []
    for name, arr in arrays.items():
        kind = {np.float32: "FP32", np.float64: "FP64", np.object_: "BYTES", np.int16: "INT16"}
        item = http.InferInput(name, list(arr.shape), kind[arr.dtype.type])
        item.set_data_from_numpy(arr, binary_data=True)
        feed.append(item)
    try:
        return client.infer("promptseg", feed)
    finally:
        client.close()


def _cli_message(*args: object) -> str:
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("promptseg-run: error: ")
    return lines[0][len("promptseg-run: error: ") :]


def test_bad_requests_get_the_cli_message_and_the_server_keeps_serving(
    server, chaos: Path, tmp_path: Path
) -> None:
    from promptseg.runtime.io import read_input
    from promptseg.runtime.serve_protocol import encode_request, error_message

    image, _ = read_input(chaos)
    small = type(image)(
        image.data[:, :, 10:14].copy(), image.affine, image.spacing, str(chaos), "nifti", {}
    )
    opts = {"source": str(chaos), "modality": "mr"}
    for prompt in ("xyzzy grob", ""):
        with pytest.raises(Exception) as info:
            _infer(server, encode_request(small, [prompt], opts))
        want = _cli_message(chaos, "--prompt", prompt, "-o", tmp_path / "x.nii.gz")
        assert error_message(info.value.message()) == want
    nan = encode_request(small, ["liver"], {**opts, "source": "scan.nii.gz"})
    nan["image"] = nan["image"].copy()  # not the volume's own array
    nan["image"][1, 2, 3] = np.nan
    with pytest.raises(Exception) as info:
        _infer(server, nan)
    n = nan["image"].size
    assert error_message(info.value.message()) == (
        f"scan.nii.gz: contains 1 NaN and 0 Inf voxels out of {n}; expected finite intensities"
    )
    wrong_dtype = encode_request(small, ["liver"], opts)
    wrong_dtype["image"] = wrong_dtype["image"].astype(np.int16)
    with pytest.raises(Exception, match="data-type is 'INT16'"):
        _infer(server, wrong_dtype)
    wrong_rank = encode_request(small, ["liver"], opts)
    wrong_rank["image"] = wrong_rank["image"][:, :, 0]
    with pytest.raises(Exception, match="image"):
        _infer(server, wrong_rank)
    # Still serving: a good request answers, and the server is ready.
    good = _infer(server, encode_request(small, ["liver"], opts))
    assert good.as_numpy("labels").shape == small.data.shape
    assert server.ready()
    assert not list(tmp_path.iterdir())  # the local CLI runs wrote nothing either


def test_a_client_killed_mid_request_leaves_the_server_healthy(
    server, chaos: Path, tmp_path: Path
) -> None:
    dropped = tmp_path / "dropped.nii.gz"
    args = (chaos, *PROMPTS, "--batch", "1", "-o", dropped, "--server", server.url)
    assert server.kill_mid_request(lambda: _start_cli(*args), "promptseg_slices")
    assert not dropped.exists()
    proc = run_cli(
        chaos,
        "--prompt",
        "liver",
        "-o",
        tmp_path / "after.nii.gz",
        "--server",
        server.url,
        threads=False,
    )
    _ok(proc)
    assert server.ready() and server.proc.poll() is None


def test_server_errors_are_one_line(tmp_path: Path, chaos: Path) -> None:
    from promptseg.runtime.serve_process import free_ports

    (port,) = free_ports(1)
    proc = run_cli(chaos, "--prompt", "liver", "--server", f"127.0.0.1:{port}", threads=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "is not reachable" in proc.stderr
    proc = run_cli(chaos, "--prompt", "liver", "--server", "127.0.0.1:1", "--engine", tmp_path)
    assert proc.returncode == 2 and "--engine: is not used with --server" in proc.stderr


@pytest.fixture(scope="module")
def presence_engine(tmp_path_factory, text_encoder, vocab_embeddings) -> Path:
    """An engine exported from a tiny checkpoint with a (seeded, untrained) presence head."""
    from promptseg.export import export_model
    from tests.conftest import make_checkpoint

    root = tmp_path_factory.mktemp("presence-engine")
    checkpoint = make_checkpoint(
        root / "presence.pt", text_encoder, vocab_embeddings, presence_hidden=8
    )
    export_model(checkpoint, root / "engine", verify=False, progress=False)
    return root / "engine"


def _median_probabilities(engine: Path, image: Path) -> tuple[float, float]:
    """The median 'liver' mask probability and the median slice presence probability of the
    engine on ``image`` (a threshold and a tau that keep about half)."""
    from promptseg.data.readers import read_volume
    from promptseg.preprocess import normalize, resize_bilinear, sigmoid
    from promptseg.runtime import EngineFolder, OrtEngine, PromptResolver

    folder = EngineFolder.open(engine)
    r = folder.resolution
    data = normalize(read_volume(image).data, "mr", folder.preprocessing).transpose(2, 0, 1)
    x = np.ascontiguousarray(resize_bilinear(data, (r, r))[:, None])
    film = np.repeat(PromptResolver(folder).resolve("liver").film[None], len(x), axis=0)
    with OrtEngine(folder, threads=1) as engine:
        out = engine.infer({"image": x, "film": film})
    return float(np.median(sigmoid(out["logits"]))), float(np.median(sigmoid(out["presence"])))


def test_presence_options_reach_the_server(presence_engine: Path, chaos: Path, tmp_path) -> None:
    """--presence-threshold and --no-presence-gate with --server give the local run's voxels."""
    from promptseg.runtime.serve_process import ServerProcess

    assert [o["name"] for o in json.loads((presence_engine / "manifest.json").read_text())[
        "outputs"
    ]] == ["logits", "presence"]  # fmt: skip
    threshold, tau = _median_probabilities(presence_engine, chaos)
    gates = {"gated": [], "open": ["--no-presence-gate"]}
    srv = ServerProcess(tmp_path / "server.log", "--engine", str(presence_engine))
    runs = {}
    try:
        for name, gate in gates.items():
            for where in ("local", "remote"):
                here = ["--engine", presence_engine] if where == "local" else ["--server", srv.url]
                out, summary = (
                    tmp_path / f"{where}-{name}.nii.gz",
                    tmp_path / f"{where}-{name}.json",
                )
                _ok(run_cli(chaos, "--prompt", "liver", "--threshold", repr(threshold),
                            "--presence-threshold", repr(tau), *gate, *here, "-o", out,
                            "--json", summary, "--quiet", threads=where == "local"))  # fmt: skip
                stats = json.loads(summary.read_text())["results"][0]["prompts"][0]
                runs[where, name] = (_voxels(out), stats)
    finally:
        assert srv.stop() == 0, srv.tail()
    n_slices = runs["local", "gated"][0].shape[2]
    for name in gates:
        local, remote = runs["local", name], runs["remote", name]
        np.testing.assert_array_equal(remote[0], local[0])
        assert remote[1]["slices_gated"] == local[1]["slices_gated"]
        assert remote[1]["presence_max_probability"] == local[1]["presence_max_probability"]
    assert 0 < runs["local", "gated"][1]["slices_gated"] < n_slices
    assert runs["local", "open"][1]["slices_gated"] == 0
    open_mask, gated_mask = runs["local", "open"][0], runs["local", "gated"][0]
    assert (gated_mask <= open_mask).all() and gated_mask.sum() < open_mask.sum()


def test_request_options_carry_the_run_options() -> None:
    """The options JSON round-trips promptseg-run's Options; bad presence values are refused."""
    from promptseg.runtime.errors import InputError
    from promptseg.runtime.io import Image2D
    from promptseg.runtime.pipeline import Options
    from promptseg.runtime.serve_protocol import (
        decode_request,
        encode_request,
        pipeline_options,
        request_options,
    )

    image = Image2D(np.zeros((8, 8), np.float32), {"bit_depth": 8}, "x.png")
    for options in (
        Options(4, 0.3, "auto", "none", 0.25, True),
        Options(presence_gate=False),
        Options(modality="ct"),
    ):
        sent = encode_request(image, ["liver"], request_options(image, "x.png", options))
        _, prompts, received = decode_request(sent)
        assert received["modality"] == ("uint8" if options.modality == "auto" else "ct")
        assert prompts == ["liver"] and pipeline_options(received) == options
    for bad, flag in (({"presence_threshold": "high"}, "--presence-threshold"),
                      ({"presence_gate": 1}, "--presence-gate"),
                      ({"presence_threshold": 1.5}, "--presence-threshold")):  # fmt: skip
        sent = encode_request(image, ["liver"], {"source": "x.png", **bad})
        with pytest.raises(InputError, match=f"^{flag}: "):
            pipeline_options(decode_request(sent)[2])
