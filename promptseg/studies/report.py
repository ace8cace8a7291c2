"""Collect a study's run results into tables, statistics, figures and ``report.md``."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from promptseg.studies import plots
from promptseg.studies.runner import git_hash, result_path, write_atomic
from promptseg.studies.spec import METRICS, MODALITY, TASKS, StudyConfig
from promptseg.studies.stats import (
    Paired,
    holm,
    mannwhitney_floor,
    paired_test,
    summarize,
    unpaired_test,
    wilcoxon_floor,
)

LOWER_IS_BETTER = {"hd95"}
FIGURES = ("violin", "seeds", "training")
ALL_METRICS = [*METRICS, "empty_rate"]
Comparison = tuple[str, str, str, Paired]  # (metric, a, b, test of a - b)


def collect(cfg: StudyConfig, cache: Path) -> dict:
    """results[task][arm][seed] = run result dict, for the runs that exist."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for task, arm, spec in cfg.runs():
        path = result_path(cache, spec)
        if path.is_file():
            out.setdefault(task, {}).setdefault(arm, {})[spec.seed] = json.loads(path.read_text())
    return out


def complete_seeds(by_arm: dict[str, dict[int, dict]], arms: list[str]) -> list[int]:
    """Seeds for which every arm has a result (paired statistics need all of them)."""
    sets = [set(by_arm.get(a, {})) for a in arms]
    return sorted(set.intersection(*sets)) if sets else []


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "n/a" if not math.isfinite(x) else ("<0.001" if x < 0.001 else f"{x:.3f}")


def _metric(result: dict, metric: str) -> float:
    return result["empty_rate"] if metric == "empty_rate" else result["metrics"][metric]


def _device(result: dict) -> str:
    """The device a run trained on (runs from before ``--device`` trained on the CPU)."""
    return result.get("device", "cpu")


def _test_fn(cfg: StudyConfig) -> Callable[[list[float], list[float]], Paired]:
    return paired_test if cfg.paired else unpaired_test


def _comparisons(values: dict, pairs: list[tuple[str, str]], metrics: list[str], test) -> list:
    """Tests of a - b for ``pairs`` per metric, Holm-corrected within each metric."""
    rows: list[Comparison] = []
    for metric in metrics:
        tests = [test(values[a][metric], values[b][metric]) for a, b in pairs]
        for t, adj in zip(tests, holm([t.p for t in tests])):
            t.p_holm = adj
        rows += [(metric, a, b, t) for (a, b), t in zip(pairs, tests)]
    return rows


def _pairs(cfg: StudyConfig, arms: list[str]) -> tuple[list[tuple[str, str]], str]:
    if cfg.kind == "ablation":  # each step against the previous one
        return list(zip(arms[1:], arms[:-1])), "each arm against the previous one"
    return list(itertools.combinations(arms, 2)), "all pairs of arms"


@dataclass
class _Report:
    """What write_study accumulates over the tasks."""

    out: Path
    lines: list[str] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)
    tables: dict[str, list[dict]] = field(
        default_factory=lambda: {"runs": [], "summary": [], "comparisons": []}
    )
    written: set[Path] = field(default_factory=set)
    used: list[dict] = field(default_factory=list)  # run results in the statistics


def write_study(cfg: StudyConfig, config_path: Path, cache: Path) -> Path:
    """Write tables (CSV, Markdown), figures and report.md into ``cfg.out``; returns it.

    Files of an earlier report that this one no longer has (run copies, figures, empty
    tables) are removed, so the folder never mixes two reports.
    """
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results = collect(cfg, cache)
    rep = _Report(out)
    meta: dict = {
        "config": json.loads(Path(config_path).read_text()),
        "config_file": str(config_path),
        "report_git": git_hash(),
        "tasks": {},
    }
    for task in cfg.tasks:
        _task_section(cfg, task, results.get(task, {}), cache, rep, meta)
    prov = _provenance(results)
    meta |= {"splits_sha256": prov["splits"], "provenance": prov}
    lines = [f"# {cfg.name}", ""]
    if cfg.claims:
        lines += ["## The paper's claims on our data", "", *rep.claims, ""]
    lines += rep.lines + _provenance_lines(prov)
    lines += ["## What was scaled down", "", cfg.scaled_down, ""]
    lines += _reproduce_lines(config_path, rep.used)
    for name, rows in rep.tables.items():
        _write_csv(out / f"{name}.csv", rows)
    write_atomic(out / "study.json", json.dumps(meta, indent=1, default=str) + "\n")
    write_atomic(out / "report.md", "\n".join(lines))
    _remove_stale(out, rep.written)
    return out


