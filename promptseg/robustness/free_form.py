"""The free-form prompt file of ``promptseg robustness``: clinical phrasings and off-topic prompts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_FREE_FORM = (
    Path(__file__).resolve().parent.parent / "data" / "free_form.json"
)  # package data


@dataclass(frozen=True)
class FreeForm:
    """Free-form prompts: ``targeted`` (prompt, target) pairs and ``off_topic`` prompts."""

    targeted: tuple[tuple[str, str], ...]
    off_topic: tuple[str, ...]
    path: Path
    sha256: str


def load_free_form(path: str | Path, targets: Sequence[str]) -> FreeForm:
    """Read and validate the free-form prompt file.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not JSON, or entries of the wrong shape, or an unknown target (one line,
            naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: free-form prompt file not found")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from exc
    if not isinstance(data, dict) or not {"targeted", "off_topic"} <= set(data):
        raise ValueError(f"{path}: expected an object with lists 'targeted' and 'off_topic'")
    targeted = []
    for i, item in enumerate(data["targeted"]):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("prompt"), str)
            or not item["prompt"].strip()
        ):
            raise ValueError(f"{path}: targeted[{i}] must be {{'prompt': text, 'target': name}}")
        if item.get("target") not in targets:
            raise ValueError(
                f"{path}: targeted[{i}] ({item['prompt']!r}) has target {item.get('target')!r}; "
                f"expected one of {list(targets)}"
            )
        targeted.append((item["prompt"], item["target"]))
    off = data["off_topic"]
    if not isinstance(off, list) or not all(isinstance(p, str) and p.strip() for p in off):
        raise ValueError(f"{path}: 'off_topic' must be a list of non-empty strings")
    if not targeted and not off:
        raise ValueError(f"{path}: no prompts (both 'targeted' and 'off_topic' are empty)")
    return FreeForm(tuple(targeted), tuple(off), path, hashlib.sha256(raw).hexdigest())
