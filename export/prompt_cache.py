"""The prompt cache: every known phrasing -> its text embedding and packed FiLM vector.

``prompt_cache.safetensors`` holds ``film`` float32 (K, P) and ``embedding`` float32 (K, E);
its metadata lists the K prompts and their canonical targets (see docs/engine_format.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.export.files import ExportInputError, atomic_write
from promptseg.prompts import PromptVocabulary
from promptseg.runtime.prompt_resolver import PromptCache


def vocabulary_prompts(vocab: PromptVocabulary) -> list[tuple[str, str]]:
    """(prompt, target) for every target: bare name, canonical, training and held-out phrasings.

    Order is deterministic and duplicates keep their first target.

    Raises:
        ExportInputError: one phrasing belongs to two different targets.
    """
    pairs: list[tuple[str, str]] = []
    for target in vocab.targets:
        phrasings = [target, vocab.canonical(target)]
        phrasings += vocab.train_prompts(target) + vocab.heldout_prompts(target)
        pairs += [(p, target) for p in phrasings]
    return _dedupe(pairs, "the checkpoint vocabulary")


def _dedupe(pairs: list[tuple[str, str]], where: str) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    out: list[tuple[str, str]] = []
    for prompt, target in pairs:
        if prompt in seen:
            if seen[prompt] != target:
                raise ExportInputError(
                    f"{where}: prompt {prompt!r} maps to both {seen[prompt]!r} and {target!r}"
                )
            continue
        seen[prompt] = target
        out.append((prompt, target))
    return out


def read_prompts_file(
    path: str | os.PathLike[str], targets: tuple[str, ...]
) -> list[tuple[str, str | None]]:
    """Extra prompts, one per line: ``prompt`` or ``prompt<TAB>target``.

    Blank lines and lines starting with ``#`` are skipped. A prompt without a target gets the
    target of its nearest vocabulary embedding when the cache is built.

    Raises:
        ExportInputError: unreadable file or a target not in ``targets``.
    """
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportInputError(f"{file}: cannot read the prompts file ({exc})") from exc
    out: list[tuple[str, str | None]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, _, target = line.partition("\t")
        prompt, target = " ".join(prompt.split()), target.strip()
        if target and target not in targets:
            raise ExportInputError(
                f"{file}:{number}: unknown target {target!r}; expected one of {list(targets)}"
            )
        out.append((prompt, target or None))
    if not out:
        raise ExportInputError(f"{file}: no prompts (expected one prompt per line)")
    return out


def build_cache(
    vocab: PromptVocabulary,
    encoder: Any,
    film_generator: Any,
    extra: list[tuple[str, str | None]] | None = None,
) -> PromptCache:
    """Embed every prompt with the torch text encoder and run the FiLM generator on it.

    Args:
        vocab: The checkpoint's vocabulary.
        encoder: ``promptseg.model.text.TextEncoder``.
        film_generator: ``promptseg.model.film.FilmGenerator`` (eval mode).
        extra: Prompts from ``--prompts`` with optional targets.

    Returns:
        The cache, vocabulary prompts first, then the extra ones not already present.
    """
    import torch

    pairs = vocabulary_prompts(vocab)
    prompts = [p for p, _ in pairs]
    emb = _embed(encoder, prompts)
    targets = [t for _, t in pairs]
    known = set(prompts)
    extra = [(p, t) for p, t in (extra or []) if p not in known]
    if extra:
        extra_emb = _embed(encoder, [p for p, _ in extra])
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        for (prompt, target), e in zip(extra, extra_emb):
            if target is None:
                target = targets[int(np.argmax(unit @ (e / np.linalg.norm(e))))]
            prompts.append(prompt)
            targets.append(target)
        emb = np.concatenate([emb, extra_emb])
    film_generator.eval()
    with torch.no_grad():
        film = film_generator(torch.from_numpy(emb)).numpy().astype(np.float32)
    return PromptCache(
        prompts=prompts,
        targets=targets,
        film=film,
        embedding=np.ascontiguousarray(emb, np.float32),
    )


def _embed(encoder: Any, prompts: list[str], batch: int = 64) -> np.ndarray:
    chunks = [encoder(prompts[i : i + batch]).numpy() for i in range(0, len(prompts), batch)]
    return np.concatenate(chunks).astype(np.float32)


def save_cache(cache: PromptCache, path: str | os.PathLike[str], extra_meta: dict) -> Path:
    """Write ``prompt_cache.safetensors`` atomically with the contract's metadata."""
    return atomic_write(path, lambda tmp: cache.write(tmp, extra_meta))
