"""The results dict of ``promptseg robustness`` from what :class:`_Tally` gathered."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from promptseg.checkpoint import LoadedCheckpoint
from promptseg.robustness.phrasings import heldout_kind, known_phrasing
from promptseg.robustness.tally import KIDNEYS, SETS, _mean, _sd, _Tally, kidney_confusion_row


def summarise(tally: _Tally, loaded: LoadedCheckpoint, verdicts: dict) -> dict:
    """The results dict (without ``meta``) from the gathered rows and counts."""
    targets = loaded.vocabulary.targets
    rows = [r for r in tally.rows if r["set"] in SETS]
    sets = prompt_sets(rows, targets)
    per_phrasing = phrasing_means(rows, loaded)
    wrong = wrong_target(tally.absent)
    kidney = {
        ds: {t: kidney_confusion_row(tally.kidney[ds][t]) for t in KIDNEYS if t in tally.kidney[ds]}
        for ds in tally.kidney
    }
    vmap = verdicts.get("prompts", {})
    return {
        "prompt_sets": sets,
        "prompt_sets_overall": sets_overall(sets),
        "per_phrasing": per_phrasing,
        "heldout_by_kind": heldout_by_kind(rows, per_phrasing),
        "wrong_target": {**wrong, "pooled": pooled_wrong_target(wrong)},
        "kidney_confusion": kidney,
        "free_form": {
            "targeted": free_form_targeted(tally, loaded, sets, vmap),
            "off_topic": free_form_off_topic(tally, loaded, vmap),
            "refusal_engine": {k: v for k, v in verdicts.items() if k != "prompts"},
        },
    }


def _set_entry(sel: list[dict], s: str, canon: dict[str, float]) -> dict:
    """Dice of one prompt set on one (dataset, target), and its paired difference to canonical."""
    dice = [r["dice"] for r in sel if r["set"] == s]
    per_case: dict[str, list[float]] = {}
    for r in sel:
        if r["set"] == s:
            per_case.setdefault(r["case"], []).append(r["dice"])
    deltas = [np.mean(v) - canon[c] for c, v in per_case.items() if c in canon]
    return {
        "dice_mean": _mean(dice),
        "dice_sd": _sd(dice),
        "n": len(dice),
        "cases": len(per_case),
        "phrasings": len({r["prompt"] for r in sel if r["set"] == s}),
        "delta_vs_canonical": _mean(deltas) if s != "canonical" else None,
    }


def prompt_sets(rows: list[dict], targets: Sequence[str]) -> dict[str, dict]:
    """dataset -> target -> set -> Dice summary (measurement 1)."""
    sets: dict[str, dict] = {}
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        for target in targets:
            sel = [r for r in rows if r["dataset"] == ds and r["target"] == target]
            if not sel:
                continue
            canon = {r["case"]: r["dice"] for r in sel if r["set"] == "canonical"}
            sets.setdefault(ds, {})[target] = {s: _set_entry(sel, s, canon) for s in SETS}
    return sets


def sets_overall(sets: dict[str, dict]) -> dict[str, dict]:
    """Per set: the mean over (dataset, target) of the mean Dice."""
    overall = {}
    for s in SETS:
        means = [e[s]["dice_mean"] for d in sets.values() for e in d.values()]
        means = [m for m in means if m is not None]
        overall[s] = {"mean_of_target_means": _mean(means), "targets": len(means)}
    return overall


def phrasing_means(rows: list[dict], loaded: LoadedCheckpoint) -> dict[str, dict]:
    """set (train, heldout) -> target -> phrasing -> mean Dice, n (and what is new)."""
    per_phrasing: dict[str, dict] = {}
    for s in ("train", "heldout"):
        for target in loaded.vocabulary.targets:
            sel = [r for r in rows if r["set"] == s and r["target"] == target]
            by: dict[str, list[float]] = {}
            for r in sel:
                by.setdefault(r["prompt"], []).append(r["dice"])
            if by:
                per_phrasing.setdefault(s, {})[target] = {
                    p: {
                        "dice_mean": float(np.mean(v)),
                        "n": len(v),
                        **({"new": heldout_kind(loaded, target, p)} if s == "heldout" else {}),
                    }
                    for p, v in sorted(by.items())
                }
    return per_phrasing


def heldout_by_kind(rows: list[dict], per_phrasing: dict[str, dict]) -> dict[str, dict]:
    """target -> what is new (synonym, template, both) -> mean Dice, n of held-out phrasings."""
    by_kind: dict[str, dict] = {}
    for target, phr in per_phrasing.get("heldout", {}).items():
        for prompt, e in phr.items():
            d = by_kind.setdefault(target, {}).setdefault(e["new"], [])
            d += [r["dice"] for r in rows if r["set"] == "heldout" and r["prompt"] == prompt]
    return {
        t: {k: {"dice_mean": _mean(v), "n": len(v)} for k, v in sorted(d.items())}
        for t, d in by_kind.items()
    }


def wrong_target(absent: dict[tuple[str, str, str], list]) -> dict[str, dict]:
    """domain (same, cross) -> target -> dataset -> empty rate, n, mean predicted fraction."""
    wrong: dict[str, dict] = {"same": {}, "cross": {}}
    for (ds, target, domain), (empty, n, frac) in sorted(absent.items()):
        if n:
            wrong[domain].setdefault(target, {})[ds] = {
                "empty_rate": empty / n,
                "n": n,
                "mean_predicted_fraction": frac / n,
            }
    return wrong


def _pooled_rate(entries: Sequence[dict]) -> tuple[float, int]:
    """Sum of empty slices and of slices over entries with ``empty_rate`` and ``n``."""
    empty = sum(v["empty_rate"] * v["n"] for v in entries)
    return empty, sum(v["n"] for v in entries)


def pooled_wrong_target(wrong: dict[str, dict]) -> dict[str, dict]:
    """Per domain: the empty rate pooled over datasets per target and over all targets."""
    pooled = {}
    for domain in ("same", "cross"):
        per_target = {}
        for target, by_ds in wrong[domain].items():
            e, n = _pooled_rate(list(by_ds.values()))
            per_target[target] = {"empty_rate": e / n, "n": n}
        all_e, all_n = _pooled_rate(list(per_target.values()))
        pooled[domain] = {
            "by_target": per_target,
            "empty_rate": all_e / all_n if all_n else None,
            "n": all_n,
        }
    return pooled


def free_form_targeted(
    tally: _Tally, loaded: LoadedCheckpoint, sets: dict[str, dict], vmap: dict
) -> list[dict]:
    """One entry per targeted free-form prompt: Dice per dataset beside the canonical prompt's."""
    targeted = []
    for i, (prompt, target) in enumerate(tally.free_form.targeted):
        sel = [r for r in tally.rows if r["set"] == "free-form" and r["prompt"] == prompt]
        sel = [r for r in sel if r["target"] == target]
        by_ds = {}
        for ds in dict.fromkeys(r["dataset"] for r in sel):
            d = [r["dice"] for r in sel if r["dataset"] == ds]
            canon = sets.get(ds, {}).get(target, {}).get("canonical", {}).get("dice_mean")
            by_ds[ds] = {"dice_mean": _mean(d), "n": len(d), "canonical_dice_mean": canon}
        targeted.append(
            {
                "index": i,
                "prompt": prompt,
                "target": target,
                "dice": by_ds,
                "known_phrasing": known_phrasing(loaded.vocabulary, prompt),
                "refusal": vmap.get(prompt),
            }
        )
    return targeted


def free_form_off_topic(tally: _Tally, loaded: LoadedCheckpoint, vmap: dict) -> list[dict]:
    """One entry per off-topic prompt: the per-slice empty rate, pooled and per dataset."""
    off_topic = []
    for i, prompt in enumerate(tally.free_form.off_topic):
        by_ds = {
            ds: {"empty_rate": e / n, "n": n}
            for (j, ds), (e, n) in tally.off.items()
            if j == i and n
        }
        e, n = _pooled_rate(list(by_ds.values()))
        off_topic.append(
            {
                "index": i,
                "prompt": prompt,
                "empty_rate": e / n if n else None,
                "n": n,
                "by_dataset": by_ds,
                "known_phrasing": known_phrasing(loaded.vocabulary, prompt),
                "refusal": vmap.get(prompt),
            }
        )
    return off_topic
