"""``promptseg-run --server HOST:PORT``: the same run, segmented by a ``promptseg serve`` server.

Inputs are read and checked here exactly as for a local run, every volume is sent to the
server's ``promptseg`` model (Triton HTTP, tritonclient) and only once every answer is back are
the outputs written, with the writers of a local run (NIfTI/PNG, labels sidecar, DICOM SEG), so
a refused prompt or a bad input leaves nothing behind. Needs ``pip install 'promptseg[serve]'``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import promptseg
from promptseg.data.readers import InputError, PathLike, Volume, write_text_atomic
from promptseg.runtime import dicom_seg
from promptseg.runtime.io import Image2D, check_output, input_kind, labels_sidecar, plan_outputs
from promptseg.runtime.io import read_input as read_one
from promptseg.runtime.pipeline import SegmentationResult, choose_modality
from promptseg.runtime.prompt_resolver import ResolvedPrompt
from promptseg.runtime.serve_protocol import (
    ERROR_PREFIX,
    VOLUME_MODEL,
    decode_response,
    encode_request,
    error_message,
)

DTYPES = {np.float32: "FP32", np.float64: "FP64", np.object_: "BYTES"}
TIMEOUT_S = 900.0


@dataclass
class ServedEngine:
    """What the server said about its engine (stands in for the engine folder in sidecars)."""

    path: str
    manifest_sha256: str


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
            raise InputError("--server", f"{self.url} is not reachable ({_first(exc)})") from exc
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
            raise InputError("--server", f"{self.url} failed ({_first(exc)})") from exc
        return {n: result.as_numpy(n) for n in ("labels", "summary")}

    def close(self) -> None:
        self.client.close()


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _result(labels: np.ndarray, summary: dict[str, Any]) -> SegmentationResult:
    """A :class:`SegmentationResult` rebuilt from the server's answer (for the local writers)."""
    prompts = [
        ResolvedPrompt(
            s["prompt"],
            s["target"],
            np.empty(0, np.float32),
            s["resolved_by"],
            s["similarity"],
            s["nearest_cached_prompt"],
        )
        for s in summary["prompts"]
    ]
    return SegmentationResult(
        labels,
        prompts,
        summary["prompts"],
        summary["modality"],
        summary["seconds"],
        summary["warnings"],
    )


def _plan(
    paths: list[Path], output: PathLike | None, output_format: str, n_prompts: int
) -> tuple[list[Path], bool, bool]:
    """Output paths, whether they are DICOM SEGs, whether label sidecars are written."""
    kinds = [input_kind(p) for p in paths]
    seg = dicom_seg.wants_dicom_seg(output_format, output, len(paths))
    if seg:
        outputs = dicom_seg.plan_seg_outputs(paths, output, kinds)
    else:
        outputs = plan_outputs(paths, output, kinds)
    several = n_prompts > 1 and not seg
    if several:
        for out in outputs:
            if out.parent.exists():
                check_output(labels_sidecar(out), paths, False, what="labels sidecar")
    return outputs, seg, several


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
    inputs: Sequence[PathLike] | PathLike,
    prompts: Sequence[str] | str,
    server: str,
    output: PathLike | None = None,
    *,
    batch: int = 16,
    threshold: float = 0.5,
    modality: str = "auto",
    json_path: PathLike | None = None,
    volume: int | None = None,
    series: str | None = None,
    postprocess: str = "largest",
    output_format: str = "auto",
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Segment inputs on a ``promptseg serve`` server and write what a local run writes.

    Args mirror :func:`promptseg.runtime.api.run`; ``server`` is the server's HTTP HOST:PORT.

    Returns:
        One summary dict per input (as a local run's, with ``server`` and the server's engine).

    Raises:
        InputError: Bad input, option or output path, an unreachable server, or a request the
            server refused (its one-line message).
    """
    from promptseg.runtime.api import _check_options, _sidecar, _write_mask

    say = log or (lambda line: None)
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not paths:
        raise InputError("INPUT", "no input given; expected NIfTI files, DICOM folders or images")
    if not prompt_list:
        raise InputError("--prompt", "no prompt given; expected at least one --prompt TEXT")
    _check_options("auto", None, batch, threshold, modality, volume)
    outputs, seg, several = _plan(paths, output, output_format, len(prompt_list))
    if json_path is not None:
        check_output(Path(json_path), paths, False, what="JSON summary")
    client = ServerClient(server)
    answers: list[tuple[Volume | Image2D, list[str], SegmentationResult, dict, float]] = []
    try:
        for inp in paths:  # every answer before the first write: nothing partial
            t = time.perf_counter()
            image, notes = read_one(inp, volume_index=volume, series_uid=series)
            options = {
                "source": str(inp),
                "modality": choose_modality(image, modality),
                "threshold": float(threshold),
                "postprocess": postprocess,
                "batch": int(batch),
            }
            labels, summary = decode_response(
                client.segment(encode_request(image, prompt_list, options)), image
            )
            answers.append(
                (image, notes, _result(labels, summary), summary, time.perf_counter() - t)
            )
    finally:
        client.close()
    summaries = []
    for inp, out, (image, notes, result, summary, seconds) in zip(paths, outputs, answers):
        served = ServedEngine(**summary["engine"])
        if not out.parent.exists():
            out.parent.mkdir(exist_ok=True)
        if seg:
            dicom_seg.write_dicom_seg(
                image,  # type: ignore[arg-type]
                result.labels,
                dicom_seg.segments_of(result.stats),
                out,
                version=promptseg.__version__,
                engine_id=served.manifest_sha256,
            )
        else:
            _write_mask(image, result, out)
        sidecar = labels_sidecar(out) if several else None
        if sidecar is not None:
            write_text_atomic(_sidecar(result, inp, out, served), sidecar)  # type: ignore[arg-type]
        for w in notes + result.warnings:
            say(f"warning: {inp}: {w}")
        summaries.append(
            {
                **{k: summary[k] for k in ("modality", "orientation", "backend", "precision")},
                "input": str(inp),
                "output": str(out),
                "labels_json": None if sidecar is None else str(sidecar),
                "kind": image.kind,
                "shape": [int(s) for s in image.data.shape],
                "server": client.url,
                "engine": summary["engine"],
                "promptseg_version": promptseg.__version__,
                "seconds": {**summary["seconds"], "round_trip": round(seconds, 4)},
                "prompts": result.stats,
                "warnings": notes + result.warnings,
            }
        )
        found = ", ".join(f"{s['target']}: {s['voxels']} voxels" for s in result.stats)
        say(f"wrote {out} ({found})")
    if json_path is not None:
        write_text_atomic(json.dumps({"results": summaries}, indent=2) + "\n", json_path)
    return summaries
