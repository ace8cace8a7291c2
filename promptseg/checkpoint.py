"""Checkpoint format: weights plus everything needed to rebuild and use the model.

A checkpoint is a ``torch.save`` dict::

    format: "promptseg-checkpoint", version: 1
    model_config: UNetConfig fields      film_hidden: int
    text_encoder: EncoderIdentity fields (name, model_type, hidden_size, max_tokens, sha256)
    vocabulary: PromptVocabulary fields  vocabulary_sha256: str
    preprocessing: Preprocessing fields
    prompt_embeddings: {"prompts": [str], "embeddings": (N, E) float32 tensor}
    state_dict: PromptSegModel weights (film generator + UNet)
    train: {epoch, seed, loss, datasets, val metrics, seconds, ...}
    presence_thresholds: {target: tau} (optional; written by ``promptseg calibrate-presence``)

``load_checkpoint`` rebuilds the model from this alone; the word ``default`` names the model
shipped inside the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from promptseg.model.unet import PromptSegModel, UNetConfig
from promptseg.preprocess import Preprocessing
from promptseg.prompts import PromptVocabulary
from promptseg.runtime.writers import atomic_write

FORMAT = "promptseg-checkpoint"
VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).with_name("weights") / "default.pt"


@dataclass
class LoadedCheckpoint:
    """A rebuilt model with the facts that travelled with it."""

    model: PromptSegModel
    config: UNetConfig
    text_encoder: dict
    vocabulary: PromptVocabulary
    preprocessing: Preprocessing
    prompt_embeddings: dict[str, torch.Tensor]
    train: dict
    path: Path
    presence_thresholds: dict[str, float] = field(default_factory=dict)

    def embedding(self, prompt: str) -> torch.Tensor | None:
        return self.prompt_embeddings.get(prompt)


def resolve_checkpoint(spec: str | Path) -> Path:
    """``"default"`` -> the packaged model; otherwise an existing file."""
    if str(spec) == "default":
        if not DEFAULT_CHECKPOINT.is_file():
            raise FileNotFoundError(f"{DEFAULT_CHECKPOINT}: the packaged default model is missing")
        return DEFAULT_CHECKPOINT
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (a .pt file or the word 'default')")
    return path


def save_checkpoint(
    path: str | Path,
    model: PromptSegModel,
    *,
    text_encoder: dict,
    vocabulary: PromptVocabulary,
    preprocessing: Preprocessing,
    prompt_embeddings: dict[str, torch.Tensor],
    train: dict,
    film_hidden: int = 256,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prompts = sorted(prompt_embeddings)
    blob = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model.unet.config.to_dict(),
        "film_hidden": film_hidden,
        "text_encoder": dict(text_encoder),
        "vocabulary": vocabulary.to_dict(),
        "vocabulary_sha256": vocabulary.sha256(),
        "preprocessing": preprocessing.to_dict(),
        "prompt_embeddings": {
            "prompts": prompts,
            "embeddings": torch.stack([prompt_embeddings[p] for p in prompts]).float()
            if prompts
            else torch.zeros(0, model.embed_dim),
        },
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "train": train,
        **(extra or {}),
    }
    atomic_write(path, lambda tmp: torch.save(blob, tmp))
    return path


def read_checkpoint_blob(path: str | Path) -> dict:
    """The raw dict of a checkpoint file, validated for format and version."""
    path = resolve_checkpoint(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"{path}: not a readable promptseg checkpoint ({exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a promptseg checkpoint (missing format={FORMAT!r})")
    if blob.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {blob.get('version')}, expected {VERSION}")
    return blob


def load_checkpoint(spec: str | Path) -> LoadedCheckpoint:
    """Rebuild the model (eval mode) and its metadata from a checkpoint file or ``default``."""
    path = resolve_checkpoint(spec)
    blob = read_checkpoint_blob(path)
    config = UNetConfig(**blob["model_config"])
    model = PromptSegModel(config, blob["text_encoder"]["hidden_size"], blob["film_hidden"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    emb = blob["prompt_embeddings"]
    return LoadedCheckpoint(
        model=model,
        config=config,
        text_encoder=blob["text_encoder"],
        vocabulary=PromptVocabulary.from_dict(blob["vocabulary"]),
        preprocessing=Preprocessing.from_dict(blob["preprocessing"]),
        prompt_embeddings={p: e for p, e in zip(emb["prompts"], emb["embeddings"])},
        train=blob.get("train", {}),
        path=path,
        presence_thresholds=dict(blob.get("presence_thresholds", {})),
    )
