"""``promptseg serve``: an engine folder behind NVIDIA Triton Inference Server (PyTriton).

Two models (tensors in :mod:`promptseg.runtime.serve_protocol`, design in docs/serving.md):
``promptseg_slices`` runs the engine on preprocessed slices with Triton's dynamic batcher, one
engine per instance, loaded once; ``promptseg`` takes a whole volume with its affine and prompts
and runs :func:`segment_request` (the runtime's own pipeline), whose engine is the slice model
over loopback gRPC, so slices of concurrent volume requests share batches. Needs
``pip install 'promptseg[serve]'`` (nvidia-pytriton, tritonclient).

PyTriton's Python-backend stub loads ``libpython3.X.so`` by soname; :func:`server_environment`
puts this interpreter's own library folder first on ``LD_LIBRARY_PATH`` so that the stub gets
the library of the interpreter that runs the models (pyenv builds differ from the system's).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.data.readers import InputError, PathLike, Volume
from promptseg.runtime.api import EngineFacts, result_summary
from promptseg.runtime.engines import Engine
from promptseg.runtime.io import Image2D
from promptseg.runtime.manifest import EngineFolder
from promptseg.runtime.pipeline import SegmentationResult
from promptseg.runtime.segmenter import Segmenter, open_checked_engine
from promptseg.runtime.serve_protocol import (
    ERROR_PREFIX,
    SLICE_MODEL,
    VOLUME_MODEL,
    decode_request,
    encode_response,
    pipeline_options,
)

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
SLICE_TIMEOUT_S = 600.0


class RequestError(Exception):
    """A bad request: Triton answers it with ``promptseg serve: error: <the CLI's message>``.

    PyTriton sends ``traceback.format_exception(exc)`` as the error text; this class has no
    traceback and a qualified name that reads as the prefix, so the text is that one line.
    """

    @property  # type: ignore[override]
    def __traceback__(self) -> None:  # noqa: D401 - the error text carries no traceback
        return None

    @__traceback__.setter
    def __traceback__(self, value: Any) -> None:
        pass


RequestError.__module__ = "builtins"
RequestError.__qualname__ = ERROR_PREFIX


def python_library_dir() -> Path | None:
    """This interpreter's folder holding ``libpython3.X.so`` (None for a static build)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}"
    if libdir and any(Path(libdir).glob(f"{name}*.so*")):
        return Path(libdir)
    return None


