"""The tensors of ``promptseg serve``'s Triton models (shared by the server and the client).

Two models (docs/serving.md):

``promptseg`` (one volume per request, no batching)
    inputs ``image`` FP32 [X, Y, Z] (a 2-D image is sent as [H, W, 1]), ``affine`` FP64 [4, 4]
    (voxel -> RAS+ mm; ignored for 2-D images), ``prompts`` BYTES [K] (UTF-8, label order),
    ``options`` BYTES [1] (a JSON object, see :data:`OPTION_DEFAULTS`); outputs ``labels``
    UINT8 [X, Y, Z] (0 background, k for the k-th prompt) and ``summary`` BYTES [1] (JSON:
    per-prompt stats, modality, warnings, seconds, engine).
``promptseg_slices`` (dynamic batching of slices across requests)
    inputs ``image`` FP32 [-1, 1, R, R] (preprocessed slices) and ``film`` FP32 [-1, P];
    outputs the engine's outputs (``logits`` FP32 [-1, 1, R, R], and ``presence`` FP32 [-1, 1]
    when the engine has it).

Numpy only: importing this module needs neither PyTriton nor tritonclient.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from promptseg.data.readers import InputError, Volume, _check_finite, _spacing_from_affine
from promptseg.runtime.io import Image2D
from promptseg.runtime.orientation import orientation_known
from promptseg.runtime.pipeline import Options, choose_modality

VOLUME_MODEL = "promptseg"
SLICE_MODEL = "promptseg_slices"
ERROR_PREFIX = "promptseg serve: error"
KINDS = ("volume", "image")
MODALITIES = ("auto", "ct", "mr", "uint8")
OPTION_DEFAULTS: dict[str, Any] = {
    "source": "request",  # names the input in error messages and warnings
    "kind": "volume",  # "volume" or "image" (a 2-D image sent as [H, W, 1])
    "modality": "auto",  # "ct", "mr", "uint8" (8-bit 2-D images) or "auto"
    "threshold": 0.5,
    "postprocess": "largest",
    "batch": 16,  # slices per call of the slice model
    "presence_threshold": None,  # one presence tau for every prompt (null: the manifest's)
    "presence_gate": True,  # false: keep every slice's mask whatever the presence output says
    "orientation_known": True,  # False: use the volume as it is (MRC)
    "voxel_size_missing": False,
}


def encode_request(
    image: Volume | Image2D, prompts: list[str], options: dict[str, Any]
) -> dict[str, np.ndarray]:
    """The ``promptseg`` model's input arrays for one read volume or 2-D image."""
    if isinstance(image, Image2D):
        data = image.data[:, :, None]
        affine = np.eye(4)
        facts = {"kind": "image"}
    else:
        data = image.data
        affine = image.affine
        facts = {
            "kind": "volume",
            "orientation_known": orientation_known(image),
            "voxel_size_missing": bool(image.meta.get("voxel_size_missing", False)),
        }
    return {
        "image": np.ascontiguousarray(data, dtype=np.float32),
        "affine": np.ascontiguousarray(affine, dtype=np.float64),
        "prompts": np.array([p.encode("utf-8") for p in prompts], dtype=np.object_),
        "options": np.array([json.dumps({**options, **facts}).encode("utf-8")], dtype=np.object_),
    }


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def decode_options(raw: np.ndarray | None) -> dict[str, Any]:
    """The request's options merged over :data:`OPTION_DEFAULTS`, checked.

    Raises:
        InputError: Not a JSON object, unknown keys, or values of the wrong kind.
    """
    options = dict(OPTION_DEFAULTS)
    if raw is None or np.asarray(raw).size == 0:
        return options
    try:
        given = json.loads(_text(np.asarray(raw).ravel()[0]))
    except json.JSONDecodeError as exc:
        raise InputError("options", f"not valid JSON ({exc.msg}); expected a JSON object") from exc
    if not isinstance(given, dict):
        raise InputError("options", f"is a JSON {type(given).__name__}; expected a JSON object")
    unknown = sorted(set(given) - set(OPTION_DEFAULTS))
    if unknown:
        raise InputError("options", f"unknown keys {unknown}; valid: {sorted(OPTION_DEFAULTS)}")
    options.update(given)
    if options["kind"] not in KINDS:
        raise InputError("options", f"kind {options['kind']!r}; valid: {', '.join(KINDS)}")
    if options["modality"] not in MODALITIES:
        raise InputError(
            "--modality",
            f"unknown modality {options['modality']!r}; valid: {', '.join(MODALITIES)}",
        )
    for key, kind, flag in (("threshold", float, "--threshold"), ("batch", int, "--batch")):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != kind(value):
            raise InputError(
                flag, f"must be a{'n integer' if kind is int else ' number'}, got {value!r}"
            )
        options[key] = kind(value)
    tau = options["presence_threshold"]
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float))):
        raise InputError("--presence-threshold", f"must be a number or null, got {tau!r}")
    if not isinstance(options["presence_gate"], bool):
        raise InputError(
            "--presence-gate", f"must be true or false, got {options['presence_gate']!r}"
        )
    return options


