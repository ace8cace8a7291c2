"""Tests for promptseg.checkpoint: the saved format, rebuilding the model, errors, atomicity."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import promptseg
from promptseg.checkpoint import (
    DEFAULT_CHECKPOINT,
    FORMAT,
    VERSION,
    load_checkpoint,
    read_checkpoint_blob,
    resolve_checkpoint,
    save_checkpoint,
)
from promptseg.model.unet import ALWAYS_PRESENT_LOGIT, PromptSegModel, preset_config
from promptseg.preprocess import Preprocessing
from promptseg.prompts import PromptVocabulary


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _trained_looking_model(config, embed_dim: int, film_hidden: int) -> PromptSegModel:
    """A seeded model with non-trivial FiLM heads and BatchNorm running statistics."""
    torch.manual_seed(3)
    model = PromptSegModel(config, embed_dim, film_hidden=film_hidden)
    with torch.no_grad():
        for head in model.film.heads.values():
            head.weight.normal_(0, 0.05)
        model.train()
        res = config.resolution
        model(torch.rand(4, 1, res, res), torch.randn(4, embed_dim))  # moves running stats
    return model.eval()


@pytest.fixture
def saved(tmp_path, text_encoder, vocab_embeddings):
    """A non-default model (concat fusion, no CBAM, film_hidden 32, a presence head) saved to
    a file."""
    config = preset_config("tiny", fusion="concat", cbam=False, resolution=48, presence_hidden=8)
    model = _trained_looking_model(config, text_encoder.hidden_size, film_hidden=32)
    prompts = ["Segment the liver", "Segment the spleen", "glioma"]
    embeddings = {p: vocab_embeddings[p] for p in prompts}
    path = save_checkpoint(
        tmp_path / "sub" / "model.pt",
        model,
        text_encoder=text_encoder.identity().to_dict(),
        vocabulary=PromptVocabulary(),
        preprocessing=Preprocessing(resolution=48, ct_window=(-100.0, 200.0)),
        prompt_embeddings=embeddings,
        train={"epoch": 7, "seed": 3},
        film_hidden=32,
    )
    return path, model, embeddings


def test_round_trip_gives_identical_outputs(saved, text_encoder):
    path, model, embeddings = saved
    loaded = load_checkpoint(path)
    assert not loaded.model.training
    image = torch.rand(2, 1, 48, 48)
    emb = torch.stack([embeddings["Segment the liver"], embeddings["glioma"]])
    with torch.no_grad():
        got, expected = loaded.model(image, emb), model(image, emb)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    state, original = loaded.model.state_dict(), model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in state)


def test_checkpoint_carries_everything(saved, text_encoder):
    path, model, embeddings = saved
    blob = read_checkpoint_blob(path)
    assert (blob["format"], blob["version"]) == (FORMAT, VERSION)
    assert blob["model_config"] == model.unet.config.to_dict()
    assert blob["film_hidden"] == 32
    assert blob["text_encoder"] == text_encoder.identity().to_dict()
    assert blob["vocabulary"] == PromptVocabulary().to_dict()
    assert blob["vocabulary_sha256"] == PromptVocabulary().sha256()
    assert blob["train"] == {"epoch": 7, "seed": 3}

    loaded = load_checkpoint(path)
    assert loaded.path == path
    assert loaded.config == model.unet.config
    assert loaded.text_encoder["name"] == "minilm"
    assert loaded.text_encoder["hidden_size"] == 384
    assert loaded.vocabulary == PromptVocabulary()
    assert loaded.vocabulary.sha256() == blob["vocabulary_sha256"]
    assert loaded.preprocessing == Preprocessing(resolution=48, ct_window=(-100.0, 200.0))
    assert sorted(loaded.prompt_embeddings) == sorted(embeddings)
    for prompt, emb in embeddings.items():
        assert torch.equal(loaded.embedding(prompt), emb)
    assert loaded.embedding("Segment the moon") is None
    assert loaded.train == {"epoch": 7, "seed": 3}


def test_model_is_rebuilt_from_the_file_alone(saved):
    path, model, embeddings = saved
    torch.save(
        {"image": torch.rand(1, 1, 48, 48), "emb": embeddings["Segment the spleen"][None]},
        path.parent / "inputs.pt",
    )
    code = (
        "import sys, torch\n"
        "from promptseg.checkpoint import load_checkpoint\n"
        "ck = load_checkpoint(sys.argv[1])\n"
        "x = torch.load(sys.argv[2])\n"
        "with torch.no_grad():\n"
        "    torch.save(ck.model(x['image'], x['emb']), sys.argv[3])\n"
        "print(ck.config.fusion, ck.config.cbam, ck.model.film.hidden[0].out_features,\n"
        "      ck.config.presence_hidden)\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(path),
            str(path.parent / "inputs.pt"),
            str(path.parent / "out.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["concat", "False", "32", "8"]
    x = torch.load(path.parent / "inputs.pt")
    with torch.no_grad():
        expected = model(x["image"], x["emb"])
    got = torch.load(path.parent / "out.pt")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_tiny_checkpoint_fixture_loads(tiny_checkpoint, vocab_embeddings):
    loaded = load_checkpoint(tiny_checkpoint)
    assert loaded.config == preset_config("tiny")
    assert set(loaded.prompt_embeddings) == set(vocab_embeddings)
    liver = loaded.embedding("Segment the liver")[None]
    spleen = loaded.embedding("Segment the spleen")[None]
    with torch.no_grad():
        film_l, film_s = loaded.model.film(liver), loaded.model.film(spleen)
    assert film_l.shape == (1, loaded.model.unet.film_dim)
    assert not torch.allclose(film_l, film_s)


def test_checkpoint_from_before_the_presence_head_still_loads(saved):
    """A config without cbam_levels / presence_hidden rebuilds the old architecture: CBAM at
    every level, no presence head (presence answers "always present")."""
    path, model, _ = saved
    blob = torch.load(path, weights_only=False)
    for name in ("cbam_levels", "presence_hidden"):
        del blob["model_config"][name]
    blob["state_dict"] = {  # what a checkpoint of that time holds: no presence head
        k: v for k, v in blob["state_dict"].items() if not k.startswith("unet.presence_head.")
    }
    old = path.with_name("old.pt")
    torch.save(blob, old)
    loaded = load_checkpoint(old)
    assert loaded.config == dataclasses.replace(
        model.unet.config, presence_hidden=0, cbam_levels=[0, 1, 2, 3]
    )
    assert loaded.model.unet.presence_head is None
    assert loaded.presence_thresholds == {}
    image = torch.rand(2, 1, 48, 48)
    emb = torch.randn(2, loaded.model.embed_dim)
    with torch.no_grad():
        logits, presence = loaded.model(image, emb)
        expected = model(image, emb)[0]
    assert torch.equal(logits, expected)
    assert torch.equal(presence, torch.full((2, 1), ALWAYS_PRESENT_LOGIT))


def test_presence_head_and_thresholds_round_trip(tmp_path):
    torch.manual_seed(1)
    model = PromptSegModel(preset_config("tiny", presence_hidden=8), 384, film_hidden=16).eval()
    taus = {"liver": 0.35, "glioma": 0.6}
    path = save_checkpoint(
        tmp_path / "presence.pt",
        model,
        text_encoder={"name": "minilm", "hidden_size": 384},
        vocabulary=PromptVocabulary(),
        preprocessing=Preprocessing(resolution=32),
        prompt_embeddings={},
        train={},
        film_hidden=16,
        extra={"presence_thresholds": taus},
    )
    loaded = load_checkpoint(path)
    assert loaded.config.presence_hidden == 8
    assert loaded.presence_thresholds == taus
    image, emb = torch.rand(3, 1, 32, 32), torch.randn(3, 384)
    with torch.no_grad():
        assert torch.equal(loaded.model(image, emb)[1], model(image, emb)[1])


# --------------------------------------------------------------------------- errors


def test_non_checkpoint_files_value_error(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="not a readable promptseg checkpoint") as info:
        load_checkpoint(text)
    assert str(text) in str(info.value)

    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a promptseg checkpoint") as info:
        load_checkpoint(other)
    assert str(other) in str(info.value)

    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match=f"missing format='{FORMAT}'") as info:
        read_checkpoint_blob(tensor)
    assert str(tensor) in str(info.value)


def test_wrong_version_value_error(saved):
    path, _, _ = saved
    blob = torch.load(path, weights_only=False)
    blob["version"] = VERSION + 1
    newer = path.with_name("newer.pt")
    torch.save(blob, newer)
    with pytest.raises(ValueError, match=f"version {VERSION + 1}, expected {VERSION}") as info:
        load_checkpoint(newer)
    assert str(newer) in str(info.value)


def test_missing_file_not_found(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path)  # a folder is not a checkpoint


# --------------------------------------------------------------------------- writing


def test_atomic_write_leaves_no_temp_file(saved):
    path, _, _ = saved
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_failed_write_keeps_the_old_file_and_no_temp(saved, text_encoder):
    path, model, embeddings = saved
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        save_checkpoint(
            path,
            model,
            text_encoder=text_encoder.identity().to_dict(),
            vocabulary=PromptVocabulary(),
            preprocessing=Preprocessing(),
            prompt_embeddings=embeddings,
            train={"callback": lambda: None},
        )
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]


def test_save_without_prompt_embeddings(tmp_path):
    model = PromptSegModel(preset_config("tiny"), 384, film_hidden=16)
    path = save_checkpoint(
        tmp_path / "empty.pt",
        model,
        text_encoder={"name": "minilm", "hidden_size": 384},
        vocabulary=PromptVocabulary(),
        preprocessing=Preprocessing(resolution=32),
        prompt_embeddings={},
        train={},
        film_hidden=16,
    )
    loaded = load_checkpoint(path)
    assert loaded.prompt_embeddings == {}
    assert read_checkpoint_blob(path)["prompt_embeddings"]["embeddings"].shape == (0, 384)


def test_resolve_default_points_into_the_package(tmp_path):
    package = Path(promptseg.__file__).resolve().parent
    assert DEFAULT_CHECKPOINT.resolve().is_relative_to(package)
    assert DEFAULT_CHECKPOINT.suffix == ".pt"
    if DEFAULT_CHECKPOINT.is_file():
        assert resolve_checkpoint("default") == DEFAULT_CHECKPOINT
        assert load_checkpoint("default").path == DEFAULT_CHECKPOINT
    else:
        with pytest.raises(FileNotFoundError, match="packaged default model is missing") as info:
            resolve_checkpoint("default")
        assert str(DEFAULT_CHECKPOINT) in str(info.value)
    existing = tmp_path / "x.pt"
    existing.write_bytes(b"")
    assert resolve_checkpoint(existing) == existing
    assert resolve_checkpoint(str(existing)) == existing
