"""Prompt text -> packed FiLM vector, without PyTorch.

Resolution order for a prompt:

1. exact hit in ``prompt_cache.safetensors``;
2. hit after normalisation (lowercase, whitespace collapsed, punctuation stripped at the end),
   applied to both the prompt and the cached prompts;
3. otherwise the WordPiece tokenizer + ``text_encoder.onnx`` embed the prompt; the cosine
   similarity to the nearest cached embedding decides: below the manifest's
   ``prompt_refusal.threshold`` the prompt is refused with the list of known targets, else
   ``film_generator.onnx`` turns the embedding into the FiLM vector.

Before the cache, a group prompt ("kidneys", "both kidneys", "abdominal organs": the
manifest's ``prompt_groups``, else :func:`promptseg.prompts.prompt_groups`) expands to its
member targets, one resolved prompt (and label) each, with the members' cached FiLM vectors.

On the encoder path the target is the one the prompt names word for word
(:func:`named_targets`: "the patient's liver" is the liver, not "liver tumour"), else the
nearest one among those its side words allow ("left ..." never resolves to a "right ..."
target: the text encoder barely tells them apart). A prompt that names no target and whose
best targets lie within the ambiguity margin (``prompt_refusal.ambiguity_margin``, else
:data:`DEFAULT_AMBIGUITY_MARGIN`) of cosine similarity, or that names several targets, is
refused with the candidates ("ambiguous prompt 'tumor': glioma, ...?").
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.prompts import prompt_groups
from promptseg.runtime.engine_format import CACHE_FORMAT, CACHE_VERSION
from promptseg.runtime.errors import InputError, PathLike, first_line
from promptseg.runtime.manifest import EngineFolder
from promptseg.runtime.ort_engine import ort_session
from promptseg.runtime.tokenizer import WordPieceTokenizer

# The packaged engine's calibrated margin (python scripts/calibrate_ambiguity.py), used for
# engines whose manifest records none (exported before promptseg-export calibrated it).
DEFAULT_AMBIGUITY_MARGIN = 0.1215
SIDE_WORDS = ("left", "right")


class PromptError(InputError):
    """An empty, refused or otherwise unusable prompt (message starts with ``--prompt:``)."""

    def __init__(self, problem: str) -> None:
        super().__init__("--prompt", problem)


@dataclass(frozen=True)
class ResolvedPrompt:
    """A prompt mapped to the model's conditioning.

    Attributes:
        prompt: The text as given.
        target: Canonical target of the matched cache entry.
        film: Packed FiLM vector (P,) float32.
        how: "cache", "normalised" or "encoder".
        similarity: Cosine similarity to the nearest cached embedding (1.0 for cache hits).
        nearest: The nearest cached prompt.
        group: The group the prompt named ("kidneys"), None for a single-target prompt.
    """

    prompt: str
    target: str
    film: np.ndarray
    how: str
    similarity: float
    nearest: str
    group: str | None = None

    def summary(self) -> dict[str, Any]:
        out = {
            "prompt": self.prompt,
            "target": self.target,
            "resolved_by": self.how,
            "similarity": round(float(self.similarity), 4),
            "nearest_cached_prompt": self.nearest,
        }
        if self.group is not None:
            out["group"] = self.group
        return out

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> ResolvedPrompt:
        """The prompt a :meth:`summary` describes, without its FiLM vector (empty)."""
        return cls(
            summary["prompt"],
            summary["target"],
            np.empty(0, np.float32),
            summary["resolved_by"],
            summary["similarity"],
            summary["nearest_cached_prompt"],
            summary.get("group"),
        )


def normalise_prompt(text: str) -> str:
    """Lowercase, collapse whitespace, strip whitespace and punctuation at both ends' tail."""
    out = " ".join(text.lower().split())
    while out and (out[-1].isspace() or unicodedata.category(out[-1]).startswith("P")):
        out = out[:-1]
    return out.strip()


def side_words(text: str) -> set[str]:
    """The side words ("left", "right") a text contains as whole words."""
    return set(re.findall(r"[a-z]+", text.lower())) & set(SIDE_WORDS)


_SPELLING = {"tumor": "tumour", "tumors": "tumour", "tumours": "tumour"}


def _word_set(text: str) -> set[str]:
    return {_SPELLING.get(w, w) for w in re.findall(r"[a-z]+", text.lower())}


def named_targets(prompt: str, targets: list[str]) -> list[str]:
    """Targets whose every word the prompt contains ("the patient's liver" -> liver).

    A target named only as part of a longer named one is dropped ("liver tumour" covers
    "liver"); American spellings count ("tumor" is "tumour").
    """
    words = _word_set(prompt)
    hits = [t for t in targets if _word_set(t) <= words]
    return [t for t in hits if not any(_word_set(t) < _word_set(o) for o in hits)]


