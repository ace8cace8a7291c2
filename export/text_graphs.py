"""ONNX graphs of the prompt path: text encoder (+ mean pooling) and FiLM generator.

``text_encoder.onnx``: input_ids, attention_mask, token_type_ids int64 (N, T) -> embedding
float32 (N, E), the mean of the last hidden state over the attention mask (as
``promptseg.model.text.TextEncoder`` computes it). ``film_generator.onnx``: embedding (N, E) ->
film (N, P).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.export.files import ExportError, atomic_write

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# Dynamic INT8 quantisation settings tried in order (smallest file first); the first whose
# embeddings keep cosine >= the floor against torch on every vocabulary prompt is shipped.
QUANT_LADDER: tuple[tuple[str, str], ...] = (
    ("all", "MatMul and embedding Gather weights int8, per channel"),
    ("attention+embeddings", "feed-forward MatMuls kept fp32"),
    ("embeddings", "only the embedding tables int8"),
)


def _pooled_encoder(encoder: Any) -> Any:
    from torch import nn

    class PooledEncoder(nn.Module):
        """BERT-family encoder + attention-masked mean pooling: (N, T) ids -> (N, E)."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    return PooledEncoder(encoder.model).eval()


def export_text_encoder(encoder: Any, path: str | os.PathLike[str], opset: int) -> Path:
    """Export the frozen encoder with mean pooling to ``path`` (dynamic batch and tokens)."""
    import onnx
    import torch

    tokens = encoder.tokenize(["Segment the left kidney", "liver"])
    args = (tokens["input_ids"], tokens["attention_mask"], torch.zeros_like(tokens["input_ids"]))
    axes = {name: {0: "batch", 1: "tokens"} for name in TEXT_INPUTS}
    axes["embedding"] = {0: "batch"}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _pooled_encoder(encoder),
                args,
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=list(TEXT_INPUTS),
                output_names=["embedding"],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
    except Exception as exc:  # noqa: BLE001 - report any exporter failure in one line
        raise ExportError(f"ONNX export of the text encoder failed: {exc}") from exc
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    return atomic_write(path, lambda tmp: tmp.write_bytes(model.SerializeToString()))


def export_film_generator(film: Any, path: str | os.PathLike[str], opset: int) -> Path:
    """Export the FiLM generator: embedding (N, E) -> film (N, P)."""
    import onnx
    import torch

    film.eval()
    embed_dim = film.norm.normalized_shape[0]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            film,
            (torch.randn(2, embed_dim),),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["embedding"],
            output_names=["film"],
            dynamic_axes={"embedding": {0: "batch"}, "film": {0: "batch"}},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    return atomic_write(path, lambda tmp: tmp.write_bytes(model.SerializeToString()))


def tokenizer_facts(encoder: Any) -> dict[str, Any]:
    """What a WordPiece tokenizer outside Python needs (manifest ``text_encoder``)."""
    tok = encoder.tokenizer
    init = getattr(tok, "init_kwargs", {}) or {}
    lowercase = getattr(tok, "do_lower_case", init.get("do_lower_case", True))
    return {
        "lowercase": bool(lowercase),
        "strip_accents": init.get("strip_accents"),
        "tokenize_chinese_chars": bool(init.get("tokenize_chinese_chars", True)),
        "special_tokens": {
            "cls": int(tok.cls_token_id),
            "sep": int(tok.sep_token_id),
            "pad": int(tok.pad_token_id),
            "unk": int(tok.unk_token_id),
        },
        "vocab_size": int(tok.vocab_size),
        "max_input_chars_per_word": 100,
        "token_type_ids": "zeros",
    }


def session(path: str | os.PathLike[str]) -> Any:
    """A CPU ONNX Runtime session."""
    from promptseg.runtime.ort_engine import env_threads, ort_session

    return ort_session(path, threads=env_threads())


