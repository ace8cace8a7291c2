"""Tests for promptseg.prompts: targets, synonyms, templates, held-out phrasings (pure data)."""

from __future__ import annotations

import json
import random
import re

import pytest

from promptseg.prompts import (
    FREE_FORM,
    HELDOUT_SYNONYMS,
    HELDOUT_TEMPLATES,
    LATERAL_PAIRS,
    SYNONYMS,
    TARGETS,
    TEMPLATES,
    PromptVocabulary,
)

EXPECTED_TARGETS = {
    "liver",
    "spleen",
    "left kidney",
    "right kidney",
    "glioma",
    "meningioma",
    "pituitary tumour",
    "liver tumour",
}


@pytest.fixture
def vocab() -> PromptVocabulary:
    return PromptVocabulary()


def test_eight_targets_with_synonyms(vocab):
    assert len(vocab.targets) == 8
    assert set(vocab.targets) == EXPECTED_TARGETS
    assert set(vocab.synonyms) == EXPECTED_TARGETS
    assert set(vocab.heldout_synonyms) == EXPECTED_TARGETS
    for target in vocab.targets:
        assert len(vocab.synonyms[target]) >= 2, target
        assert target in vocab.synonyms[target], "the target name itself is a training synonym"
        assert len(set(vocab.synonyms[target])) == len(vocab.synonyms[target]), target


@pytest.mark.parametrize("template", TEMPLATES + HELDOUT_TEMPLATES)
def test_every_template_has_one_placeholder(template):
    assert template.count("{x}") == 1
    assert "liver" in template.format(x="liver")


def test_heldout_lists_disjoint_from_training(vocab):
    train_synonyms = {s for syns in vocab.synonyms.values() for s in syns}
    heldout_synonyms = {s for syns in vocab.heldout_synonyms.values() for s in syns}
    assert heldout_synonyms and not heldout_synonyms & train_synonyms
    assert vocab.heldout_templates and not set(vocab.heldout_templates) & set(vocab.templates)
    train = {p for t in vocab.targets for p in vocab.train_prompts(t)}
    heldout = {p for t in vocab.targets for p in vocab.heldout_prompts(t)}
    assert heldout and not train & heldout


@pytest.mark.parametrize("target", TARGETS)
def test_sample_stays_in_training_phrasings(vocab, target):
    rng = random.Random(1234)
    draws = [vocab.sample(target, rng) for _ in range(600)]
    train = set(vocab.train_prompts(target))
    heldout = {p for t in vocab.targets for p in vocab.heldout_prompts(t)}
    assert set(draws) <= train
    assert not set(draws) & heldout
    # 600 draws over 4 x 8 phrasings cover every synonym and every template.
    assert set(draws) == train


def test_sample_is_deterministic_for_a_seed(vocab):
    def draws(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [vocab.sample(t, rng) for t in vocab.targets for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize("target", TARGETS)
def test_canonical(vocab, target):
    prompt = vocab.canonical(target)
    assert prompt == f"Segment the {target}"
    assert prompt in vocab.train_prompts(target)


def test_all_prompts_maps_back_to_target(vocab):
    mapping = vocab.all_prompts()
    expected = 0
    for target in vocab.targets:
        phrasings = vocab.train_prompts(target) + vocab.heldout_prompts(target)
        expected += len(phrasings)
        for prompt in phrasings:
            assert mapping[prompt] == target, prompt
    assert len(mapping) == expected  # no phrasing is shared by two targets
    assert mapping["Where is the left renal tissue?"] == "left kidney"
    assert mapping["Please mark the hepar"] == "liver"


def test_heldout_prompts_content(vocab):
    held = vocab.heldout_prompts("spleen")
    assert "Segment the splenic tissue" in held  # held-out synonym x training template
    assert "Please mark the spleen" in held  # training synonym x held-out template
    assert "Where is the splenic tissue?" in held  # both held out
    n_syn, n_held_syn = len(SYNONYMS["spleen"]), len(HELDOUT_SYNONYMS["spleen"])
    assert len(held) == n_held_syn * len(TEMPLATES) + (n_syn + n_held_syn) * len(HELDOUT_TEMPLATES)


@pytest.mark.parametrize(
    "call",
    [
        lambda v: v.canonical("kidney"),
        lambda v: v.train_prompts("Liver"),
        lambda v: v.heldout_prompts("lung"),
        lambda v: v.sample("brain", random.Random(0)),
    ],
    ids=["canonical", "train_prompts", "heldout_prompts", "sample"],
)
def test_unknown_target_value_error(vocab, call):
    with pytest.raises(ValueError, match="unknown target") as info:
        call(vocab)
    for target in TARGETS:
        assert target in str(info.value)


def test_to_dict_from_dict_round_trip(vocab):
    d = vocab.to_dict()
    assert d["targets"] == list(TARGETS)
    restored = PromptVocabulary.from_dict(json.loads(json.dumps(d)))
    assert restored == vocab
    assert restored.sha256() == vocab.sha256()
    assert restored.all_prompts() == vocab.all_prompts()


def test_sha256_stable_and_sensitive(vocab):
    digest = vocab.sha256()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert PromptVocabulary().sha256() == digest
    reordered = PromptVocabulary(synonyms=dict(reversed(list(SYNONYMS.items()))))
    assert reordered.sha256() == digest  # dict key order does not matter
    changed = {k: list(v) for k, v in SYNONYMS.items()}
    changed["liver"][1] = "hepatic organ"
    assert PromptVocabulary(synonyms=changed).sha256() != digest
    more_templates = PromptVocabulary(templates=[*TEMPLATES, "Mark the {x}"])
    assert more_templates.sha256() != digest
    assert vocab.sha256() == digest  # building other vocabularies left this one alone


def test_vocabularies_do_not_share_lists():
    first = PromptVocabulary()
    first.synonyms["liver"].append("hepatic gland")
    first.heldout_synonyms["spleen"].append("splenic gland")
    second = PromptVocabulary()
    assert "hepatic gland" not in second.synonyms["liver"]
    assert "hepatic gland" not in SYNONYMS["liver"]
    assert "splenic gland" not in HELDOUT_SYNONYMS["spleen"]
    assert second.sha256() != first.sha256()


@pytest.mark.parametrize(("side", "other"), [("left kidney", "right"), ("right kidney", "left")])
def test_renal_terms_carry_laterality(vocab, side, other):
    word = side.split()[0]
    phrasings = vocab.synonyms[side] + vocab.heldout_synonyms[side] + FREE_FORM[side]
    for phrase in phrasings:
        assert word in phrase.split(), phrase
        assert other not in phrase, phrase
    assert LATERAL_PAIRS[side] == f"{other} kidney"
    for prompt in vocab.train_prompts(side) + vocab.heldout_prompts(side):
        assert word in prompt and other not in prompt, prompt


def test_free_form_prompts_are_not_in_the_vocabulary(vocab):
    known = vocab.all_prompts()
    assert set(FREE_FORM) == EXPECTED_TARGETS
    for phrases in FREE_FORM.values():
        for phrase in phrases:
            assert phrase not in known
