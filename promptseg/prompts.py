"""Prompt vocabulary: targets, synonyms and templates (pure data, no torch).

Training draws a random synonym and a random template per sample from the *train* lists; the
``heldout`` lists are never seen in training so evaluation can measure wording robustness.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

TARGETS: tuple[str, ...] = (
    "liver",
    "spleen",
    "left kidney",
    "right kidney",
    "glioma",
    "meningioma",
    "pituitary tumour",
    "liver tumour",
)

LATERAL_PAIRS: dict[str, str] = {"left kidney": "right kidney", "right kidney": "left kidney"}

SYNONYMS: dict[str, list[str]] = {
    "liver": ["liver", "hepatic parenchyma", "hepar", "the liver organ"],
    "spleen": ["spleen", "splenic parenchyma", "lien", "the spleen organ"],
    "left kidney": [
        "left kidney",
        "left renal parenchyma",
        "kidney on the left",
        "left kidney organ",
    ],
    "right kidney": [
        "right kidney",
        "right renal parenchyma",
        "kidney on the right",
        "right kidney organ",
    ],
    "glioma": ["glioma", "glial tumour", "glioma lesion", "glial neoplasm"],
    "meningioma": ["meningioma", "meningeal tumour", "meningioma lesion", "dural-based tumour"],
    "pituitary tumour": [
        "pituitary tumour",
        "pituitary adenoma",
        "pituitary lesion",
        "sellar tumour",
    ],
    "liver tumour": ["liver tumour", "hepatic lesion", "liver lesion", "hepatic tumour"],
}

HELDOUT_SYNONYMS: dict[str, list[str]] = {
    "liver": ["hepatic tissue"],
    "spleen": ["splenic tissue"],
    "left kidney": ["left renal tissue"],
    "right kidney": ["right renal tissue"],
    "glioma": ["glial cell tumour"],
    "meningioma": ["meningeal neoplasm"],
    "pituitary tumour": ["pituitary neoplasm"],
    "liver tumour": ["hepatic neoplasm"],
}

TEMPLATES: list[str] = [
    "{x}",
    "Segment the {x}",
    "Your goal is to spot the {x}",
    "Identify the {x} region",
    "Outline the {x}",
    "Delineate the {x} in this image",
    "Find the {x}",
    "Show me the {x}",
]

HELDOUT_TEMPLATES: list[str] = [
    "Please mark the {x}",
    "Where is the {x}?",
]

# Free-form clinical phrasings used only by robustness evaluation (never trained on).
FREE_FORM: dict[str, list[str]] = {
    "liver": ["contour the whole liver for volumetry"],
    "spleen": ["measure the spleen, query splenomegaly"],
    "left kidney": ["outline the left kidney for renal volume"],
    "right kidney": ["outline the right kidney for renal volume"],
    "glioma": ["delineate the intra-axial glial mass"],
    "meningioma": ["contour the extra-axial meningioma"],
    "pituitary tumour": ["segment the sellar adenoma"],
    "liver tumour": ["contour the hepatic mass"],
}


# Group prompts: one prompt that names several targets, segmented as one label per member.
GROUPS: dict[str, tuple[str, ...]] = {
    "kidneys": ("left kidney", "right kidney"),
    "abdominal organs": ("liver", "spleen", "left kidney", "right kidney"),
}

GROUP_SYNONYMS: dict[str, list[str]] = {
    "kidneys": [
        "kidneys",
        "both kidneys",
        "the kidneys",
        "left and right kidney",
        "left and right kidneys",
        "right and left kidney",
        "right and left kidneys",
        "bilateral kidneys",
    ],
    "abdominal organs": [
        "abdominal organs",
        "the abdominal organs",
        "all abdominal organs",
        "all organs",
        "organs",
        "abdominal viscera",
    ],
}

# Prompts that name a kind of target but not which one (calibration of the ambiguity margin,
# never trained on): each should be answered with the list of candidate targets.
AMBIGUOUS: tuple[str, ...] = (
    "tumor",
    "tumour",
    "the tumour",
    "a tumour",
    "segment the tumor",
    "outline the tumour",
    "find the tumor",
    "lesion",
    "the lesion",
    "neoplasm",
    "cancer",
    "brain tumour",
    "kidney",
    "the kidney",
    "segment the kidney",
    "kidney organ",
    "renal parenchyma",
    "organ",
)


def prompt_groups(
    targets: tuple[str, ...] | list[str] = TARGETS,
) -> dict[str, dict[str, list[str]]]:
    """The groups whose members are all in ``targets``: name -> {"members", "phrasings"}.

    Phrasings are the group's name and synonyms in every train and held-out template (the
    manifest's ``prompt_groups``; the runtime matches them after normalisation).
    """
    out: dict[str, dict[str, list[str]]] = {}
    for name, members in GROUPS.items():
        if not set(members) <= set(targets):
            continue
        synonyms = list(dict.fromkeys([name, *GROUP_SYNONYMS.get(name, [])]))
        phrasings = [t.format(x=s) for s in synonyms for t in TEMPLATES + HELDOUT_TEMPLATES]
        out[name] = {"members": list(members), "phrasings": list(dict.fromkeys(phrasings))}
    return out


@dataclass(frozen=True)
class PromptVocabulary:
    """Targets with their synonyms and templates; travels inside every checkpoint."""

    targets: tuple[str, ...] = TARGETS
    synonyms: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in SYNONYMS.items()}
    )
    templates: list[str] = field(default_factory=lambda: list(TEMPLATES))
    heldout_synonyms: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in HELDOUT_SYNONYMS.items()}
    )
    heldout_templates: list[str] = field(default_factory=lambda: list(HELDOUT_TEMPLATES))

    def sample(self, target: str, rng: random.Random) -> str:
        """A random training phrasing of ``target`` (synonym and template from the train lists)."""
        self._check(target)
        synonym = rng.choice(self.synonyms[target])
        return rng.choice(self.templates).format(x=synonym)

    def canonical(self, target: str) -> str:
        """The canonical prompt for a target: ``"Segment the {target}"``."""
        self._check(target)
        return f"Segment the {target}"

    def train_prompts(self, target: str) -> list[str]:
        """Every training phrasing of ``target``."""
        self._check(target)
        return [t.format(x=s) for s in self.synonyms[target] for t in self.templates]

    def heldout_prompts(self, target: str) -> list[str]:
        """Phrasings never seen in training: held-out synonyms x all templates, plus all
        synonyms x held-out templates."""
        self._check(target)
        syn = self.synonyms[target] + self.heldout_synonyms.get(target, [])
        held = [
            t.format(x=s) for s in self.heldout_synonyms.get(target, []) for t in self.templates
        ]
        held += [t.format(x=s) for s in syn for t in self.heldout_templates]
        return held

    def all_prompts(self) -> dict[str, str]:
        """Every known phrasing (train and held-out) mapped to its target."""
        out: dict[str, str] = {}
        for target in self.targets:
            for prompt in self.train_prompts(target) + self.heldout_prompts(target):
                out[prompt] = target
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PromptVocabulary:
        return cls(
            targets=tuple(d["targets"]),
            synonyms={k: list(v) for k, v in d["synonyms"].items()},
            templates=list(d["templates"]),
            heldout_synonyms={k: list(v) for k, v in d["heldout_synonyms"].items()},
            heldout_templates=list(d["heldout_templates"]),
        )

    def sha256(self) -> str:
        """Stable hash of the vocabulary (goes into checkpoints and export manifests)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def _check(self, target: str) -> None:
        if target not in self.targets:
            raise ValueError(f"unknown target {target!r}; expected one of {list(self.targets)}")
