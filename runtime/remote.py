"""``promptseg-run --server HOST:PORT``: the same run, segmented by a ``promptseg serve`` server.

Inputs are planned, read and checked here exactly as for a local run (the helpers of
:mod:`promptseg.runtime.api`), every image is sent to the server's ``promptseg`` model (Triton
HTTP, tritonclient) and only once every answer is back are the outputs written, with the
writer of a local run (NIfTI/PNG, labels sidecar, DICOM SEG, JSON summary), so a refused
prompt or a bad input leaves nothing behind. Needs ``pip install 'promptseg[serve]'``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.runtime import dicom_seg
from promptseg.runtime.api import (
    EngineFacts,
    check_sidecars,
    each_image,
    plan_run,
    read_inputs,
    write_result,
)
from promptseg.runtime.errors import InputError, PathLike, first_line
from promptseg.runtime.io import input_kind
from promptseg.runtime.pipeline import Options, SegmentationResult
from promptseg.runtime.prompt_resolver import ResolvedPrompt
from promptseg.runtime.segmenter import SegmenterResult
from promptseg.runtime.serve_protocol import (
    ERROR_PREFIX,
    VOLUME_MODEL,
    decode_response,
    encode_request,
    error_message,
    request_options,
)
from promptseg.runtime.writers import write_json_atomic

DTYPES = {np.float32: "FP32", np.float64: "FP64", np.object_: "BYTES"}
TIMEOUT_S = 900.0


def parse_server(server: str) -> str:
    """``HOST:PORT`` (an ``http://`` prefix is dropped), checked.

    Raises:
        InputError: Not host:port with a port number.
    """
    url = str(server).strip()
    for prefix in ("http://", "https://"):
        if url.startswith(prefix):
            url = url[len(prefix) :]
    host, _, port = url.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError("--server", f"{server!r} is not HOST:PORT (the server's HTTP port)")
    return f"{host}:{port}"


class ServerClient:
    """A tritonclient HTTP connection to a ``promptseg serve`` server.

    Raises:
        InputError: tritonclient missing, or the server is not reachable / not ready.
    """

    def __init__(self, server: str, timeout: float = TIMEOUT_S) -> None:
        try:
            import tritonclient.http as http
        except ImportError as exc:
            raise InputError(
                "--server", f"needs tritonclient: pip install 'promptseg[serve]' ({exc})"
            ) from exc
        self.url = parse_server(server)
        self._http = http
        self.client = http.InferenceServerClient(
            self.url, connection_timeout=timeout, network_timeout=timeout
        )
        try:
            ready = self.client.is_model_ready(VOLUME_MODEL)
        except Exception as exc:  # connection refused, DNS, ...
            raise InputError(
                "--server", f"{self.url} is not reachable ({first_line(exc)})"
            ) from exc
        if not ready:
            raise InputError(
                "--server", f"{self.url} does not serve a ready '{VOLUME_MODEL}' model"
            )

    def segment(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One ``promptseg`` request; a refused request raises InputError with its message."""
        http = self._http
        feed = []
        for name, arr in arrays.items():
            item = http.InferInput(name, list(arr.shape), DTYPES[arr.dtype.type])
            item.set_data_from_numpy(arr, binary_data=True)
            feed.append(item)
        wanted = [http.InferRequestedOutput(n, binary_data=True) for n in ("labels", "summary")]
        try:
            result = self.client.infer(VOLUME_MODEL, feed, outputs=wanted)
        except Exception as exc:  # InferenceServerException carries the server's message
            text = str(exc.message() if hasattr(exc, "message") else exc)
            if ERROR_PREFIX in text:  # a refused request: the message promptseg-run prints
                raise InputError(error_message(text)) from exc
            raise InputError("--server", f"{self.url} failed ({first_line(exc)})") from exc
        return {n: result.as_numpy(n) for n in ("labels", "summary")}

    def close(self) -> None:
        self.client.close()


def _answer(
    image: Any, notes: list[str], labels: np.ndarray, summary: dict[str, Any]
) -> SegmenterResult:
    """A server's answer as the :class:`SegmenterResult` a local run would have."""
    stats = summary["prompts"]
    result = SegmentationResult(
        labels,
        [ResolvedPrompt.from_summary(s) for s in stats],
        stats,
        summary["modality"],
        summary["seconds"],
        summary["warnings"],
    )
    return SegmenterResult(
        labels=labels,
        targets=[s["target"] for s in stats],
        present=[bool(s["present"]) for s in stats],
        image=image,
        result=result,
        warnings=notes + result.warnings,
    )


def check_local_only(**given: Any) -> None:
    """Refuse options that only a local run has (the server owns its engine).

    Args:
        given: ``--option`` name -> value; any value other than None is refused.
    """
    for name, value in given.items():
        if value is not None:
            raise InputError(
                name, "is not used with --server (the server's engine and backend are its own)"
            )


def run_remote(
    paths: list[Path],
    prompts: list[str],
    server: str,
    output: PathLike | None,
    options: Options,
    json_path: PathLike | None,
    volume: int | None,
    series: str | None,
    output_format: str,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """:func:`promptseg.runtime.api.run` with ``server``: the same outputs, segmented on a
    ``promptseg serve`` server (inputs and prompts as :func:`~promptseg.runtime.api.check_run_args`
    gives them, options checked).

    Returns:
        One summary dict per input (as a local run's, with ``server``, the server's engine and
        ``seconds.round_trip``).

    Raises:
        InputError: Bad input or output path, an unreachable server, or a request the server
            refused (its one-line message).
    """
    kinds = [input_kind(p) for p in paths]
    dicom = dicom_seg.wants_dicom_seg(output_format, output, len(paths))
    outputs = plan_run(paths, output, kinds, json_path, dicom)
    loaded = read_inputs(paths, volume, series)
    client = ServerClient(server)
    answers: list[tuple[SegmenterResult, dict[str, Any], float, float]] = []
    try:
        for i, image, notes, t_read in each_image(paths, loaded, volume, series):
            t = time.perf_counter()  # every answer before the first write: nothing partial
            sent = request_options(image, str(paths[i]), options)
            answer = client.segment(encode_request(image, prompts, sent))
            labels, summary = decode_response(answer, image)
            done = _answer(image, notes, labels, summary)
            answers.append((done, summary, t_read, time.perf_counter() - t))
    finally:
        client.close()
    check_sidecars(outputs, paths, len(answers[0][0].targets), dicom)
    summaries = []
    for inp, out, (done, served, t_read, round_trip) in zip(paths, outputs, answers):
        facts = EngineFacts.from_summary(served)
        summary = write_result(done, inp, out, facts, t_read, say, dicom)
        summary["orientation"] = served["orientation"]  # the server reoriented the volume
        summary["server"] = client.url
        summary["seconds"]["round_trip"] = round(round_trip, 4)
        summaries.append(summary)
    if json_path is not None:
        write_json_atomic({"results": summaries}, json_path)
    return summaries