def _task_section(
    cfg: StudyConfig, task: str, by_arm: dict, cache: Path, rep: _Report, meta: dict
) -> None:
    arms = cfg.arms_for(task)
    seeds = complete_seeds(by_arm, arms)
    used = [by_arm[a][s] for a in arms for s in seeds]
    rep.used += used
    done = sum(len(v) for a, v in by_arm.items() if a in arms)
    total = len(arms) * len(cfg.seeds)
    gits = sorted({r["git"] for r in used})
    meta["tasks"][task] = {
        "seeds_complete": seeds,
        "runs_done": done,
        "runs_planned": total,
        "compute_seconds": sum(r["train_seconds"] + r["eval_seconds"] for r in used),
        "compute_devices": sorted({_device(r) for r in used}),
        "run_git": gits,
        "runs": {a: {s: by_arm[a][s]["key"] for s in seeds} for a in arms},
    }
    rep.lines += [
        f"## Task: {task}",
        "",
        f"Runs: {done} of {total} done; statistics over the {len(seeds)} seeds that every "
        f"arm completed ({seeds}). Compute: {_compute_text(used)}. "
        f"Runs made at git {', '.join(gits) or 'n/a'}.",
        "",
    ]
    if not seeds:
        rep.lines += ["No complete seed yet: no statistics.", ""]
        return
    _copy_runs(task, arms, seeds, by_arm, cache, rep)
    values = {a: {m: [_metric(by_arm[a][s], m) for s in seeds] for m in ALL_METRICS} for a in arms}
    _summary_lines(task, arms, values, rep)
    comps = _comparison_lines(cfg, task, arms, values, len(seeds), rep)
    rep.lines += _target_table(by_arm, arms, seeds)
    if cfg.kind == "cross-modality":
        rep.lines += _cross_table(by_arm, arms, seeds)
    _figures(cfg, task, arms, seeds, by_arm, values, rep)
    rep.claims += _claims(cfg, task, values, comps, seeds)


def _compute_text(runs: list[dict]) -> str:
    """Training + evaluation time per recorded device."""
    minutes: Counter[str] = Counter()
    for r in runs:
        minutes[_device(r)] += (r["train_seconds"] + r["eval_seconds"]) / 60
    if not minutes:
        return "none"
    parts = [
        f"{m:.1f} CPU-thread minutes" if dev == "cpu" else f"{m:.1f} minutes on {dev}"
        for dev, m in sorted(minutes.items())
    ]
    return " + ".join(parts)


def _copy_runs(task, arms, seeds, by_arm, cache: Path, rep: _Report) -> None:
    """Copy each used run's JSON under a readable name; one row per run for runs.csv."""
    for a in arms:
        arm_slug = re.sub(r"[^A-Za-z0-9]+", "_", a.replace("+", "plus")).strip("_")
        for s in seeds:
            r = by_arm[a][s]
            dst = rep.out / "runs" / f"{task}_{arm_slug}_seed{s}.json"
            write_atomic(dst, (cache / "runs" / f"{r['key']}.json").read_bytes())
            rep.written.add(dst)
            rep.tables["runs"].append(
                {"task": task, "arm": a, "seed": s, "key": r["key"]}
                | {m: _metric(r, m) for m in ALL_METRICS}
            )


def _summary_lines(task: str, arms: list[str], values: dict, rep: _Report) -> None:
    head = "| arm | " + " | ".join(plots.LABELS.get(m, m) for m in ALL_METRICS) + " |"
    rule = "|" + "---|" * (len(ALL_METRICS) + 1)
    rep.lines += ["Mean ± sd over seeds (95% confidence interval below each):", "", head, rule]
    for a in arms:
        cells = []
        for m in ALL_METRICS:
            s = summarize(values[a][m])
            rep.tables["summary"].append({"task": task, "arm": a, "metric": m} | vars(s))
            cells.append(f"{_fmt(s.mean)} ± {_fmt(s.sd)}<br>[{_fmt(s.ci_low)}, {_fmt(s.ci_high)}]")
        rep.lines.append(f"| {a} | " + " | ".join(cells) + " |")
    rep.lines += ["", "Shapiro-Wilk p per arm and metric (normality of the per-seed values):", ""]
    rep.lines += [head, rule]
    for a in arms:
        cells = [_p(summarize(values[a][m]).shapiro_p) for m in ALL_METRICS]
        rep.lines.append(f"| {a} | " + " | ".join(cells) + " |")
    rep.lines.append("")


