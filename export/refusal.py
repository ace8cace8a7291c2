"""Calibrate the prompt refusal threshold (cosine to the nearest cached embedding).

Accept side: held-out phrasings and free-form clinical phrasings, each compared with the cache
*without itself* (leave-one-out: a phrasing the cache holds, up to the runtime's normalisation
of case, spaces and trailing punctuation, is served from the cache anyway).
Refuse side: :data:`OFF_TARGET`, requests for anatomy or tasks the model was never trained on.
The threshold is the midpoint of the gap between the two sides, or, where they overlap, the
middle of the range that maximises balanced accuracy.

The ambiguity margin is chosen the same way on the cosine gap between a prompt's best and
second-best target (:func:`promptseg.runtime.prompt_resolver.target_scores`): clear side, the
same held-out and free-form phrasings, each scored without the cached phrasings that share its
held-out synonym or template (:func:`heldout_phrasings`); ambiguous side,
:data:`promptseg.prompts.AMBIGUOUS` (prompts naming a kind of target but not which one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from promptseg.export.prompt_cache import PromptCache
from promptseg.prompts import AMBIGUOUS, FREE_FORM, PromptVocabulary
from promptseg.runtime.prompt_resolver import (
    ambiguity_gap,
    named_targets,
    normalise_prompt,
    target_scores,
)

OFF_TARGET: tuple[str, ...] = (
    "segment the heart",
    "lung nodule",
    "left femur",
    "what is the weather",
    "aorta",
    "pancreas",
    "gallbladder",
    "brain ventricles",
    "Outline the urinary bladder",
    "Find the stomach",
    "delineate the prostate gland",
    "segment the lumbar vertebrae",
    "show me the pulmonary embolism",
    "contour the thyroid gland",
    "Identify the colon",
    "translate this sentence into French",
    "count the red blood cells",
    "the right lung",
)


def nearest_cosine(
    queries: np.ndarray, query_prompts: list[str], cache: PromptCache, leave_one_out: bool
) -> np.ndarray:
    """Cosine of each query (Q, E) to its nearest cache embedding; optionally skip itself."""
    keys = cache.embedding / np.linalg.norm(cache.embedding, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ keys.T
    if leave_one_out:
        # the runtime's normalised lookup key: what it serves from the cache is left out
        norm_keys = [normalise_prompt(p) for p in cache.prompts]
        for i, prompt in enumerate(query_prompts):
            own = normalise_prompt(prompt)
            sims[i, [j for j, k in enumerate(norm_keys) if k == own]] = -np.inf
    return sims.max(axis=1)


def _summary(values: np.ndarray) -> dict[str, float]:
    return {
        "n": int(values.size),
        "min": float(values.min()),
        "p05": float(np.percentile(values, 5)),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
    }


def choose_threshold(accept: np.ndarray, refuse: np.ndarray) -> tuple[float, float, bool]:
    """(threshold, balanced accuracy, separable). Scores >= threshold are accepted."""
    if accept.min() > refuse.max():
        return float((accept.min() + refuse.max()) / 2.0), 1.0, True
    values = np.unique(np.concatenate([accept, refuse]))
    candidates = np.concatenate([[values[0] - 1e-6], (values[1:] + values[:-1]) / 2.0])
    scores = np.array(
        [((accept >= t).mean() + (refuse < t).mean()) / 2.0 for t in candidates], dtype=np.float64
    )
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    lo, hi = candidates[best[0]], candidates[best[-1]]
    threshold = float((lo + hi) / 2.0)
    balanced = ((accept >= threshold).mean() + (refuse < threshold).mean()) / 2.0
    return threshold, float(balanced), False


def calibrate_refusal(
    cache: PromptCache,
    vocab: PromptVocabulary,
    embed: Callable[[list[str]], np.ndarray],
    encoder_label: str,
) -> dict[str, Any]:
    """The manifest's ``prompt_refusal`` entry.

    Args:
        cache: The prompt cache (torch embeddings, as shipped).
        vocab: The checkpoint's vocabulary (held-out phrasings).
        embed: Query embedding function, the shipped ``text_encoder.onnx``: prompts -> (N, E).
        encoder_label: Which encoder ``embed`` runs (recorded).
    """
    heldout = [p for t in vocab.targets for p in vocab.heldout_prompts(t)]
    free = [p for t in vocab.targets for p in FREE_FORM.get(t, [])]
    accept_prompts = list(dict.fromkeys(heldout + free))
    accept = nearest_cosine(embed(accept_prompts), accept_prompts, cache, leave_one_out=True)
    refuse = nearest_cosine(embed(list(OFF_TARGET)), list(OFF_TARGET), cache, leave_one_out=False)
    threshold, balanced, separable = choose_threshold(accept, refuse)
    acc_s, ref_s = _summary(accept), _summary(refuse)
    rule = (
        "midpoint of the gap between the lowest accepted and the highest refused score"
        if separable
        else "middle of the threshold range maximising balanced accuracy (the sides overlap)"
    )
    how = (
        f"cosine of the {encoder_label} query embedding to its nearest cached embedding; "
        f"accept side: {len(heldout)} held-out + {len(free)} free-form phrasings, leave-one-out "
        f"(min {acc_s['min']:.3f}, median {acc_s['median']:.3f}); refuse side: {len(OFF_TARGET)} "
        f"off-target requests (median {ref_s['median']:.3f}, max {ref_s['max']:.3f}); "
        f"threshold = {rule}; balanced accuracy {balanced:.3f}; refuse when below"
    )
    worst_accept = [accept_prompts[i] for i in np.argsort(accept)[:3]]
    worst_refuse = [OFF_TARGET[i] for i in np.argsort(-refuse)[:3]]
    return {
        "metric": "cosine",
        "threshold": threshold,
        "how": how,
        "separable": separable,
        "balanced_accuracy": balanced,
        "accept": {**acc_s, "lowest": worst_accept},
        "refuse": {**ref_s, "highest": worst_refuse},
        "accepted_wrongly": int((refuse >= threshold).sum()),
        "refused_wrongly": int((accept < threshold).sum()),
        "off_target": list(OFF_TARGET),
    }


def heldout_phrasings(vocab: PromptVocabulary) -> dict[str, tuple[str, set[str]]]:
    """Each held-out phrasing -> its target and the normalised cache keys sharing its held-out part.

    A phrasing with a held-out synonym leaves out every cached phrasing of that synonym, one
    with a held-out template every cached phrasing of that template (and itself in any case),
    so that it is scored as the new wording a user would type, not against its siblings.
    """
    templates = vocab.templates + vocab.heldout_templates
    synonyms = {t: vocab.synonyms[t] + vocab.heldout_synonyms.get(t, []) for t in vocab.targets}
    every = [s for t in vocab.targets for s in synonyms[t]]
    out: dict[str, tuple[str, set[str]]] = {}
    for target in vocab.targets:
        for synonym in synonyms[target]:
            for template in templates:
                new_synonym = synonym in vocab.heldout_synonyms.get(target, [])
                new_template = template in vocab.heldout_templates
                if not (new_synonym or new_template):
                    continue
                keys = {normalise_prompt(template.format(x=synonym))}
                if new_synonym:
                    keys |= {normalise_prompt(t.format(x=synonym)) for t in templates}
                if new_template:
                    keys |= {normalise_prompt(template.format(x=s)) for s in every}
                out.setdefault(template.format(x=synonym), (target, set()))[1].update(keys)
    return out


def calibrate_ambiguity(
    cache: PromptCache,
    vocab: PromptVocabulary,
    embed: Callable[[list[str]], np.ndarray],
    refusal_threshold: float,
) -> dict[str, Any]:
    """The manifest's ``prompt_refusal.ambiguity_margin`` and how it was chosen.

    Only prompts the refusal threshold accepts and that name no target word for word count
    (the others never reach the check).

    Args:
        cache: The prompt cache (torch embeddings, as shipped).
        vocab: The checkpoint's vocabulary (held-out phrasings).
        embed: Query embedding function, the shipped ``text_encoder.onnx``: prompts -> (N, E).
        refusal_threshold: The calibrated refusal threshold.
    """
    clear = {p: (t, keys) for p, (t, keys) in heldout_phrasings(vocab).items()}
    for target in vocab.targets:
        for prompt in FREE_FORM.get(target, []):
            clear.setdefault(prompt, (target, {normalise_prompt(prompt)}))
    unit = cache.embedding / np.linalg.norm(cache.embedding, axis=1, keepdims=True)
    keys = np.array([normalise_prompt(p) for p in cache.prompts])

    def scored(prompts: list[str]) -> list[tuple[str, float, str]]:
        """(prompt, gap, best target) of the prompts the refusal threshold accepts."""
        out = []
        prompts = [p for p in prompts if not named_targets(p, list(vocab.targets))]
        for prompt in prompts:
            e = embed([prompt])[0]  # one at a time, as the runtime embeds (batches pad)
            left_out = clear.get(prompt, ("", {normalise_prompt(prompt)}))[1]
            skip = np.isin(keys, sorted(left_out))
            scores = target_scores(unit, cache.targets, e, prompt, skip=skip)
            if scores and scores[0][1] >= refusal_threshold:
                out.append((prompt, ambiguity_gap(scores), scores[0][0]))
        return out

    named = scored(list(clear))
    right = [(p, g) for p, g, t in named if t == clear[p][0]]
    wrong = [(p, g) for p, g, t in named if t != clear[p][0]]
    vague = [(p, g) for p, g, _ in scored(list(AMBIGUOUS))]
    flag = wrong + vague
    passing = np.array([g for _, g in right])
    flagging = np.array([g for _, g in flag])
    margin, balanced, separable = choose_threshold(passing, flagging)
    return {
        "ambiguity_margin": margin,
        "ambiguity": {
            "metric": "cosine gap between the best and the second-best target",
            "how": (
                f"pass side: {len(right)} held-out + free-form phrasings whose nearest target is "
                f"theirs, each scored without the cached phrasings sharing its held-out synonym "
                f"or template (min {passing.min():.3f}, median {np.median(passing):.3f}); flag "
                f"side: {len(vague)} prompts naming no single target and {len(wrong)} phrasings "
                f"whose nearest target is another (median {np.median(flagging):.3f}, max "
                f"{flagging.max():.3f}); margin = "
                + ("midpoint of the gap" if separable else "middle of the best balanced range")
                + f"; balanced accuracy {balanced:.3f}; ambiguous when the gap is below"
            ),
            "separable": separable,
            "balanced_accuracy": balanced,
            "pass": _summary(passing),
            "flag": _summary(flagging),
            "passed_wrongly": [p for p, g in flag if g >= margin],
            "flagged_wrongly": [p for p, g in right if g < margin],
            "ambiguous_prompts": [p for p, _ in vague],
            "misresolved_prompts": [p for p, _ in wrong],
        },
    }
