"""Bounded load test of ``promptseg serve`` on loopback, against the local runtime (stand-alone).

Steps:

1. ``--volumes`` inputs are cut from the example volume (``--input``; ``--slices`` consecutive
   slices each, at different offsets, so that a mixed-up answer is caught) and written as NIfTI.
2. The local reference: ``promptseg-run`` (one process, engine loaded once) segments them all;
   its wall time gives the local throughput and its JSON the per-volume local times.
3. ``promptseg serve`` starts on free loopback ports (startup time recorded).
4. ``--clients`` threads each send every volume (in their own order) to the server's
   ``promptseg`` model; each answer is compared voxel for voxel with the local label map.
5. The slice model's Triton metrics give the mean batch size the dynamic batcher formed.
6. Faults: a ``promptseg-run --server`` client (one slice per slice request) is killed once
   the server has answered its first slice request; the server must stay ready and answer
   one more request correctly.

Prints a JSON report (throughput in volumes/s and slices/s, latency p50/p95/p99 in ms, the
number of mismatched or failed answers, the fault check); ``--json FILE`` also writes it.
Exit code 1 when any answer differs from the local result or the fault check fails.

Usage::

    python bench/serve_load.py [--clients 4] [--volumes 8] [--slices 16] [--prompt liver]
        [--engine DIR] [--instances 1] [--max-batch 64] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "promptseg" / "examples" / "chaos_mr_1.nii.gz"


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 and mean of latencies (s), in milliseconds (None when empty)."""
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "n": 0}
    arr = np.asarray(seconds) * 1000.0
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {
        "p50": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "p99": round(float(p99), 2),
        "mean": round(float(arr.mean()), 2),
        "n": int(arr.size),
    }


def cut_volumes(source: Path, out: Path, count: int, slices: int | None) -> list[Path]:
    """``count`` NIfTI files of ``slices`` consecutive slices of ``source`` at spread offsets."""
    import nibabel as nib

    img = nib.load(str(source))
    data = np.asarray(img.dataobj)
    depth = data.shape[2]
    n = depth if not slices else min(int(slices), depth)
    starts = np.linspace(0, depth - n, num=count).round().astype(int) if count > 1 else [0]
    paths = []
    for i, z in enumerate(starts):
        shift = np.eye(4)
        shift[2, 3] = float(z)
        path = out / f"vol{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(data[:, :, z : z + n].copy(), img.affine @ shift), str(path))
        paths.append(path)
    return paths


def _cli(name: str) -> list[str]:
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.is_file() else [sys.executable, "-m", f"promptseg.{name}"]


def local_reference(
    paths: list[Path], prompts: list[str], work: Path, engine: str | None, threads: int | None
) -> tuple[dict[Path, np.ndarray], dict[str, Any]]:
    """Label maps from one local ``promptseg-run`` over every input, and its timings."""
    import nibabel as nib

    out = work / "local"
    cmd = [*_cli("promptseg-run"), *map(str, paths), "-o", str(out), "--quiet"]
    cmd += [a for p in prompts for a in ("--prompt", p)] + ["--json", str(work / "local.json")]
    cmd += ["--engine", engine] if engine else []
    cmd += ["--threads", str(threads)] if threads else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"local promptseg-run failed: {proc.stderr.strip()}")
    results = json.loads((work / "local.json").read_text())["results"]
    labels = {Path(r["input"]): np.asarray(nib.load(r["output"]).dataobj) for r in results}
    per_volume = [r["seconds"]["total"] for r in results]
    return labels, {"wall_s": round(wall, 3), "per_volume_ms": percentiles_ms(per_volume)}


