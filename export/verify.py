"""Export self-verification: ONNX Runtime against PyTorch on real slices and several prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from promptseg.export.files import ExportError


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria of one graph precision."""

    max_abs_logit_diff: float
    min_dice: float


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-3, 0.99),
    "fp16": Tolerance(5e-2, 0.98),
}


def dice_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks of any shape; 1.0 when both are empty."""
    inter = np.logical_and(a, b).sum()
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * inter / total)


def torch_logits(unet: Any, images: np.ndarray, film: np.ndarray) -> np.ndarray:
    """Reference logits of every slice (S, 1, R, R) for one FiLM vector (P,)."""
    import torch

    unet.eval()
    with torch.no_grad():
        x = torch.from_numpy(images)
        f = torch.from_numpy(np.repeat(film[None], len(images), axis=0))
        return unet(x, f)[0].numpy()


def run_batched(sess: Any, images: np.ndarray, film: np.ndarray, batch: int) -> np.ndarray:
    """ONNX Runtime logits of every slice in chunks of ``batch`` (last chunk may be smaller)."""
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        films = np.repeat(film[None], len(chunk), axis=0).astype(np.float32)
        out.append(sess.run(["logits"], {"image": chunk, "film": films})[0])
    return np.concatenate(out)


def compare_graph(
    sess: Any,
    references: dict[str, np.ndarray],
    images: np.ndarray,
    films: dict[str, np.ndarray],
    batch_sizes: Sequence[int],
) -> dict[str, Any]:
    """Max |logit difference| and min Dice agreement of ``sess`` against ``references``.

    Dice is computed per prompt over all slices of the thresholded (logit > 0) masks.
    """
    worst_diff, worst_dice = 0.0, 1.0
    per_prompt: dict[str, dict[str, float]] = {}
    for prompt, film in films.items():
        ref = references[prompt]
        diff_p, dice_p = 0.0, 1.0
        for batch in batch_sizes:
            got = run_batched(sess, images, film, batch)
            if got.shape != ref.shape or not np.all(np.isfinite(got)):
                raise ExportError(
                    f"ONNX Runtime gave logits of shape {got.shape} (finite: "
                    f"{bool(np.all(np.isfinite(got)))}) for {prompt!r} at batch {batch}; "
                    f"expected finite {ref.shape}"
                )
            diff_p = max(diff_p, float(np.max(np.abs(got - ref))))
            dice_p = min(dice_p, dice_agreement(got > 0, ref > 0))
        per_prompt[prompt] = {
            "max_abs_logit_diff": diff_p,
            "dice_agreement": dice_p,
            "foreground_fraction": float((ref > 0).mean()),
        }
        worst_diff, worst_dice = max(worst_diff, diff_p), min(worst_dice, dice_p)
    return {
        "max_abs_logit_diff": worst_diff,
        "dice_agreement_min": worst_dice,
        "batch_sizes": list(batch_sizes),
        "per_prompt": per_prompt,
    }


def verify_graph(
    name: str,
    sess: Any,
    references: dict[str, np.ndarray],
    images: np.ndarray,
    films: dict[str, np.ndarray],
    batch_sizes: Sequence[int] = (1, 4),
    tolerance: Tolerance | None = None,
) -> dict[str, Any]:
    """:func:`compare_graph` plus pass/fail against ``tolerance`` (none: record only).

    Raises:
        ExportError: the graph is outside its tolerance.
    """
    result = compare_graph(sess, references, images, films, batch_sizes)
    if tolerance is not None:
        result["tolerance"] = {
            "max_abs_logit_diff": tolerance.max_abs_logit_diff,
            "dice_agreement_min": tolerance.min_dice,
        }
        if (
            result["max_abs_logit_diff"] > tolerance.max_abs_logit_diff
            or result["dice_agreement_min"] < tolerance.min_dice
        ):
            raise ExportError(
                f"verification of {name} failed: max |logit diff| "
                f"{result['max_abs_logit_diff']:.3g} (limit {tolerance.max_abs_logit_diff:g}), "
                f"Dice agreement {result['dice_agreement_min']:.4f} "
                f"(minimum {tolerance.min_dice:g}) against PyTorch on {len(images)} real slices"
            )
    return result