def embed_onnx(sess: Any, encoder: Any, prompts: list[str], batch: int = 64) -> np.ndarray:
    """Embeddings (N, E) of ``prompts`` from a ``text_encoder.onnx`` session."""
    out = []
    for i in range(0, len(prompts), batch):
        tokens = encoder.tokenize(prompts[i : i + batch])
        ids = tokens["input_ids"].numpy().astype(np.int64)
        mask = tokens["attention_mask"].numpy().astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        out.append(sess.run(["embedding"], feed)[0])
    return np.concatenate(out).astype(np.float32)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, E) arrays."""
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def _ladder_kwargs(step: str, fp32_path: Path) -> dict[str, Any] | None:
    import onnx

    names = [n.name for n in onnx.load(str(fp32_path), load_external_data=False).graph.node]
    matmuls = [n for n in names if n.endswith("MatMul")]
    if step == "all":
        return {"per_channel": True}
    if step == "attention+embeddings":
        ffn = [
            n
            for n in matmuls
            if "intermediate" in n or ("/output/dense" in n and "attention" not in n)
        ]
        return {"per_channel": True, "nodes_to_exclude": ffn} if ffn else None
    if step == "embeddings":
        return {"per_channel": True, "op_types_to_quantize": ["Gather"]}
    raise ValueError(f"unknown quantisation step {step!r}")


def quantize_text_encoder(
    fp32_path: Path,
    out_path: Path,
    encoder: Any,
    prompts: list[str],
    reference: np.ndarray,
    *,
    min_cosine: float = 0.99,
    progress: Any = None,
) -> dict[str, Any]:
    """Dynamic INT8 quantisation of ``text_encoder.onnx`` that keeps the embeddings faithful.

    Each setting of :data:`QUANT_LADDER` is tried in order; the first whose ORT embeddings have
    cosine >= ``min_cosine`` with the torch ``reference`` (N, E) on every prompt replaces
    ``out_path``. When none does, the FP32 graph stays and the result says so.

    Returns:
        Facts for the manifest: ``quantized`` ("int8-dynamic" or "none"), the setting, bytes,
        cosine min/mean per attempt.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    attempts = []
    fp32_bytes = os.path.getsize(fp32_path)
    for step, what in QUANT_LADDER:
        kwargs = _ladder_kwargs(step, fp32_path)
        if kwargs is None:
            continue
        tmp = out_path.parent / f".tmp-quant-{step.replace('+', '_')}.onnx"
        try:
            logging.disable(logging.WARNING)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8, **kwargs)
        finally:
            logging.disable(logging.NOTSET)
        cos = cosine_rows(embed_onnx(session(tmp), encoder, prompts), reference)
        worst = int(np.argmin(cos))
        attempt = {
            "setting": step,
            "what": what,
            "bytes": os.path.getsize(tmp),
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "worst_prompt": prompts[worst],
        }
        attempts.append(attempt)
        if progress is not None:
            progress(
                f"text encoder int8 ({step}): {attempt['bytes'] / 1e6:.1f} MB, "
                f"cosine min {attempt['cosine_min']:.4f} mean {attempt['cosine_mean']:.4f}"
            )
        if cos.min() >= min_cosine:
            os.replace(tmp, out_path)
            return {
                "quantized": "int8-dynamic",
                "setting": step,
                "bytes": attempt["bytes"],
                "fp32_bytes": fp32_bytes,
                "cosine_min": attempt["cosine_min"],
                "cosine_mean": attempt["cosine_mean"],
                "cosine_floor": min_cosine,
                "prompts_checked": len(prompts),
                "attempts": attempts,
            }
        tmp.unlink(missing_ok=True)
    return {
        "quantized": "none",
        "reason": f"no dynamic INT8 setting kept cosine >= {min_cosine} on every prompt",
        "fp32_bytes": fp32_bytes,
        "cosine_floor": min_cosine,
        "prompts_checked": len(prompts),
        "attempts": attempts,
    }