def load(
    url: str,
    paths: list[Path],
    prompts: list[str],
    reference: dict[Path, np.ndarray],
    clients: int,
) -> dict[str, Any]:
    """``clients`` threads, each sending every volume once (rotated order); all checked."""
    from promptseg.runtime.io import read_input
    from promptseg.runtime.pipeline import Options
    from promptseg.runtime.remote import ServerClient
    from promptseg.runtime.serve_protocol import decode_response, encode_request, request_options

    images = {p: read_input(p)[0] for p in paths}
    latencies: list[float] = []
    problems: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = ServerClient(url)
        try:
            for i in range(len(paths)):
                path = paths[(i + k) % len(paths)]
                image = images[path]
                options = request_options(image, str(path), Options())  # promptseg-run's
                t = time.perf_counter()
                try:
                    answer = conn.segment(encode_request(image, prompts, options))
                    labels, _ = decode_response(answer, image)
                except Exception as exc:  # counted, never hidden
                    with lock:
                        problems.append(f"client {k} {path.name}: {exc}")
                    continue
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    if not np.array_equal(labels, reference[path]):
                        problems.append(f"client {k} {path.name}: labels differ from the local run")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 3), "latency_ms": percentiles_ms(latencies), "problems": problems}


def fault_check(url: str, server: Any, path: Path, prompts: list[str], work: Path) -> dict:
    """Kill a ``promptseg-run --server`` client (on the whole ``--input`` volume, one slice per
    slice request) once the server has answered its first slice request; the server must stay
    ready and answer the next request."""
    base = [*_cli("promptseg-run"), str(path), "--server", url]
    base += [a for p in prompts for a in ("--prompt", p)]

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [*base, "--batch", "1", "-o", str(work / "killed.nii.gz")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    killed_mid_request = server.kill_mid_request(start, "promptseg_slices")
    after = subprocess.run([*base, "-o", str(work / "after.nii.gz")], capture_output=True)
    return {
        "killed_mid_request": killed_mid_request,
        "nothing_written_by_killed_client": not (work / "killed.nii.gz").exists(),
        "next_request_ok": after.returncode == 0,
        "server_ready": server.ready() and server.proc.poll() is None,
    }


def batch_stats(server: Any) -> dict[str, float]:
    """Requests, executions and mean batch (requests per execution) of the slice model."""
    requests = server.model_metric("nv_inference_request_success", "promptseg_slices")
    execs = server.model_metric("nv_inference_exec_count", "promptseg_slices")
    return {
        "slice_requests": requests,
        "slice_executions": execs,
        "requests_per_execution": round(requests / execs, 3) if execs else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--slices", type=int, default=16, help="slices per volume (0: all)")
    ap.add_argument("--prompt", action="append", help="default: liver")
    ap.add_argument("--input", type=Path, default=EXAMPLE)
    ap.add_argument("--engine", default=None)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="ORT threads (local and server)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.clients < 1 or args.volumes < 1 or args.slices < 0:
        ap.error("--clients and --volumes must be >= 1, --slices >= 0")
    import nibabel as nib

    from promptseg.runtime.serve_process import ServerProcess

    prompts = args.prompt or ["liver"]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        paths = cut_volumes(args.input, work, args.volumes, args.slices)
        n_slices = sum(int(nib.load(str(p)).shape[2]) for p in paths)
        reference, local = local_reference(paths, prompts, work, args.engine, args.threads)
        extra = ["--instances", str(args.instances), "--max-batch", str(args.max_batch)]
        extra += ["--engine", args.engine] if args.engine else []
        server = ServerProcess(work / "server.log", *extra)
        try:
            served = load(server.url, paths, prompts, reference, args.clients)
            batching = batch_stats(server)  # the load alone, before the fault check
            faults = fault_check(server.url, server, args.input, prompts, work)
        finally:
            code = server.stop()
    volumes = args.clients * args.volumes
    report = {
        "clients": args.clients,
        "volumes_per_client": args.volumes,
        "slices_per_volume": n_slices / len(paths),
        "prompts": prompts,
        "server_startup_s": round(server.startup_s, 2),
        "server_exit_code": code,
        "local": {
            **local,
            "volumes_per_s": round(len(paths) / local["wall_s"], 3),
            "slices_per_s": round(n_slices / local["wall_s"], 2),
        },
        "server": {
            "wall_s": served["wall_s"],
            "latency_ms": served["latency_ms"],
            "volumes_per_s": round(volumes / served["wall_s"], 3),
            "slices_per_s": round(args.clients * n_slices / served["wall_s"], 2),
            **batching,
        },
        "answers_checked": served["latency_ms"]["n"],
        "problems": served["problems"],
        "faults": faults,
        "cpu_count": os.cpu_count(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    ok = not served["problems"] and served["latency_ms"]["n"] == volumes
    ok = ok and all(faults.values()) and code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
