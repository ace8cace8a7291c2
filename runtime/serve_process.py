"""A real ``promptseg serve`` in a subprocess on loopback ports (used by tests and bench/serve_load.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except OSError:
        return 0, ""


def _promptseg() -> list[str]:
    script = Path(sys.executable).with_name("promptseg")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "promptseg.cli"]


class _LoopbackServer:
    """A server subprocess on three free loopback ports, waited for until its models are ready."""

    models: tuple[str, ...] = ()

    def _launch(self, cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> None:
        self.url = f"127.0.0.1:{self.http}"
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env)
        while not self.models_ready():
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"{cmd[0]} did not start; see {log}:\n{self.tail()}")
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - t0

    def models_ready(self) -> bool:
        base = f"http://{self.url}/v2"
        return all(_get(f"{base}/models/{m}/ready")[0] == 200 for m in self.models)

    def ready(self) -> bool:
        return _get(f"http://{self.url}/v2/health/ready")[0] == 200

    def metrics_text(self) -> str:
        return _get(f"http://127.0.0.1:{self.metrics}/metrics")[1]

    def model_metric(self, name: str, model: str) -> float:
        """One counter of one model from Triton's metrics (0.0 while it has none)."""
        prefix = f'{name}{{model="{model}"'
        for line in self.metrics_text().splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def kill_mid_request(
        self, start: Callable[[], subprocess.Popen], model: str, timeout: float = 120.0
    ) -> bool:
        """Start a client with ``start()`` and kill it once ``model`` has answered one more
        request than before (the server is working on the client's request).

        Returns:
            Whether the client was still waiting for its answer when it was killed.
        """
        before = self.model_metric("nv_inference_request_success", model)
        job = start()
        t0 = time.perf_counter()
        while job.poll() is None and time.perf_counter() - t0 < timeout:
            if self.model_metric("nv_inference_request_success", model) > before:
                break
            time.sleep(0.02)
        waiting = job.poll() is None
        job.kill()
        job.communicate(timeout=60)
        return waiting

    def tail(self, n: int = 40) -> str:
        if not self._out.closed:
            self._out.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGINT, then wait; kill only if it does not exit. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


class ServerProcess(_LoopbackServer):
    """``promptseg serve`` on free loopback ports; :meth:`stop` shuts it down (SIGINT).

    Args:
        log: File receiving the server's output.
        extra: More ``promptseg serve`` options (e.g. ``--engine DIR``).
    """

    models = ("promptseg", "promptseg_slices")

    def __init__(self, log: Path, *extra: str, timeout: float = 180.0) -> None:
        self.http, self.grpc, self.metrics = free_ports(3)
        cmd = [
            *_promptseg(),
            "serve",
            "--http-port",
            str(self.http),
            "--grpc-port",
            str(self.grpc),
            "--metrics-port",
            str(self.metrics),
            "--threads",
            "1",
            *extra,
        ]
        self._launch(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, log, timeout)


class BundledTriton(_LoopbackServer):
    """PyTriton's own ``tritonserver`` binary pointed at a model repository.

    PyTriton ships the server with the Python backend only (no onnxruntime or TensorRT
    backends); as PyTriton does itself, the binary and backends are copied to ``workdir`` with
    the Python-backend stub of this interpreter's version, the server's libraries and this
    interpreter's ``libpython`` go on ``LD_LIBRARY_PATH``, and ``models`` are loaded explicitly.

    Args:
        repo: The model repository.
        models: Models to load (``--model-control-mode explicit``).
        workdir: Scratch folder for the server's copy.
        log: File receiving the server's output.
    """

    def __init__(
        self, repo: Path, models: Sequence[str], workdir: Path, log: Path, timeout: float = 120.0
    ) -> None:
        import pytriton
        from pytriton.utils.distribution import get_libs_path, get_stub_path

        from promptseg.runtime.serve import server_environment

        self.models = tuple(models)
        self.http, self.grpc, self.metrics = free_ports(3)
        server = Path(workdir) / "tritonserver"
        shutil.copytree(
            Path(pytriton.__file__).parent / "tritonserver",
            server,
            ignore=shutil.ignore_patterns("python_backend_stubs"),
        )
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server / "backends" / "python" / "triton_python_backend_stub"
        shutil.copy(get_stub_path(version), stub)
        env = server_environment()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [env.get("LD_LIBRARY_PATH", ""), str(get_libs_path())]
        )
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        cmd = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={repo}",
            f"--backend-directory={server / 'backends'}",
            f"--cache-directory={server / 'caches'}",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in self.models],
            "--http-address=127.0.0.1",
            f"--http-port={self.http}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc}",
            f"--metrics-port={self.metrics}",
            "--exit-timeout-secs=10",
        ]
        self._launch(cmd, env, log, timeout)
