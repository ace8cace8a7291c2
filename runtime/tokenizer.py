"""Pure-Python BERT WordPiece tokenizer (uncased), matching Hugging Face's ``BertTokenizerFast``.

No torch, no transformers, no ``tokenizers``: the runtime tokenizes prompts that miss the prompt
cache with this module and feeds the ids to ``text_encoder.onnx``.

The rules follow the ``tokenizers`` pipeline of a BERT ``tokenizer.json``:

1. Special tokens written literally in the text (``[CLS]``, ``[MASK]``, ...) are kept whole.
2. Normalisation: drop NUL, U+FFFD and control characters (Unicode category C except tab,
   newline, carriage return); map whitespace to a space; put spaces around CJK ideographs;
   strip accents (NFD, then drop non-spacing marks); lowercase.
3. Pre-tokenisation: split on whitespace, and isolate every punctuation character (ASCII
   punctuation or Unicode category P).
4. WordPiece: greedy longest-match-first with the ``##`` continuation prefix; a word longer
   than 100 characters, or one that cannot be covered by the vocabulary, becomes ``[UNK]``.
5. ``[CLS] tokens [SEP]``, truncated to ``max_tokens`` including both specials, padded with
   ``[PAD]`` (id 0 in BERT vocabularies) to the longest sequence in the batch.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np

from promptseg.runtime.errors import InputError, PathLike

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_INPUT_CHARS_PER_WORD = 100

# Rust's char::is_whitespace (the Unicode White_Space property), which tokenizers uses.
_WHITESPACE = frozenset(
    [chr(c) for c in (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680)]
    + [chr(c) for c in range(0x2000, 0x200B)]
    + [chr(c) for c in (0x2028, 0x2029, 0x202F, 0x205F, 0x3000)]
)
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_control(ch: str) -> bool:
    """Unicode category C (Cc, Cf, Cs, Co, Cn), except tab, newline and carriage return."""
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def _is_whitespace(ch: str) -> bool:
    return ch in _WHITESPACE


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_punctuation(ch: str) -> bool:
    """ASCII punctuation (including ``$+<=>^`|~``) or Unicode category P."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def normalize_text(text: str, lowercase: bool = True) -> str:
    """BERT normalisation: clean, space out CJK, strip accents and lowercase (when uncased)."""
    chars: list[str] = []
    for ch in text:
        if ch == "\0" or ch == "\ufffd" or _is_control(ch):
            continue
        if _is_whitespace(ch):
            chars.append(" ")
        elif _is_cjk(ch):
            chars.extend((" ", ch, " "))
        else:
            chars.append(ch)
    out = "".join(chars)
    if lowercase:  # strip_accents follows lowercase when unset, as in BertNormalizer
        out = "".join(
            c for c in unicodedata.normalize("NFD", out) if unicodedata.category(c) != "Mn"
        )
        out = "".join(c.lower() for c in out)  # per character: no final-sigma rule
    return out


def pre_tokenize(text: str) -> list[str]:
    """Split normalised text on whitespace and isolate punctuation characters."""
    words: list[str] = []
    current: list[str] = []
    for ch in text:
        if _is_whitespace(ch):
            if current:
                words.append("".join(current))
                current = []
        elif _is_punctuation(ch):
            if current:
                words.append("".join(current))
                current = []
            words.append(ch)
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


class WordPieceTokenizer:
    """BERT uncased WordPiece tokenizer reading a ``vocab.txt`` (one token per line).

    Args:
        vocab_file: The vocabulary file.
        max_tokens: Sequence length cap, including ``[CLS]`` and ``[SEP]``.
        lowercase: Lowercase and strip accents (BERT uncased).
    """

    def __init__(self, vocab_file: PathLike, max_tokens: int = 16, lowercase: bool = True) -> None:
        path = Path(vocab_file)
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 ([CLS] and [SEP]), got {max_tokens}")
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(path, f"cannot read the WordPiece vocabulary ({exc})") from exc
        if lines and lines[-1] == "":
            lines.pop()
        self.vocab: dict[str, int] = {}
        for index, token in enumerate(lines):
            self.vocab.setdefault(token.rstrip("\r"), index)
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise InputError(
                path, f"not a BERT WordPiece vocabulary: special tokens {missing} are missing"
            )
        self.path = path
        self.max_tokens = int(max_tokens)
        self.lowercase = lowercase
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]

    def __len__(self) -> int:
        return len(self.vocab)

    def wordpiece(self, word: str) -> list[str]:
        """Greedy longest-match-first split of one word into vocabulary pieces."""
        if len(word) > MAX_INPUT_CHARS_PER_WORD:
            return ["[UNK]"]
        pieces: list[str] = []
        start = 0
        while start < len(word):
            end = len(word)
            piece = None
            while start < end:
                candidate = word[start:end] if start == 0 else "##" + word[start:end]
                if candidate in self.vocab:
                    piece = candidate
                    break
                end -= 1
            if piece is None:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """Text -> WordPiece tokens (without [CLS]/[SEP], not truncated)."""
        tokens: list[str] = []
        for chunk, special in _split_special(text):
            if special:
                tokens.append(chunk)
                continue
            for word in pre_tokenize(normalize_text(chunk, self.lowercase)):
                tokens.extend(self.wordpiece(word))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Text -> ids ``[CLS] ... [SEP]`` truncated to ``max_tokens``."""
        ids = [self.vocab.get(t, self.unk_id) for t in self.tokenize(text)]
        return [self.cls_id, *ids[: self.max_tokens - 2], self.sep_id]

    def __call__(self, texts: list[str] | str) -> dict[str, np.ndarray]:
        """Batch-encode texts.

        Args:
            texts: One string or a list of N strings.

        Returns:
            ``input_ids``, ``attention_mask`` and ``token_type_ids``, each int64 (N, T) with T
            the longest encoded length in the batch (at most ``max_tokens``).
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise ValueError("expected at least one text to tokenize, got an empty list")
        encoded = [self.encode(t) for t in batch]
        length = max(len(e) for e in encoded)
        ids = np.full((len(batch), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), length), dtype=np.int64)
        for row, seq in enumerate(encoded):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": np.zeros_like(ids),
        }


def _split_special(text: str) -> list[tuple[str, bool]]:
    """Split raw text around literal special tokens: [(chunk, is_special), ...]."""
    out: list[tuple[str, bool]] = []
    start = 0
    i = 0
    while i < len(text):
        if text[i] == "[":
            match = next((t for t in SPECIAL_TOKENS if text.startswith(t, i)), None)
            if match is not None:
                if start < i:
                    out.append((text[start:i], False))
                out.append((match, True))
                i += len(match)
                start = i
                continue
        i += 1
    if start < len(text):
        out.append((text[start:], False))
    return out
