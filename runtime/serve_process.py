"""A real ``promptseg serve`` in a subprocess on loopback ports (used by tests and bench/serve_load.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


class ServerProcess:
    """``promptseg serve`` on free loopback ports; :meth:`stop` shuts it down (SIGINT).

    Args:
        log: File receiving the server's output.
        extra: More ``promptseg serve`` options (e.g. ``--engine DIR``).
    """

    def __init__(self, log: Path, *extra: str, timeout: float = 180.0) -> None:
        self.http, self.grpc, self.metrics = free_ports(3)
        self.url = f"127.0.0.1:{self.http}"
        self.log = log
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
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env)
        while not self.models_ready():
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"promptseg serve did not start; see {log}:\n{self.tail()}")
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - t0

    def models_ready(self) -> bool:
        base = f"http://{self.url}/v2"
        return all(
            _get(f"{base}/models/{m}/ready")[0] == 200 for m in ("promptseg", "promptseg_slices")
        )

    def ready(self) -> bool:
        return _get(f"http://{self.url}/v2/health/ready")[0] == 200

    def metrics_text(self) -> str:
        return _get(f"http://127.0.0.1:{self.metrics}/metrics")[1]

    def tail(self, n: int = 40) -> str:
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