def request_options(image: Volume | Image2D, source: str, options: Options) -> dict[str, Any]:
    """The ``options`` of a request for a read image from a run's checked :class:`Options`.

    ``modality: auto`` is resolved here, where the DICOM Modality tag is still visible.
    """
    tau = options.presence_threshold
    return {
        "source": source,
        "modality": choose_modality(image, options.modality),
        "threshold": float(options.threshold),
        "postprocess": options.postprocess,
        "batch": int(options.batch),
        "presence_threshold": None if tau is None else float(tau),
        "presence_gate": bool(options.presence_gate),
    }


def pipeline_options(options: dict[str, Any]) -> Options:
    """A decoded request's options as checked :class:`Options` (what ``promptseg-run`` checks).

    Raises:
        InputError: A value ``promptseg-run`` refuses (its message).
    """
    return Options(
        batch=options["batch"],
        threshold=options["threshold"],
        modality="auto" if options["modality"] == "uint8" else str(options["modality"]),
        postprocess=str(options["postprocess"]),
        presence_threshold=options["presence_threshold"],
        presence_gate=options["presence_gate"],
    ).check()


def decode_request(inputs: dict[str, np.ndarray]) -> tuple[Volume | Image2D, list[str], dict]:
    """Rebuild the volume or image, the prompts and the options of one ``promptseg`` request.

    Raises:
        InputError: NaN/Inf voxels, an image that is not [H, W, 1], a bad affine, undecodable
            prompts or bad options; the message matches ``promptseg-run``'s for the same input.
    """
    options = decode_options(inputs.get("options"))
    source = str(options["source"])
    data = np.asarray(inputs["image"], dtype=np.float32)
    if data.ndim != 3 or min(data.shape) < 1:
        raise InputError(source, f"image of shape {data.shape}; expected [X, Y, Z] or [H, W, 1]")
    _check_finite(source, data)
    prompts = [_text(p) for p in np.asarray(inputs["prompts"], dtype=np.object_).ravel()]
    if options["kind"] == "image":
        if data.shape[2] != 1:
            raise InputError(source, f"2-D image sent as {data.shape}; expected [H, W, 1]")
        bits = 8 if options["modality"] == "uint8" else 16
        return (
            Image2D(np.ascontiguousarray(data[:, :, 0]), {"bit_depth": bits}, source),
            prompts,
            options,
        )
    affine = np.asarray(inputs["affine"], dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(source, f"affine of shape {affine.shape}; expected a finite 4 x 4 matrix")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(source, "affine is singular; expected voxel -> world mm")
    meta = {
        "orientation_known": bool(options["orientation_known"]),
        "voxel_size_missing": bool(options["voxel_size_missing"]),
    }
    volume = Volume(data, affine, _spacing_from_affine(affine), source, "request", meta)
    return volume, prompts, options


def encode_response(labels: np.ndarray, summary: dict[str, Any]) -> dict[str, np.ndarray]:
    """The ``promptseg`` model's outputs: labels as [X, Y, Z] (2-D: [H, W, 1]) and the summary."""
    grid = labels if labels.ndim == 3 else labels[:, :, None]
    return {
        "labels": np.ascontiguousarray(grid, dtype=np.uint8),
        "summary": np.array([json.dumps(summary).encode("utf-8")], dtype=np.object_),
    }


def decode_response(
    outputs: dict[str, np.ndarray], image: Volume | Image2D
) -> tuple[np.ndarray, dict]:
    """Labels on the input's grid ((X, Y, Z) or (H, W)) and the summary of one response."""
    labels = np.asarray(outputs["labels"], dtype=np.uint8)
    summary = json.loads(_text(np.asarray(outputs["summary"]).ravel()[0]))
    if isinstance(image, Image2D):
        labels = labels[:, :, 0]
    if labels.shape != image.data.shape:
        raise ValueError(f"server returned labels {labels.shape} for an input {image.data.shape}")
    return labels, summary


def error_message(text: str) -> str:
    """The one-line message inside a server error (without the ``promptseg serve: error:``)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    for line in reversed(lines):
        marker = f"{ERROR_PREFIX}: "
        if marker in line:
            return line.split(marker, 1)[1]
    return lines[-1] if lines else str(text)