def allowed_by_side(prompt: str, target: str) -> bool:
    """False when the prompt names exactly one side and the target names the other."""
    said, named = side_words(prompt), side_words(target)
    return not (len(said) == 1 and named and not (said & named))


def target_scores(
    unit: np.ndarray,
    targets: list[str],
    embedding: np.ndarray,
    prompt: str,
    skip: np.ndarray | None = None,
) -> list[tuple[str, float, int]]:
    """(target, cosine, cache row) for each target the prompt's side words allow, best first.

    Args:
        unit: (K, E) unit-length cached embeddings.
        targets: The K cached prompts' targets.
        embedding: (E,) query embedding.
        prompt: The query text (for its side words).
        skip: (K,) bool rows to leave out (leave-one-out calibration).

    A target's cosine is that of its nearest cached phrasing.
    """
    sims = unit @ (embedding / max(float(np.linalg.norm(embedding)), 1e-12))
    if skip is not None:
        sims = np.where(skip, -np.inf, sims)
    rows_of: dict[str, list[int]] = {}
    for row, target in enumerate(targets):
        rows_of.setdefault(target, []).append(row)
    out = []
    for target, rows in rows_of.items():
        best = rows[int(np.argmax(sims[rows]))]
        if allowed_by_side(prompt, target) and np.isfinite(sims[best]):
            out.append((target, float(sims[best]), best))
    return sorted(out, key=lambda item: -item[1])


def ambiguity_gap(scores: list[tuple[str, float, int]]) -> float:
    """Cosine gap between the best and the second-best target (inf with one target)."""
    return scores[0][1] - scores[1][1] if len(scores) > 1 else float("inf")


@dataclass
class PromptCache:
    """The contents of ``prompt_cache.safetensors`` (the one class export and runtime share).

    Attributes:
        prompts: K cached prompt strings.
        targets: K canonical target names.
        film: (K, P) float32 FiLM vectors.
        embedding: (K, E) float32 text embeddings.
        path: The file it was read from (None for a cache built in memory).
        meta: The file's raw metadata strings.
    """

    prompts: list[str]
    targets: list[str]
    film: np.ndarray
    embedding: np.ndarray
    path: Path | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def index(self, prompt: str) -> int:
        """Row of a cached prompt (exact string)."""
        return self.prompts.index(prompt)

    def write(self, path: PathLike, extra_meta: dict[str, Any] | None = None) -> None:
        """Write the file (not atomically: callers write to a temp path and rename it)."""
        from safetensors.numpy import save_file

        meta = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "prompts": json.dumps(self.prompts, ensure_ascii=False),
            "targets": json.dumps(self.targets, ensure_ascii=False),
            "film_dim": str(self.film.shape[1]),
            "embed_dim": str(self.embedding.shape[1]),
        }
        for key, value in (extra_meta or {}).items():
            meta[key] = value if isinstance(value, str) else json.dumps(value)
        tensors = {"film": self.film, "embedding": self.embedding}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(
        cls, path: PathLike, film_dim: int | None = None, embed_dim: int | None = None
    ) -> PromptCache:
        """Read and validate a prompt cache.

        Raises:
            InputError: Unreadable or corrupted file, wrong format/version metadata, tensors of
                the wrong dtype or shape, prompts/targets lists that do not match.
        """
        p = Path(path)
        if not p.is_file():
            raise InputError(p, "prompt cache not found")
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="numpy") as fh:
                meta = dict(fh.metadata() or {})
                keys = set(fh.keys())
                if not {"film", "embedding"} <= keys:
                    raise InputError(
                        p, f"holds tensors {sorted(keys)}; expected 'film' and 'embedding'"
                    )
                film = np.asarray(fh.get_tensor("film"))
                embedding = np.asarray(fh.get_tensor("embedding"))
        except InputError:
            raise
        except Exception as exc:  # safetensors raises SafetensorError/OSError for bad files
            first = first_line(exc)
            raise InputError(p, f"corrupted prompt cache ({first})") from exc
        if meta.get("format") != CACHE_FORMAT or str(meta.get("version")) != CACHE_VERSION:
            raise InputError(
                p,
                f"metadata format={meta.get('format')!r} version={meta.get('version')!r}; expected "
                f"format={CACHE_FORMAT!r} version={CACHE_VERSION!r}",
            )
        try:
            prompts = [str(x) for x in json.loads(meta["prompts"])]
            targets = [str(x) for x in json.loads(meta["targets"])]
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise InputError(p, f"metadata 'prompts'/'targets' must be JSON lists ({exc})") from exc
        k = len(prompts)
        if film.dtype != np.float32 or embedding.dtype != np.float32:
            raise InputError(p, f"tensors are {film.dtype}/{embedding.dtype}; expected float32")
        if film.ndim != 2 or embedding.ndim != 2 or film.shape[0] != k or embedding.shape[0] != k:
            raise InputError(
                p,
                f"film {film.shape} and embedding {embedding.shape} for {k} prompts; expected "
                f"({k}, P) and ({k}, E)",
            )
        if len(targets) != k or k == 0:
            raise InputError(
                p, f"{k} prompts and {len(targets)} targets; expected as many, at least 1"
            )
        for name, got, want in (
            ("film_dim", film.shape[1], film_dim),
            ("embed_dim", embedding.shape[1], embed_dim),
        ):
            meta_value = meta.get(name)
            if meta_value is not None and int(meta_value) != got:
                raise InputError(p, f"{name} metadata {meta_value} but tensors have {got}")
            if want is not None and int(want) != got:
                raise InputError(p, f"{name} {got} differs from the engine manifest's {want}")
        if not (np.all(np.isfinite(film)) and np.all(np.isfinite(embedding))):
            raise InputError(p, "holds NaN or Inf values")
        return cls(prompts, targets, film, embedding, p, meta)


