"""Refusal verdicts of the runtime's prompt resolver for the free-form prompts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from promptseg.prompts import FREE_FORM


def refusal_verdicts(prompts: Sequence[str], engine: str | Path | None = None) -> dict:
    """Would the runtime's prompt resolver refuse each prompt? (needs onnxruntime).

    For an accepted prompt the target, cache row and cosine are the ones the resolver uses
    (side words exclude the other side's rows); for a refused one, the nearest row overall.

    Returns:
        ``{"engine", "threshold", "engine_checkpoint_sha256", "calibration_prompts",
        "prompts": {prompt: {refused, resolved_by, similarity, nearest_target,
        nearest_prompt, in_calibration}}}``, or ``{"error": text}`` when the engine cannot be
        opened.
    """
    try:
        from promptseg.runtime.manifest import EngineFolder
        from promptseg.runtime.prompt_resolver import (
            PromptError,
            PromptResolver,
            normalise_prompt,
        )

        folder = EngineFolder.open(engine)
        resolver = PromptResolver(folder, threads=1)
    except Exception as exc:  # noqa: BLE001 - reported in the results, not fatal
        return {"error": " ".join(str(exc).split()) or type(exc).__name__}
    refusal = folder.manifest.get("prompt_refusal", {})
    calibration = {normalise_prompt(p) for p in refusal.get("off_target", [])}
    calibration |= {normalise_prompt(p) for ps in FREE_FORM.values() for p in ps}
    out: dict[str, dict] = {}
    for prompt in prompts:
        try:
            r = resolver.resolve(prompt)
        except PromptError:
            i, sim = resolver.nearest(resolver.embed([prompt])[0])
            verdict = {
                "refused": True,
                "resolved_by": "refused",
                "similarity": sim,
                "nearest_target": resolver.cache.targets[i],
                "nearest_prompt": resolver.cache.prompts[i],
            }
        else:  # what the runtime uses: the side words may pick a farther cache row
            verdict = {
                "refused": False,
                "resolved_by": r.how,
                "similarity": r.similarity,
                "nearest_target": r.target,
                "nearest_prompt": r.nearest,
            }
        out[prompt] = {**verdict, "in_calibration": normalise_prompt(prompt) in calibration}
    return {
        "engine": str(folder.path),
        "engine_manifest_sha256": folder.manifest_sha256,
        "threshold": resolver.threshold,
        "engine_checkpoint_sha256": folder.manifest.get("checkpoint", {}).get("sha256"),
        "calibration_prompts": len(calibration),
        "prompts": out,
    }