def _comparison_lines(cfg, task, arms, values, n_seeds: int, rep: _Report) -> list[Comparison]:
    pairs, family = _pairs(cfg, arms)
    comps = _comparisons(values, pairs, ALL_METRICS, _test_fn(cfg))
    for metric, a, b, t in comps:
        rep.tables["comparisons"].append(
            {"task": task, "metric": metric, "a": a, "b": b} | vars(t) | {"n_seeds": t.n}
        )
    if cfg.paired:
        how = (
            "paired by seed; paired t-test when the per-seed differences pass Shapiro-Wilk at "
            "0.05, else Wilcoxon signed-rank; n: pairs the test used (Wilcoxon drops zero "
            "differences)"
        )
        floor = f"the smallest possible Wilcoxon p is {_p(wilcoxon_floor(n_seeds))}"
    else:
        how = (
            "unpaired (\"paired\": false); Welch's t-test when both arms' per-seed values pass "
            "Shapiro-Wilk at 0.05, else Mann-Whitney U; n: values of both arms together"
        )
        floor = f"the smallest possible Mann-Whitney p is {_p(mannwhitney_floor(n_seeds, n_seeds))}"
    rep.lines += [
        f"Comparisons on Dice ({family}; {how}; Holm-corrected within the metric). "
        "All metrics: comparisons.csv.",
        "",
        *_pairing_note(cfg, task),
        "| a | b | mean(a − b) | test | n | p | p (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for metric, a, b, t in comps:
        if metric == "dice":
            rep.lines.append(
                f"| {a} | {b} | {_fmt(t.mean_diff, 4)} | {t.test} | {t.n_effective} | "
                f"{_p(t.p)} | {_p(t.p_holm)} |"
            )
    rep.lines += ["", f"With {n_seeds} seeds {floor}.", ""]
    return comps


def _pairing_note(cfg: StudyConfig, task: str) -> list[str]:
    """Say so when seeds are paired across arms that train on different data."""
    train_sets = {s.train_datasets for t, _, s in cfg.runs() if t == task}
    if not cfg.paired or len(train_sets) < 2:
        return []
    return [
        "Pairing: these arms train on different data sets, so a seed pairs only the initial "
        "weights and the augmentation random stream across arms, not the training samples or "
        "their order. The paired tests stay valid, but the pairing is weaker than in a study "
        'whose arms share the data; set "paired": false in the config for unpaired tests '
        "(Welch's t / Mann-Whitney U).",
        "",
    ]


def _figures(cfg, task, arms, seeds, by_arm, values, rep: _Report) -> None:
    out = rep.out
    plots.violins(
        values, ALL_METRICS, f"{cfg.name}: {task} ({len(seeds)} seeds)", out / f"violin_{task}.png"
    )
    plots.seed_steps(
        {a: {s: values[a]["dice"][i] for i, s in enumerate(seeds)} for a in arms},
        "dice",
        f"{cfg.name}: {task}, validation Dice per seed",
        out / f"seeds_{task}.png",
    )
    plots.training_curves(
        {a: [by_arm[a][s]["loss_curve"] for s in seeds] for a in arms},
        f"{cfg.name}: {task}, training loss per seed",
        out / f"training_{task}.png",
    )
    rep.written |= {out / f"{kind}_{task}.png" for kind in FIGURES}
    rep.lines += [
        f"![violins](violin_{task}.png) ![per seed](seeds_{task}.png)",
        f"![training](training_{task}.png)",
        "",
    ]


# ----------------------------------------------------------------------------- claims


def _claims(cfg, task, values, comps, seeds) -> list[str]:
    out = []
    for claim in cfg.claims:
        if "better" in claim:
            if claim.get("task", task) == task:
                out.append(_pair_claim(claim, task, values, comps, len(seeds)))
        elif claim["task"] == task:
            out.append(_best_claim(claim, task, values, _test_fn(cfg), len(seeds)))
    return out


def _pair_claim(claim: dict, task: str, values: dict, comps: list, n_seeds: int) -> str:
    """ "better beats worse": the comparison in either orientation, else "not tested"."""
    metric = claim.get("metric", "dice")
    better, worse = claim["better"], claim["worse"]
    head = f"- {claim['text']} ({task}, {n_seeds} seeds)"
    if better not in values or worse not in values:
        return f"{head}: not tested (arm not in this task)."
    found = [
        (t, 1 if a == better else -1)
        for m, a, b, t in comps
        if m == metric and {a, b} == {better, worse}
    ]
    if not found:
        return f"{head}: not tested (pair not compared)."
    t, orient = found[0]
    diff = orient * t.mean_diff  # mean(better - worse)
    sign = -1 if metric in LOWER_IS_BETTER else 1
    if sign * diff > 0 and t.p_holm < 0.05:
        verdict = "**holds**"
    elif sign * diff > 0:
        verdict = "**not shown**: better in the mean, not significant"
    else:
        verdict = "**does not hold**: worse or equal in the mean"
    return (
        f"{head}: {verdict} (mean {metric} difference {better} − {worse} {_fmt(diff, 4)}, "
        f"{t.test}, p {_p(t.p)}, Holm {_p(t.p_holm)} over the study's {metric} comparisons)."
    )


def _best_claim(claim: dict, task: str, values: dict, test, n_seeds: int) -> str:
    """ "arm is the best": best mean, and better than each other arm; Holm over those tests."""
    metric, arm = claim.get("metric", "dice"), claim["arm"]
    sign = -1 if metric in LOWER_IS_BETTER else 1
    means = {a: sign * summarize(v[metric]).mean for a, v in values.items()}
    best = max(means, key=lambda a: means[a] if math.isfinite(means[a]) else -math.inf)
    others = [a for a in values if a != arm]
    tests = [test(values[arm][metric], values[o][metric]) for o in others]
    adjusted = holm([t.p for t in tests])
    wins = sum(sign * t.mean_diff > 0 and p < 0.05 for t, p in zip(tests, adjusted))
    family = f"Holm over the {len(others)} comparisons of {arm} with each other arm on {metric}"
    if best != arm:
        verdict = (
            f"**does not hold**: {best} has the best mean {metric} "
            f"({_fmt(sign * means[best])} vs {_fmt(sign * means[arm])} for {arm})"
        )
    elif wins == len(others):
        verdict = f"**holds** (best mean, and significantly better than every other arm; {family})"
    else:
        verdict = (
            f"**holds in the means only**: best mean {metric}, but significantly better than "
            f"{wins} of {len(others)} other arms ({family})"
        )
    return f"- {claim['text']} ({task}, {n_seeds} seeds): {verdict}."


# ----------------------------------------------------------------------------- provenance


def _provenance(results: dict) -> dict:
    """What the runs recorded about their conditions (fingerprints, devices)."""
    runs = [
        (task, arm, seed, r)
        for task, by_arm in results.items()
        for arm, by_seed in by_arm.items()
        for seed, r in sorted(by_seed.items())
    ]
    fps = [r["fingerprint"] for *_, r in runs if "fingerprint" in r]
    return {
        "runs": len(runs),
        "devices": dict(Counter(_device(r) for *_, r in runs)),
        "splits": sorted({fp["splits_sha256"] for fp in fps}),
        "encoders": _distinct(fp["encoder"] for fp in fps),
        "preprocessing": _distinct(fp["preprocessing"] for fp in fps),
        "without_fingerprint": [
            f"{task}/{arm}/seed {seed} ({r['key']})"
            for task, arm, seed, r in runs
            if "fingerprint" not in r
        ],
    }


def _distinct(dicts) -> list[dict]:
    seen: dict[str, dict] = {}
    for d in dicts:
        seen.setdefault(json.dumps(d, sort_keys=True), d)
    return list(seen.values())


def _provenance_lines(prov: dict) -> list[str]:
    """What the runs recorded about their conditions; disagreements are flagged in bold."""
    n, legacy, splits = prov["runs"], prov["without_fingerprint"], prov["splits"]
    if not n:
        return ["## Provenance", "", "No finished runs.", ""]
    if len(splits) == 1:
        items = [f"Splits (sha256 of datasets.load_splits()) recorded by the runs: {splits[0]}."]
    elif not splits:
        items = ["No run records its splits hash (all predate run fingerprints)."]
    else:
        items = [
            f"**The runs disagree on the splits**: {len(splits)} different splits hashes "
            f"recorded ({', '.join(h[:12] for h in splits)}); see study.json."
        ]
    for key, what in (("encoders", "text encoder"), ("preprocessing", "preprocessing")):
        if len(prov[key]) > 1:
            items.append(
                f"**The runs disagree on the {what}** ({len(prov[key])} variants; see study.json)."
            )
    devices = ", ".join(f"{d} ({k} runs)" for d, k in sorted(prov["devices"].items()))
    items.append(f"Devices recorded: {devices}.")
    if legacy:
        which = "all of them" if len(legacy) == n else ", ".join(legacy)
        items.append(
            f"{len(legacy)} of {n} runs predate run fingerprints (no record of splits, "
            f"preprocessing or text encoder; trained on the CPU unless a device is recorded): "
            f"{which}."
        )
    return ["## Provenance", "", *(f"- {item}" for item in items), ""]


def _reproduce_lines(config_path: Path, runs: list[dict]) -> list[str]:
    devices = sorted({_device(r) for r in runs})
    accelerators = [d for d in devices if d != "cpu"]
    if not accelerators:
        how = f"`promptseg study run {config_path}` (add `--workers 2` on two cores)"
    else:
        how = (
            f"`promptseg study run {config_path} --device {accelerators[0]}` (these runs were "
            f"trained on {', '.join(devices)}; a finished run recorded on another device than "
            "the one asked for is trained again)"
        )
    return [
        "## Reproduce",
        "",
        f"{how} trains the missing runs and rewrites this folder; `promptseg study report "
        f"{config_path}` rewrites it from finished runs. Per-run results: runs/*.json (config, "
        "loss curve, per-target and per-dataset metrics, seconds, git hash, device and a "
        "fingerprint of splits, preprocessing and text encoder).",
        "",
    ]


def _target_table(by_arm, arms, seeds) -> list[str]:
    """Dice per target (pooled test sets) for each arm, mean ± sd over seeds."""
    targets = sorted({t for a in arms for s in seeds for t in by_arm[a][s]["per_target"]})
    lines = ["Dice per target (mean ± sd over seeds):", ""]
    lines += ["| arm | " + " | ".join(targets) + " |", "|" + "---|" * (len(targets) + 1)]
    for a in arms:
        cells = []
        for t in targets:
            v = [by_arm[a][s]["per_target"].get(t, {}).get("dice", math.nan) for s in seeds]
            s_ = summarize(v)
            cells.append(f"{_fmt(s_.mean)} ± {_fmt(s_.sd)}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines + [""]


def _cross_table(by_arm, arms, seeds) -> list[str]:
    """Dice per organ per test dataset for each training set (mean ± sd over seeds)."""
    lines = ["Dice per organ and test set (mean ± sd over seeds, model resolution):", ""]
    datasets = sorted({d for a in arms for r in by_arm[a].values() for d in r["per_dataset"]})
    organs = TASKS["abdomen"]["targets"]
    head = "| trained on | tested on | " + " | ".join(organs) + " | mean |"
    lines += [head, "|" + "---|" * (len(organs) + 3)]
    for a in arms:
        for d in datasets:
            cells, means = [], []
            for organ in organs:
                v = [by_arm[a][s]["per_dataset"].get(d, {}).get(organ, {}) for s in seeds]
                s_ = summarize([x.get("dice", math.nan) for x in v])
                cells.append(f"{_fmt(s_.mean)} ± {_fmt(s_.sd)}")
                means.append(s_.mean)
            mean = sum(means) / len(means)
            lines.append(
                f"| {a} | {d} ({MODALITY[d]}) | " + " | ".join(cells) + f" | {_fmt(mean)} |"
            )
    return lines + [""]


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Write rows (header from the first); no rows: remove any earlier file of that name."""
    if not rows:
        path.unlink(missing_ok=True)
        return
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue())


def _remove_stale(out: Path, written: set[Path]) -> None:
    """Remove run copies and figures of earlier reports that this one did not write."""
    old = list((out / "runs").glob("*.json"))
    old += [p for kind in FIGURES for p in out.glob(f"{kind}_*.png")]
    for path in old:
        if path not in written:
            path.unlink()