class PromptResolver:
    """Resolve prompts against an engine folder's cache, encoder and FiLM generator.

    Args:
        folder: The engine folder (path or opened :class:`EngineFolder`).
        threads: ONNX Runtime threads for the text encoder and FiLM generator.
    """

    def __init__(self, folder: PathLike | EngineFolder, *, threads: int | None = None) -> None:
        self.folder = folder if isinstance(folder, EngineFolder) else EngineFolder.open(folder)
        self.cache = PromptCache.load(
            self.folder.file("prompt_cache.safetensors"),
            self.folder.film_dim,
            self.folder.embed_dim,
        )
        self.threshold = self.folder.refusal_threshold
        self.targets = self.folder.targets or sorted(set(self.cache.targets))
        self.threads = threads
        self._exact = {p: i for i, p in reversed(list(enumerate(self.cache.prompts)))}
        self._normalised: dict[str, int] = {}
        for i, p in enumerate(self.cache.prompts):
            self._normalised.setdefault(normalise_prompt(p), i)
        norms = np.linalg.norm(self.cache.embedding, axis=1, keepdims=True)
        self._unit = self.cache.embedding / np.maximum(norms, 1e-12)
        self.margin = self.folder.ambiguity_margin
        if self.margin is None:
            self.margin = DEFAULT_AMBIGUITY_MARGIN
        self.groups = self.folder.prompt_groups
        if self.groups is None:
            self.groups = prompt_groups(self.targets)
        self._group_keys: dict[str, str] = {}
        for name, group in self.groups.items():
            for phrasing in [name, *group["phrasings"]]:
                self._group_keys.setdefault(normalise_prompt(phrasing), name)
        self._cache_targets = list(dict.fromkeys(self.cache.targets))
        self._tokenizer: WordPieceTokenizer | None = None
        self._encoder: Any = None
        self._generator: Any = None

    # ------------------------------------------------------------------ sessions

    def _session(self, name: str) -> Any:
        path = self.folder.file(name)
        return ort_session(path, threads=self.threads, what=path)

    @property
    def tokenizer(self) -> WordPieceTokenizer:
        if self._tokenizer is None:
            te = self.folder.manifest["text_encoder"]
            self._tokenizer = WordPieceTokenizer(
                self.folder.file(te.get("vocab", "vocab.txt")),
                max_tokens=int(te.get("max_tokens", 16)),
                lowercase=bool(te.get("lowercase", True)),
            )
        return self._tokenizer

    def embed(self, prompts: list[str]) -> np.ndarray:
        """Text embeddings from ``text_encoder.onnx``: N prompts -> (N, E) float32."""
        if self._encoder is None:
            te = self.folder.manifest["text_encoder"]
            self._encoder = self._session(te.get("onnx", "text_encoder.onnx"))
        tokens = self.tokenizer(prompts)
        names = {i.name for i in self._encoder.get_inputs()}
        feed = {k: v for k, v in tokens.items() if k in names}
        out = self._encoder.run(None, feed)[0]
        return np.asarray(out, dtype=np.float32)

    def film(self, embedding: np.ndarray) -> np.ndarray:
        """FiLM vectors from ``film_generator.onnx``: (N, E) -> (N, P) float32."""
        if self._generator is None:
            self._generator = self._session("film_generator.onnx")
        name = self._generator.get_inputs()[0].name
        out = self._generator.run(None, {name: np.ascontiguousarray(embedding, dtype=np.float32)})[
            0
        ]
        return np.asarray(out, dtype=np.float32)

    # ------------------------------------------------------------------ resolution

    def nearest(self, embedding: np.ndarray) -> tuple[int, float]:
        """Index of the nearest cached embedding and its cosine similarity, for one (E,)."""
        q = embedding / max(float(np.linalg.norm(embedding)), 1e-12)
        sims = self._unit @ q
        i = int(np.argmax(sims))
        return i, float(sims[i])

    def target_scores(self, embedding: np.ndarray, prompt: str) -> list[tuple[str, float, int]]:
        """:func:`target_scores` against this resolver's cache."""
        return target_scores(self._unit, self.cache.targets, embedding, prompt)

    def group(self, prompt: str) -> str | None:
        """The group a prompt names (after normalisation), or None."""
        return self._group_keys.get(normalise_prompt(prompt))

    def _member(self, prompt: str, group: str, target: str) -> ResolvedPrompt:
        """A group member: the cached FiLM vector of the target's own name (or first phrasing)."""
        rows = [i for i, t in enumerate(self.cache.targets) if t == target]
        if not rows:
            raise PromptError(
                f"group {group!r} names {target!r}, which this engine's prompt cache does not "
                f"hold; known targets: {', '.join(self.targets)}"
            )
        i = self._exact.get(target, rows[0])
        i = i if self.cache.targets[i] == target else rows[0]
        return ResolvedPrompt(
            prompt, target, self.cache.film[i].copy(), "group", 1.0, self.cache.prompts[i], group
        )

    def expand(self, prompt: str) -> list[ResolvedPrompt]:
        """One resolved prompt per target the prompt names: a group's members, else one.

        Raises:
            PromptError: As :meth:`resolve`.
        """
        if isinstance(prompt, str) and prompt.strip():
            group = self.group(prompt)
            if group is not None:
                return [self._member(prompt, group, t) for t in self.groups[group]["members"]]
        return [self.resolve(prompt)]

    def resolve(self, prompt: str) -> ResolvedPrompt:
        """Map a single-target prompt to its FiLM vector (see the module docstring).

        Raises:
            PromptError: Empty prompt, a group prompt (use :meth:`expand`), refused as too far
                from every known target, or ambiguous between targets.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(
                f"empty prompt {prompt!r}; expected text naming a target, e.g. 'liver' "
                f"(known targets: {', '.join(self.targets)})"
            )
        cache = self.cache
        if prompt in self._exact:
            i = self._exact[prompt]
            return ResolvedPrompt(
                prompt, cache.targets[i], cache.film[i].copy(), "cache", 1.0, cache.prompts[i]
            )
        key = normalise_prompt(prompt)
        if key in self._normalised:
            i = self._normalised[key]
            return ResolvedPrompt(
                prompt, cache.targets[i], cache.film[i].copy(), "normalised", 1.0, cache.prompts[i]
            )
        group = self.group(prompt)
        if group is not None:
            members = ", ".join(self.groups[group]["members"])
            raise PromptError(f"{prompt!r} names the group {group!r} ({members}); expand it")
        embedding = self.embed([prompt])[0]
        i, sim = self.nearest(embedding)
        if sim < self.threshold:
            raise PromptError(
                f"{prompt!r} is not a known target (nearest: {cache.targets[i]}, similarity "
                f"{sim:.2f} < {self.threshold:.2f}); known targets: {', '.join(self.targets)}"
            )
        scores = self.target_scores(embedding, prompt)
        named = named_targets(prompt, self._cache_targets)
        if len(named) == 1:  # the prompt says which target: no ambiguity check
            scores = [s for s in scores if s[0] == named[0]] or scores
            close = set(named)
        elif named:
            close = set(named)
        else:
            close = {t for t, s, _ in scores if scores[0][1] - s < self.margin}
        if len(close) > 1:
            listed = [t for t in [*self.targets, *self._cache_targets] if t in close]
            why = "it names several targets" if named else f"within {self.margin:.3f} cosine"
            raise PromptError(
                f"ambiguous prompt {prompt!r}: {', '.join(dict.fromkeys(listed))}? ({why}; "
                "give one --prompt per target)"
            )
        target, best, row = scores[0]
        film = self.film(embedding[None])[0]
        return ResolvedPrompt(prompt, target, film, "encoder", best, cache.prompts[row])

    def resolve_all(self, prompts: list[str]) -> list[ResolvedPrompt]:
        """Resolve several prompts (each one as :meth:`expand`), in order."""
        if not prompts:
            raise PromptError("no prompt given; expected at least one --prompt TEXT")
        return [rp for p in prompts for rp in self.expand(p)]
