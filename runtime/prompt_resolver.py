"""Prompt text -> packed FiLM vector, without PyTorch.

Resolution order for a prompt:

1. exact hit in ``prompt_cache.safetensors``;
2. hit after normalisation (lowercase, whitespace collapsed, punctuation stripped at the end),
   applied to both the prompt and the cached prompts;
3. otherwise the WordPiece tokenizer + ``text_encoder.onnx`` embed the prompt; the cosine
   similarity to the nearest cached embedding decides: below the manifest's
   ``prompt_refusal.threshold`` the prompt is refused with the list of known targets, else
   ``film_generator.onnx`` turns the embedding into the FiLM vector.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.runtime.errors import InputError, PathLike, first_line
from promptseg.runtime.manifest import EngineFolder
from promptseg.runtime.ort_engine import ort_session
from promptseg.runtime.tokenizer import WordPieceTokenizer

CACHE_FORMAT = "promptseg-prompt-cache"
CACHE_VERSION = "1"


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
    """

    prompt: str
    target: str
    film: np.ndarray
    how: str
    similarity: float
    nearest: str

    def summary(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "target": self.target,
            "resolved_by": self.how,
            "similarity": round(float(self.similarity), 4),
            "nearest_cached_prompt": self.nearest,
        }


def normalise_prompt(text: str) -> str:
    """Lowercase, collapse whitespace, strip whitespace and punctuation at both ends' tail."""
    out = " ".join(text.lower().split())
    while out and (out[-1].isspace() or unicodedata.category(out[-1]).startswith("P")):
        out = out[:-1]
    return out.strip()


@dataclass
class PromptCache:
    """The contents of ``prompt_cache.safetensors``.

    Attributes:
        prompts: K cached prompt strings.
        targets: K canonical target names.
        film: (K, P) float32 FiLM vectors.
        embedding: (K, E) float32 text embeddings.
        path: The file.
    """

    prompts: list[str]
    targets: list[str]
    film: np.ndarray
    embedding: np.ndarray
    path: Path

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
        return cls(prompts, targets, film, embedding, p)


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

    def resolve(self, prompt: str) -> ResolvedPrompt:
        """Map a prompt to its FiLM vector (see the module docstring for the order).

        Raises:
            PromptError: Empty prompt, or refused as too far from every known target.
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
        embedding = self.embed([prompt])[0]
        i, sim = self.nearest(embedding)
        if sim < self.threshold:
            raise PromptError(
                f"{prompt!r} is not a known target (nearest: {cache.targets[i]}, similarity "
                f"{sim:.2f} < {self.threshold:.2f}); known targets: {', '.join(self.targets)}"
            )
        film = self.film(embedding[None])[0]
        return ResolvedPrompt(prompt, cache.targets[i], film, "encoder", sim, cache.prompts[i])

    def resolve_all(self, prompts: list[str]) -> list[ResolvedPrompt]:
        """Resolve several prompts (each one as :meth:`resolve`)."""
        if not prompts:
            raise PromptError("no prompt given; expected at least one --prompt TEXT")
        return [self.resolve(p) for p in prompts]
