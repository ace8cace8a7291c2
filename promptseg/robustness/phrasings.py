"""Which phrasings ``promptseg robustness`` prompts with, and what is new in a held-out one."""

from __future__ import annotations

from promptseg.checkpoint import LoadedCheckpoint
from promptseg.evaluate import _Prompting


def draw_phrasings(
    loaded: LoadedCheckpoint, mode: str, target: str, case_id: str, k: int, seed: int = 0
) -> list[str]:
    """Up to ``k`` distinct phrasings of ``target`` for one case (``mode``: train or heldout)."""
    out: list[str] = []
    for s in range(seed, seed + 25 * k):
        p = _Prompting(mode, s).prompt(loaded, target, case_id)
        if p not in out:
            out.append(p)
        if len(out) == k:
            break
    return out


def heldout_kind(loaded: LoadedCheckpoint, target: str, prompt: str) -> str:
    """What is new in a held-out phrasing: "synonym", "template" or "synonym+template"."""
    v = loaded.vocabulary
    for syn in v.synonyms[target] + v.heldout_synonyms.get(target, []):
        for tmpl in v.templates + v.heldout_templates:
            if tmpl.format(x=syn) == prompt:
                new_syn = syn in v.heldout_synonyms.get(target, [])
                new_tmpl = tmpl in v.heldout_templates
                return "+".join(n for n, f in (("synonym", new_syn), ("template", new_tmpl)) if f)
    return "unknown"


def known_phrasing(vocab, prompt: str) -> str | None:
    """ "train" or "heldout" when ``prompt`` (normalised as the runtime does) is a vocabulary
    phrasing of that set, else ``None``."""
    from promptseg.runtime.prompt_resolver import normalise_prompt

    key = normalise_prompt(prompt)
    for target in vocab.targets:
        if key in {normalise_prompt(p) for p in vocab.train_prompts(target)}:
            return "train"
    for target in vocab.targets:
        if key in {normalise_prompt(p) for p in vocab.heldout_prompts(target)}:
            return "heldout"
    return None