def server_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` with this interpreter's library folder first on ``LD_LIBRARY_PATH``."""
    env = dict(os.environ if environ is None else environ)
    libdir = python_library_dir()
    if libdir is not None:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libdir), *parts])
    return env


class TritonSliceEngine(Engine):
    """The slice model seen as an :class:`Engine` (gRPC on loopback), for :func:`segment`.

    Args:
        url: gRPC address of the server (host:port).
        folder: The served engine folder (its inputs and outputs).
        info: The slice engines' :meth:`Engine.describe`.
    """

    def __init__(self, url: str, folder: EngineFolder, info: dict[str, Any]) -> None:
        import tritonclient.grpc as grpcclient

        super().__init__(folder.inputs, folder.outputs)
        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.backend = f"triton:{info['backend']}"
        self.precision = info["precision"]
        self.providers = list(info["providers"])
        self.source = info["source"]
        self.folder = folder

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        grpc = self._grpc
        feed = []
        for name in ("image", "film"):
            arr = np.ascontiguousarray(inputs[name], dtype=np.float32)
            item = grpc.InferInput(name, list(arr.shape), "FP32")
            item.set_data_from_numpy(arr)
            feed.append(item)
        names = [s.name for s in self.outputs]
        result = self.client.infer(
            SLICE_MODEL,
            feed,
            outputs=[grpc.InferRequestedOutput(n) for n in names],
            client_timeout=SLICE_TIMEOUT_S,
        )
        return {n: result.as_numpy(n) for n in names}

    def close(self) -> None:
        self.client.close()


def segment_request(
    image: Volume | Image2D, prompts: list[str], options: dict[str, Any], segmenter: Segmenter
) -> SegmentationResult:
    """Segment one request's image as ``promptseg-run`` does: the request's options checked as
    :class:`~promptseg.runtime.pipeline.Options`, the prompts resolved and the image segmented
    by the :class:`Segmenter` (the server's only adapter).

    Raises:
        InputError: A bad prompt or option (the message ``promptseg-run`` prints).
    """
    run_options = pipeline_options(options)
    resolved = segmenter.resolve(prompts)
    return segmenter.segment(image, resolved, options=run_options)


def response_summary(result: SegmentationResult, facts: EngineFacts) -> dict[str, Any]:
    """The ``summary`` of a response: :func:`~promptseg.runtime.api.result_summary`, warnings,
    stage seconds and the backend notes."""
    return {
        **result_summary(result, facts),
        "warnings": result.warnings,
        "seconds": {k: round(v, 4) for k, v in result.seconds.items()},
        "backend_notes": list(facts.notes),
    }


def volume_infer_function(
    folder: EngineFolder, grpc_url: str, info: dict[str, Any], threads: int | None
) -> Callable[[list], list[dict[str, np.ndarray]]]:
    """One instance of the ``promptseg`` model: its own :class:`Segmenter` (prompt resolver),
    whose engine is the slice model (connected on the first request)."""
    segmenter = Segmenter(folder, threads=threads, load=False)
    state: dict[str, EngineFacts] = {}
    lock = threading.Lock()

    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        with lock:
            if "facts" not in state:  # the server is up once requests arrive
                engine = segmenter.use_engine(TritonSliceEngine(grpc_url, folder, info))
                state["facts"] = EngineFacts.of(engine, folder)
        responses = []
        for request in requests:
            try:
                image, prompts, options = decode_request(dict(request.items()))
                result = segment_request(image, prompts, options, segmenter)
            except InputError as exc:
                raise RequestError(str(exc)) from None
            summary = response_summary(result, state["facts"])
            responses.append(encode_response(result.labels, summary))
        return responses

    return infer


def slice_infer_function(engine: Engine) -> Callable[..., dict[str, np.ndarray]]:
    """One instance of the ``promptseg_slices`` model: its own engine, batches as they come."""
    from pytriton.decorators import batch

    @batch
    def infer(image: np.ndarray, film: np.ndarray) -> dict[str, np.ndarray]:
        out = engine.infer(
            {
                "image": np.ascontiguousarray(image, dtype=np.float32),
                "film": np.ascontiguousarray(film, dtype=np.float32),
            }
        )
        return {name: np.asarray(value, dtype=np.float32) for name, value in out.items()}

    return infer


@dataclass
class ServeOptions:
    """Settings of :func:`serve` (the ``promptseg serve`` options)."""

    engine: PathLike | None = None
    host: str = "127.0.0.1"
    http_port: int = DEFAULT_PORTS["http"]
    grpc_port: int = DEFAULT_PORTS["grpc"]
    metrics_port: int = DEFAULT_PORTS["metrics"]
    max_batch: int = 64
    instances: int = 1
    backend: str = "auto"
    precision: str | None = None
    threads: int | None = None
    queue_delay_us: int = 2000


def check_serve_options(opts: ServeOptions) -> None:
    """Raise InputError for ports, batch sizes or instance counts that cannot work."""
    ports = {"--http-port": opts.http_port, "--grpc-port": opts.grpc_port}
    ports["--metrics-port"] = opts.metrics_port
    for name, port in ports.items():
        if not 0 < int(port) < 65536:
            raise InputError(name, f"must be a port number 1..65535, got {port}")
    if len(set(ports.values())) != len(ports):
        raise InputError(
            "--http-port", f"the three ports must differ, got {sorted(ports.values())}"
        )
    if int(opts.max_batch) < 1:
        raise InputError("--max-batch", f"must be at least 1, got {opts.max_batch}")
    if int(opts.instances) < 1:
        raise InputError("--instances", f"must be at least 1, got {opts.instances}")


def _open_engines(opts: ServeOptions, folder: EngineFolder) -> list[Engine]:
    """One checked engine per instance of the slice model (all closed if one fails)."""
    engines: list[Engine] = []
    try:
        for _ in range(int(opts.instances)):
            engines.append(
                open_checked_engine(
                    opts.backend, folder, opts.precision, opts.threads, int(folder.film_dim)
                )
            )
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return engines


def bind_models(
    triton: Any, folder: EngineFolder, engines: list[Engine], opts: ServeOptions
) -> None:
    """Bind ``promptseg_slices`` (one engine per instance) and ``promptseg`` to a PyTriton server."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    res = folder.resolution
    film = int(folder.film_dim)
    outputs = [
        Tensor(name=s.name, dtype=np.float32, shape=tuple(int(d) for d in s.shape[1:]))
        for s in folder.outputs
    ]
    triton.bind(
        model_name=SLICE_MODEL,
        infer_func=[slice_infer_function(e) for e in engines],
        inputs=[
            Tensor(name="image", dtype=np.float32, shape=(1, res, res)),
            Tensor(name="film", dtype=np.float32, shape=(film,)),
        ],
        outputs=outputs,
        config=ModelConfig(
            max_batch_size=int(opts.max_batch),
            batcher=DynamicBatcher(max_queue_delay_microseconds=int(opts.queue_delay_us)),
        ),
        strict=True,
    )
    grpc_url = f"{_loopback(opts.host)}:{opts.grpc_port}"
    info = engines[0].describe()
    triton.bind(
        model_name=VOLUME_MODEL,
        infer_func=[
            volume_infer_function(folder, grpc_url, info, opts.threads)
            for _ in range(int(opts.instances))
        ],
        inputs=[
            Tensor(name="image", dtype=np.float32, shape=(-1, -1, -1)),
            Tensor(name="affine", dtype=np.float64, shape=(4, 4)),
            Tensor(name="prompts", dtype=np.bytes_, shape=(-1,)),
            Tensor(name="options", dtype=np.bytes_, shape=(1,), optional=True),
        ],
        outputs=[
            Tensor(name="labels", dtype=np.uint8, shape=(-1, -1, -1)),
            Tensor(name="summary", dtype=np.bytes_, shape=(1,)),
        ],
        config=ModelConfig(batching=False),
        strict=True,
    )


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def triton_config(opts: ServeOptions) -> Any:
    from pytriton.triton import TritonConfig

    return TritonConfig(
        http_address=opts.host,
        http_port=int(opts.http_port),
        grpc_address=opts.host,
        grpc_port=int(opts.grpc_port),
        metrics_port=int(opts.metrics_port),
        metrics_address=opts.host,
        log_verbose=0,
        exit_timeout_secs=5,
    )


def start(opts: ServeOptions, log: Callable[[str], None] = print) -> Any:
    """Open the engine (``instances`` times), start Triton and bind the models.

    Returns:
        The running ``pytriton.triton.Triton`` (call ``.stop()``, or ``.serve()`` to block).

    Raises:
        InputError: Bad options, engine folder or backend; PyTriton not installed.
    """
    check_serve_options(opts)
    try:
        from pytriton.triton import Triton
    except ImportError as exc:
        raise InputError(
            "serve", f"needs PyTriton: pip install 'promptseg[serve]' ({exc})"
        ) from exc
    folder = EngineFolder.open(opts.engine)
    engines = _open_engines(opts, folder)
    os.environ.update(server_environment())  # the server process inherits it
    t0 = time.perf_counter()
    triton = Triton(config=triton_config(opts))
    try:
        bind_models(triton, folder, engines, opts)
        triton.run()
    except BaseException:
        triton.stop()
        raise
    log(
        f"promptseg serve: {folder.path} ({engines[0].backend}, {opts.instances} instance(s), "
        f"max batch {opts.max_batch}) ready in {time.perf_counter() - t0:.1f} s: "
        f"http {opts.host}:{opts.http_port}, grpc {opts.host}:{opts.grpc_port}, "
        f"metrics {opts.host}:{opts.metrics_port}"
    )
    return triton


def serve(opts: ServeOptions, log: Callable[[str], None] = print) -> None:
    """Run the server until interrupted (SIGINT/SIGTERM), then shut Triton down."""
    import signal

    triton = start(opts, log)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set() and triton.is_alive():
            stop.wait(1.0)
    finally:
        log("promptseg serve: shutting down")
        triton.stop()


def cmd_serve(args: Any) -> int:
    """Run ``promptseg serve`` until interrupted."""
    opts = ServeOptions(
        engine=args.engine,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        max_batch=args.max_batch,
        instances=args.instances,
        backend=args.backend,
        precision=args.precision,
        threads=args.threads,
    )
    serve(opts, log=lambda line: print(line, flush=True))
    return 0
