"""``export_model``: checkpoint -> engine folder (docs/engine_format.md), verified.

Everything is written into a hidden sibling folder (``.<name>.tmp-*``) that is renamed onto
``out_dir`` only after ``manifest.json`` is written, so a failed export never leaves a
half-written engine folder behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.export.files import (
    ExportError,
    ExportInputError,
    Progress,
    atomic_copy,
    save_onnx,
)
from promptseg.export.manifest import (
    MANIFEST,
    ORIENTATION_DESCRIPTION,
    film_layout_entries,
    library_versions,
    write_manifest,
)
from promptseg.runtime.manifest import sha256_file

TEXT_QUANT = ("none", "int8")
MIN_OPSET = 13
TEXT_COSINE_FP32 = 0.999
TEXT_COSINE_INT8 = 0.99
FILM_ATOL = 1e-4
INT8_WARN_DICE = 0.9
# Tolerance of the INT8 float fallback on its train-split proxy: the parity check's 0.005 Dice,
# applied per target to |mean d| + 2 sd(d) / sqrt(m) of the per-case Dice differences d, m being
# the validation cases the parity check averages that target over (liver tumour: 1)
# (promptseg.calibration.mixed.compare_dice).
INT8_FALLBACK_TOLERANCE = 0.005
# How the INT8 options are named in messages: the API's parameters, or the CLI's flags.
API_NAMES = {
    "int8": "int8=True",
    "calib_data": "calib_data",
    "calib_samples": "calib_samples",
    "tolerance": "int8_fallback_tolerance",
    "no_fallback": "int8_fallback_tolerance=None",
    "data_root": "data_root",
}
CLI_NAMES = {
    "int8": "--int8",
    "calib_data": "--calib-data",
    "calib_samples": "--calib-samples",
    "tolerance": "--int8-fallback-tolerance",
    "no_fallback": "--no-int8-fallback",
    "data_root": "--data-root",
}


@dataclass
class _State:
    """What the stages hand each other."""

    out: Path
    progress: Progress
    loaded: Any = None
    encoder: Any = None
    checkpoint_sha256: str = ""
    layout: list[dict[str, Any]] = field(default_factory=list)
    cache: Any = None
    fields: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    slices: Any = None


def export_model(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    fp16: bool = False,
    int8: bool = False,
    calib_data: str | os.PathLike[str] | None = None,
    calib_samples: int | None = None,
    int8_fallback_tolerance: float | None = INT8_FALLBACK_TOLERANCE,
    prompts_file: str | os.PathLike[str] | None = None,
    opset: int = 17,
    max_batch: int = 32,
    text_encoder_quant: str = "none",
    verify: bool = True,
    progress: bool = True,
    data_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Export a checkpoint to an engine folder and verify it.

    Args:
        checkpoint: A ``.pt`` checkpoint path or ``"default"``.
        out_dir: The engine folder (created; an earlier engine folder there is replaced).
        fp16: Also write ``model.fp16.onnx`` (range-audited FP16 conversion).
        int8: Also write ``model.int8.onnx`` through ``promptseg.calibration.quantize_int8``.
        calib_data: Calibration data for ``int8``: a dataset root or a calibration ``.npz``.
        calib_samples: Calibration samples drawn from a dataset root (default 128); not with
            a ``.npz``, which holds its own samples.
        int8_fallback_tolerance: Keep the most sensitive INT8 nodes in float until, on a
            train-split proxy, every target's Dice difference d to FP32 has
            ``|mean d| + 2 sd(d) / sqrt(m)`` within this value, m being the validation cases
            the parity check averages that target over (``promptseg.calibration.mixed``);
            None: plain static INT8. Only with ``int8`` (else leave it at the default).
        prompts_file: Extra prompts for the cache, one per line (``prompt[<TAB>target]``).
        opset: ONNX opset of every graph.
        max_batch: Largest batch of the TensorRT optimisation profile.
        text_encoder_quant: ``"none"`` or ``"int8"`` (dynamic INT8 of ``text_encoder.onnx``).
        verify: Check every graph against PyTorch on real slices and fail outside tolerance.
        progress: Print one line per stage on stderr.
        data_root: Shared data folder (default ``$PROMPTSEG_DATA_ROOT`` or ``../shared/data``).

    Returns:
        Path of the written ``manifest.json``.

    Raises:
        ExportInputError: bad arguments, missing checkpoint, unwritable folder (CLI exit 2).
        ExportError: a graph failed its checks (CLI exit 1).
    """
    _check_args(opset, max_batch, text_encoder_quant, prompts_file)
    fallback_option = None
    if int8_fallback_tolerance != INT8_FALLBACK_TOLERANCE:
        fallback_option = "tolerance" if int8_fallback_tolerance is not None else "no_fallback"
    check_int8_options(
        int8, calib_data, calib_samples, int8_fallback_tolerance, data_root, fallback_option
    )
    from promptseg.checkpoint import resolve_checkpoint

    try:
        ckpt_path = resolve_checkpoint(checkpoint)
    except FileNotFoundError as exc:
        raise ExportInputError(str(exc)) from exc
    final = Path(out_dir).expanduser().absolute()
    staging = _make_staging(final)
    state = _State(out=staging, progress=Progress(progress))
    try:
        _load(state, ckpt_path)
        _image_graph(state, opset)
        _prompt_path(state, opset, prompts_file, text_encoder_quant, verify)
        if fp16 or verify:
            _load_slices(state, data_root)
        if fp16:
            _fp16(state)
        if int8:
            _int8(state, Path(calib_data), calib_samples, int8_fallback_tolerance,  # type: ignore[arg-type]
                  data_root)  # fmt: skip
        if verify:
            _verify_images(state)
        _tensorrt(state, final, max_batch, fp16)
        _manifest(state, opset, max_batch, verify)
        _commit(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    state.progress(f"done: {final}")
    return final / MANIFEST


# ----------------------------------------------------------------------------- arguments, folders


def _check_args(opset: int, max_batch: int, text_encoder_quant: str, prompts_file: Any) -> None:
    import onnx

    highest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= highest:
        raise ExportInputError(f"opset {opset} unsupported; expected {MIN_OPSET}..{highest}")
    if int(max_batch) < 1:
        raise ExportInputError(f"max_batch must be >= 1, got {max_batch}")
    if text_encoder_quant not in TEXT_QUANT:
        raise ExportInputError(
            f"text_encoder_quant {text_encoder_quant!r} unknown; expected one of {TEXT_QUANT}"
        )
    if prompts_file is not None and not Path(prompts_file).is_file():
        raise ExportInputError(f"{prompts_file}: prompts file not found")


def check_int8_options(
    int8: bool,
    calib_data: str | os.PathLike[str] | None,
    calib_samples: int | None,
    fallback_tolerance: float | None,
    data_root: str | os.PathLike[str] | None = None,
    fallback_option: str | None = None,
    names: dict[str, str] = API_NAMES,
) -> None:
    """Every check of the INT8 options, before any work (the CLI runs it too, with its flags).

    Args:
        int8, calib_data, calib_samples, fallback_tolerance, data_root: As for
            :func:`export_model` (``fallback_tolerance`` None: no float fallback).
        fallback_option: The key in ``names`` of the option that set the fallback
            explicitly (``"tolerance"``, ``"no_fallback"``); None: left at the default.
        names: How options are named in the messages (:data:`API_NAMES`, :data:`CLI_NAMES`).

    Raises:
        ExportInputError: an option without ``int8``, ``int8`` without calibration data,
            missing calibration data, ``calib_samples`` with a calibration ``.npz``, a
            tolerance outside [0, 1), the shared data folder missing where the float fallback
            of a ``.npz`` needs it for its proxy cases, or no ``promptseg.calibration``.
    """
    n = names
    if not int8:
        for value, key in ((calib_data, "calib_data"), (calib_samples, "calib_samples")):
            if value is not None:
                raise ExportInputError(f"{n[key]} is only used with {n['int8']}")
        if fallback_option is not None:
            raise ExportInputError(f"{n[fallback_option]} is only used with {n['int8']}")
        return
    if calib_data is None:
        raise ExportInputError(
            f"{n['int8']} needs {n['calib_data']} (a dataset root or a calibration .npz)"
        )
    data = Path(calib_data)
    if not data.exists():
        raise ExportInputError(
            f"{data}: calibration data not found (a dataset root or a calibration .npz)"
        )
    if calib_samples is not None:
        if int(calib_samples) < 1:
            raise ExportInputError(f"{n['calib_samples']} must be >= 1, got {calib_samples}")
        if data.is_file():
            raise ExportInputError(
                f"{data}: {n['calib_samples']} applies to a dataset root; a saved calibration "
                "set holds its own samples"
            )
    if fallback_tolerance is not None:
        if not 0.0 <= float(fallback_tolerance) < 1.0:
            raise ExportInputError(f"{n['tolerance']} must be in [0, 1), got {fallback_tolerance}")
        if not data.is_dir():  # the proxy cases of a saved set come from the shared data
            from promptseg.export.samples import DATA_ENV, resolve_data_root

            try:
                resolve_data_root(data_root)
            except ExportInputError as exc:
                raise ExportInputError(
                    f"{data}: the INT8 float fallback takes its proxy cases from the shared "
                    f"data folder, which was not found ({str(exc).split(':', 1)[0]}); pass "
                    f"{n['data_root']}, set {DATA_ENV}, or use {n['no_fallback']}"
                ) from exc
    _quantize_int8()


def _quantize_int8() -> Any:
    try:
        from promptseg.calibration import quantize_int8
    except ImportError as exc:
        raise ExportInputError(
            f"--int8 needs promptseg.calibration.quantize_int8, which this install does not "
            f"provide ({exc})"
        ) from exc
    return quantize_int8


def _make_staging(final: Path) -> Path:
    if final.exists() and not final.is_dir():
        raise ExportInputError(f"{final}: exists and is not a folder")
    if final.is_dir() and any(final.iterdir()) and not (final / MANIFEST).is_file():
        raise ExportInputError(
            f"{final}: folder is not empty and holds no {MANIFEST}; refusing to replace it"
        )
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        raise ExportInputError(
            f"{final}: cannot create the output folder ({exc.strerror or exc})"
        ) from exc
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    return staging


def _commit(staging: Path, final: Path) -> None:
    """Move the finished folder into place, replacing an earlier engine folder."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
        os.replace(final, old)
    try:
        os.replace(staging, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- stages


def _load(state: _State, ckpt_path: Path) -> None:
    from promptseg.checkpoint import load_checkpoint
    from promptseg.model.text import TextEncoder

    try:
        loaded = load_checkpoint(ckpt_path)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ExportInputError(f"{ckpt_path}: cannot load checkpoint ({exc})") from exc
    te = loaded.text_encoder
    _quiet_transformers()
    encoder = TextEncoder(te["name"], max_tokens=int(te["max_tokens"]))
    identity = encoder.identity()
    if te.get("weights_sha256") not in (None, "unknown", identity.weights_sha256):
        raise ExportInputError(
            f"{ckpt_path}: trained with text encoder weights sha256 {te['weights_sha256']}, "
            f"but {encoder.folder} has {identity.weights_sha256}"
        )
    state.loaded, state.encoder = loaded, encoder
    state.checkpoint_sha256 = sha256_file(ckpt_path)
    state.layout = film_layout_entries(loaded.model.unet.layout)
    cfg = loaded.config
    state.progress(
        f"checkpoint {ckpt_path}: widths {cfg.widths}, R={cfg.resolution}, "
        f"P={loaded.model.unet.film_dim}, E={loaded.model.embed_dim}"
    )


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - TextEncoder reports the missing package
        pass


def _graph_metadata(state: _State, precision: str) -> dict[str, Any]:
    loaded = state.loaded
    return {
        "promptseg.format": "promptseg-image-graph",
        "promptseg.precision": precision,
        "promptseg.resolution": str(loaded.config.resolution),
        "promptseg.film_dim": str(loaded.model.unet.film_dim),
        "promptseg.film_layout": state.layout,
        "promptseg.vocabulary_sha256": loaded.vocabulary.sha256(),
        "promptseg.checkpoint_sha256": state.checkpoint_sha256,
        "promptseg.orientation": loaded.preprocessing.orientation,
        "promptseg.preprocessing": loaded.preprocessing.to_dict(),
        # read by promptseg.calibration when it is given a bare model.onnx
        "preprocessing": loaded.preprocessing.to_dict(),
    }


def _image_graph(state: _State, opset: int) -> None:
    import onnx

    from promptseg.export.image_graph import export_unet, io_signature, op_counts, set_metadata

    unet = state.loaded.model.unet
    model, exporter = export_unet(
        unet, resolution=unet.config.resolution, film_dim=unet.film_dim, opset=opset
    )
    set_metadata(model, _graph_metadata(state, "fp32"))
    onnx.checker.check_model(model, full_check=True)
    save_onnx(model, state.out / "model.onnx")
    inputs, outputs = io_signature(model)
    state.fields.update(
        inputs=inputs, outputs=outputs, exporter=exporter, model_ops=op_counts(model)
    )
    state.progress(
        f"model.onnx: {len(model.graph.node)} nodes ({exporter} exporter), "
        f"no BatchNormalization, onnx checker passed"
    )


def _prompt_path(state: _State, opset: int, prompts_file: Any, quant: str, verify: bool) -> None:
    from promptseg.export.prompt_cache import build_cache, read_prompts_file, save_cache
    from promptseg.export.refusal import calibrate_ambiguity, calibrate_refusal
    from promptseg.export.text_graphs import (
        embed_onnx,
        export_film_generator,
        export_text_encoder,
        session,
    )
    from promptseg.presence import DEFAULT_TAU as PRESENCE_DEFAULT_TAU
    from promptseg.prompts import prompt_groups

    loaded, encoder, out = state.loaded, state.encoder, state.out
    vocab = loaded.vocabulary
    extra = read_prompts_file(prompts_file, vocab.targets) if prompts_file else None
    cache = build_cache(vocab, encoder, loaded.model.film, extra)
    save_cache(
        cache,
        out / "prompt_cache.safetensors",
        {"vocabulary_sha256": vocab.sha256(), "checkpoint_sha256": state.checkpoint_sha256},
    )
    state.cache = cache
    state.progress(f"prompt_cache.safetensors: {len(cache)} prompts, {len(vocab.targets)} targets")

    export_film_generator(loaded.model.film, out / "film_generator.onnx", opset)
    if verify:
        got = session(out / "film_generator.onnx").run(["film"], {"embedding": cache.embedding})[0]
        diff = float(np.max(np.abs(got - cache.film)))
        if diff > FILM_ATOL:
            raise ExportError(
                f"film_generator.onnx differs from PyTorch by {diff:.3g} (limit {FILM_ATOL:g})"
            )
        state.verification["film_generator"] = {"max_abs_diff": diff, "rows": len(cache)}
    state.progress("film_generator.onnx written")

    te_path = out / "text_encoder.onnx"
    export_text_encoder(encoder, te_path, opset)
    text = _text_encoder_facts(state, te_path, quant, verify)
    atomic_copy(_vocab_file(encoder), out / "vocab.txt")
    label = "int8-quantised " if text["quantized"] != "none" else ""
    te_session = session(te_path)
    refusal = calibrate_refusal(
        cache,
        vocab,
        lambda p: embed_onnx(te_session, encoder, p),
        f"{label}text_encoder.onnx",
    )
    refusal.update(
        calibrate_ambiguity(
            cache, vocab, lambda p: embed_onnx(te_session, encoder, p), refusal["threshold"]
        )
    )
    state.fields["text_encoder"] = text
    state.fields["prompt_refusal"] = refusal
    state.fields["prompt_groups"] = prompt_groups(vocab.targets)
    if state.loaded.model.unet.presence_head is not None:
        # Every target gets a tau: the checkpoint's calibrated one, else the neutral 0.5.
        taus = state.loaded.presence_thresholds
        state.fields["presence_thresholds"] = {
            t: float(taus.get(t, PRESENCE_DEFAULT_TAU)) for t in vocab.targets
        }
    state.progress(
        f"prompt refusal threshold {refusal['threshold']:.4f} "
        f"(balanced accuracy {refusal['balanced_accuracy']:.3f}, "
        f"{'separable' if refusal['separable'] else 'overlapping'}); ambiguity margin "
        f"{refusal['ambiguity_margin']:.4f}"
    )


def _vocab_file(encoder: Any) -> Path:
    path = Path(encoder.folder) / "vocab.txt"
    if not path.is_file():
        raise ExportInputError(f"{path}: the text encoder folder has no WordPiece vocab.txt")
    return path


def _text_encoder_facts(state: _State, te_path: Path, quant: str, verify: bool) -> dict[str, Any]:
    from promptseg.export.text_graphs import (
        cosine_rows,
        embed_onnx,
        quantize_text_encoder,
        session,
        tokenizer_facts,
    )

    encoder, cache = state.encoder, state.cache
    identity = encoder.identity()
    facts: dict[str, Any] = {
        "name": identity.name,
        "model_type": identity.model_type,
        "hidden_size": identity.hidden_size,
        "max_tokens": identity.max_tokens,
        **tokenizer_facts(encoder),
        "onnx": te_path.name,
        "vocab": "vocab.txt",
        "pooling": "mean of the last hidden state over attention_mask",
        "weights_sha256": identity.weights_sha256,
    }
    if quant == "int8":
        result = quantize_text_encoder(
            te_path,
            te_path,
            encoder,
            cache.prompts,
            cache.embedding,
            min_cosine=TEXT_COSINE_INT8,
            progress=state.progress,
        )
        facts["quantized"] = result.pop("quantized")
        facts["quantization"] = result
        if facts["quantized"] == "none":
            state.progress(f"text_encoder.onnx kept FP32: {result['reason']}")
    else:
        facts["quantized"] = "none"
    if verify:
        cos = cosine_rows(embed_onnx(session(te_path), encoder, cache.prompts), cache.embedding)
        floor = TEXT_COSINE_FP32 if facts["quantized"] == "none" else TEXT_COSINE_INT8
        if cos.min() < floor:
            raise ExportError(
                f"text_encoder.onnx embeddings differ from PyTorch: cosine min {cos.min():.5f} "
                f"(floor {floor}) over {len(cos)} prompts"
            )
        state.verification["text_encoder"] = {
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "floor": floor,
            "prompts": len(cos),
        }
    facts["bytes"] = te_path.stat().st_size
    state.progress(
        f"text_encoder.onnx: {facts['bytes'] / 1e6:.1f} MB, quantized={facts['quantized']}"
    )
    return facts


def _load_slices(state: _State, data_root: Any) -> None:
    from promptseg.export.samples import load_slices, resolve_data_root

    root = resolve_data_root(data_root)
    loaded = state.loaded
    state.slices = load_slices(root, loaded.preprocessing, loaded.config.resolution)
    state.progress(f"real slices: {len(state.slices)} from {root} (CHAOS MR val + brain val)")


def _audit_prompts(state: _State) -> dict[str, np.ndarray]:
    vocab, cache = state.loaded.vocabulary, state.cache
    return {vocab.canonical(t): cache.film[cache.index(vocab.canonical(t))] for t in vocab.targets}


def _feeds(images: np.ndarray, films: dict[str, np.ndarray], batch: int) -> list[dict]:
    feeds = []
    for film in films.values():
        for i in range(0, len(images), batch):
            chunk = images[i : i + batch]
            f = np.repeat(film[None], len(chunk), axis=0).astype(np.float32)
            feeds.append({"image": chunk, "film": f})
    return feeds


def _fp16(state: _State) -> None:
    import onnx

    from promptseg.export.fp16 import audit_fp16, audit_fp32, convert_fp16
    from promptseg.export.image_graph import check_io, set_metadata

    model = onnx.load(str(state.out / "model.onnx"))
    feeds = _feeds(state.slices.images, _audit_prompts(state), batch=2)
    audit = audit_fp32(model, feeds)
    state.progress(
        f"FP16 range audit: max |activation| {audit.max_abs_activation:.4g} at "
        f"{audit.max_node}; {len(audit.kept_fp32)} node(s) kept FP32 over {audit.runs} runs"
    )
    model16 = convert_fp16(model, audit.kept_fp32)
    audit_fp16(model16, feeds, audit)
    unet = state.loaded.model.unet
    check_io(model16, unet.config.resolution, unet.film_dim)
    clamped = {e.key: e.value for e in model16.metadata_props}.get(
        "promptseg.fp16_constants_clamped", "0"
    )
    meta = _graph_metadata(state, "fp16")
    meta["promptseg.fp16_kept_fp32"] = audit.kept_fp32
    meta["promptseg.fp16_constants_clamped"] = clamped
    set_metadata(model16, meta)
    save_onnx(model16, state.out / "model.fp16.onnx")
    state.fields["fp16_audit"] = {
        **audit.to_dict(),
        "prompts": list(_audit_prompts(state)),
        "slices": len(state.slices),
        "constants_clamped": int(clamped),
    }
    state.progress(
        f"model.fp16.onnx: max |x| over FP16 tensors {audit.fp16_max_abs_activation:.4g}"
    )


def _int8(
    state: _State,
    calib_data: Path,
    calib_samples: int | None,
    fallback_tolerance: float | None,
    data_root: Any,
) -> None:
    import onnx

    from promptseg.export.image_graph import check_io, set_metadata
    from promptseg.export.samples import resolve_data_root

    quantize_int8 = _quantize_int8()
    fp32, out = state.out / "model.onnx", state.out / "model.int8.onnx"
    extra: dict[str, Any] = {}
    if calib_samples is not None:
        extra["n"] = int(calib_samples)
    if fallback_tolerance is not None:  # the proxy cases come from the train split
        extra["proxy_data"] = calib_data if calib_data.is_dir() else resolve_data_root(data_root)
    result = quantize_int8(
        fp32,
        out,
        calib_data,
        prompt_cache=state.out / "prompt_cache.safetensors",
        preprocessing=state.loaded.preprocessing,
        progress=state.progress.enabled,
        fallback_tolerance=fallback_tolerance,
        **extra,
    )
    if not out.is_file():
        raise ExportError(f"promptseg.calibration.quantize_int8 did not write {out}")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    unet = state.loaded.model.unet
    check_io(model, unet.config.resolution, unet.film_dim)
    set_metadata(model, _graph_metadata(state, "int8-qdq"))
    save_onnx(model, out)
    report = result if isinstance(result, dict) else {"result": str(result)}
    state.fields["int8"] = {"calib_data": str(calib_data), **_jsonable(report)}
    state.progress("model.int8.onnx written (promptseg.calibration)")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def _verify_images(state: _State) -> None:
    from promptseg.export.text_graphs import session
    from promptseg.export.verify import TOLERANCES, torch_logits, verify_graph

    images = state.slices.images
    audit = _audit_prompts(state)
    films = dict(list(audit.items())[:: max(1, len(audit) // 4)])
    unet = state.loaded.model.unet
    refs = {p: torch_logits(unet, images, f) for p, f in films.items()}
    results = {}
    for precision, fname in (
        ("fp32", "model.onnx"),
        ("fp16", "model.fp16.onnx"),
        ("int8", "model.int8.onnx"),
    ):
        path = state.out / fname
        if not path.is_file():
            continue
        sess = session(path)
        results[precision] = verify_graph(
            fname, sess, refs, images, films, (1, 4), TOLERANCES.get(precision)
        )
        r = results[precision]
        note = ""
        if precision not in TOLERANCES:
            note = " (recorded; promptseg.calibration owns INT8 accuracy)"
            if r["dice_agreement_min"] < INT8_WARN_DICE:
                note = f" WARNING: below {INT8_WARN_DICE} Dice agreement with PyTorch" + note
        state.progress(
            f"verified {fname}: max |logit diff| {r['max_abs_logit_diff']:.3g}, "
            f"Dice agreement min {r['dice_agreement_min']:.4f}{note}"
        )
    fp32 = results["fp32"]
    state.verification.update(
        max_abs_logit_diff=fp32["max_abs_logit_diff"],
        dice_agreement_min=fp32["dice_agreement_min"],
        prompts=list(films),
        slices=len(images),
        slice_sources=state.slices.sources,
        batch_sizes=[1, 4],
        graphs=results,
    )


def _tensorrt(state: _State, final: Path, max_batch: int, fp16: bool) -> None:
    from promptseg.export.tensorrt_build import maybe_build_engine, tensorrt_available

    source = state.out / ("model.fp16.onnx" if fp16 else "model.onnx")
    previous_cache = final / "timing.cache"
    if tensorrt_available() and previous_cache.is_file():
        atomic_copy(previous_cache, state.out / "timing.cache")
    unet = state.loaded.model.unet
    info = maybe_build_engine(
        source,
        state.out,
        resolution=unet.config.resolution,
        film_dim=unet.film_dim,
        max_batch=max_batch,
        progress=state.progress,
    )
    if info is not None:
        state.fields["tensorrt"] = info
        state.progress(f"model.plan: TensorRT {info['version']} on {info['gpu']}")


def _manifest(state: _State, opset: int, max_batch: int, verify: bool) -> None:
    loaded, out = state.loaded, state.out
    graphs = {
        p: f
        for p, f in (
            ("fp32", "model.onnx"),
            ("fp16", "model.fp16.onnx"),
            ("int8", "model.int8.onnx"),
        )
        if (out / f).is_file()
    }
    text = state.fields.pop("text_encoder")
    labels = {"fp32": "fp32", "fp16": "fp16 inside, fp32 I/O", "int8": "int8-qdq"}
    precision = {f: labels[p] for p, f in graphs.items()}
    precision.update(
        {
            "film_generator.onnx": "fp32",
            "text_encoder.onnx": "int8-dynamic" if text["quantized"] != "none" else "fp32",
        }
    )
    if "tensorrt" in state.fields:
        precision["model.plan"] = "strongly typed from " + state.fields["tensorrt"]["source"]
    fields: dict[str, Any] = {
        "checkpoint": {"path": str(loaded.path), "sha256": state.checkpoint_sha256},
        "resolution": loaded.config.resolution,
        "inputs": state.fields.pop("inputs"),
        "outputs": state.fields.pop("outputs"),
        "film_dim": loaded.model.unet.film_dim,
        "embed_dim": loaded.model.embed_dim,
        "film_layout": state.layout,
        "model_config": loaded.config.to_dict(),
        "preprocessing": loaded.preprocessing.to_dict(),
        "orientation": {
            "axcodes": loaded.preprocessing.orientation,
            "description": ORIENTATION_DESCRIPTION,
        },
        "targets": list(loaded.vocabulary.targets),
        "vocabulary_sha256": loaded.vocabulary.sha256(),
        "text_encoder": text,
        "prompt_cache": {"file": "prompt_cache.safetensors", "prompts": len(state.cache)},
        "graphs": graphs,
        "precision": precision,
        "opset": opset,
        "max_batch": max_batch,
        "verification": state.verification if verify else {"skipped": True},
        "versions": library_versions(),
        **state.fields,
    }
    write_manifest(out, fields)
    state.progress("manifest.json written")


def verify_folder_hashes(folder: str | os.PathLike[str]) -> list[str]:
    """Files of an engine folder whose sha256 or size differ from the manifest (or are missing).

    All of them, where the runtime's ``EngineFolder`` stops at the first problem (and hashes a
    file only on its first use).
    """
    import json

    from promptseg.export.files import file_entry

    root = Path(folder)
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    bad = []
    for name, entry in manifest["files"].items():
        path = root / name
        if not path.is_file() or file_entry(path) != entry:
            bad.append(name)
    return bad


__all__: Sequence[str] = ("export_model", "verify_folder_hashes")
