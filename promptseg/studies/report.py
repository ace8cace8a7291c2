"""Collect a study's run results into tables, paired statistics, figures and ``report.md``."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import re
import shutil
from pathlib import Path

from promptseg.studies import plots
from promptseg.studies.runner import METRICS, git_hash
from promptseg.studies.spec import MODALITY, TASKS, StudyConfig
from promptseg.studies.stats import holm, paired_test, summarize, wilcoxon_floor

LOWER_IS_BETTER = {"hd95"}


def collect(cfg: StudyConfig, cache: Path, data_root: str | None = None) -> dict:
    """results[task][arm][seed] = run result dict, for the runs that exist."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for task, arm, spec in cfg.runs(data_root):
        path = cache / "runs" / f"{spec.key()}.json"
        if path.is_file():
            out.setdefault(task, {}).setdefault(arm, {})[spec.seed] = json.loads(path.read_text())
    return out


def complete_seeds(by_arm: dict[str, dict[int, dict]], arms: list[str]) -> list[int]:
    """Seeds for which every arm has a result (paired statistics need all of them)."""
    sets = [set(by_arm.get(a, {})) for a in arms]
    return sorted(set.intersection(*sets)) if sets else []


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "n/a" if not math.isfinite(x) else ("<0.001" if x < 0.001 else f"{x:.3f}")


def _metric(result: dict, metric: str) -> float:
    return result["empty_rate"] if metric == "empty_rate" else result["metrics"][metric]


def _comparisons(values, arms, pairs, metrics):
    """Paired tests for ``pairs`` per metric, Holm-corrected within each metric."""
    rows = []
    for metric in metrics:
        tests = [paired_test(values[a][metric], values[b][metric]) for a, b in pairs]
        for t, adj in zip(tests, holm([t.p for t in tests])):
            t.p_holm = adj
        rows += [(metric, a, b, t) for (a, b), t in zip(pairs, tests)]
    return rows


def write_study(
    cfg: StudyConfig, config_path: Path, cache: Path, data_root: str | None = None
) -> Path:
    """Write tables (CSV, Markdown), figures and report.md into ``cfg.out``; returns it."""
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results = collect(cfg, cache, data_root)
    metrics = list(METRICS) + ["empty_rate"]
    lines = [f"# {cfg.name}", ""]
    meta = {
        "config": json.loads(Path(config_path).read_text()),
        "config_file": str(config_path),
        "report_git": git_hash(),
        "splits_sha256": hashlib.sha256(
            (Path(__file__).parents[1] / "data" / "splits.json").read_bytes()
        ).hexdigest(),
        "tasks": {},
    }
    summary_rows, comparison_rows, run_rows = [], [], []
    claims_text: list[str] = []
    for task in cfg.tasks:
        arms = cfg.arms_for(task)
        by_arm = results.get(task, {})
        seeds = complete_seeds(by_arm, arms)
        done = sum(len(v) for v in by_arm.values())
        total = len(arms) * len(cfg.seeds)
        lines += [f"## Task: {task}", ""]
        runs_used = [by_arm[a][s] for a in arms for s in seeds]
        gits = sorted({r["git"] for r in runs_used})
        seconds = sum(r["train_seconds"] + r["eval_seconds"] for r in runs_used)
        meta["tasks"][task] = {
            "seeds_complete": seeds,
            "runs_done": done,
            "runs_planned": total,
            "compute_seconds": seconds,
            "run_git": gits,
            "runs": {a: {s: by_arm[a][s]["key"] for s in seeds} for a in arms},
        }
        lines.append(
            f"Runs: {done} of {total} done; statistics over the {len(seeds)} seeds that every "
            f"arm completed ({seeds}). Compute: {seconds / 60:.1f} CPU-thread minutes. "
            f"Runs made at git {', '.join(gits) or 'n/a'}."
        )
        lines.append("")
        if len(seeds) < 1:
            lines += ["No complete seed yet: no statistics.", ""]
            continue
        for a in arms:
            for s in seeds:
                r = by_arm[a][s]
                arm_slug = re.sub(r"[^A-Za-z0-9]+", "_", a.replace("+", "plus")).strip("_")
                name = f"{task}_{arm_slug}_seed{s}.json"
                shutil.copyfile(cache / "runs" / f"{r['key']}.json", out / "runs" / name)
                run_rows.append(
                    {"task": task, "arm": a, "seed": s, "key": r["key"]}
                    | {m: _metric(r, m) for m in metrics}
                )
        values = {a: {m: [_metric(by_arm[a][s], m) for s in seeds] for m in metrics} for a in arms}
        # Summary table
        head = "| arm | " + " | ".join(plots.LABELS.get(m, m) for m in metrics) + " |"
        lines += [
            "Mean ± sd over seeds (95% confidence interval below each):",
            "",
            head,
            "|" + "---|" * (len(metrics) + 1),
        ]
        for a in arms:
            cells = []
            for m in metrics:
                s = summarize(values[a][m])
                summary_rows.append({"task": task, "arm": a, "metric": m} | vars(s))
                cells.append(
                    f"{_fmt(s.mean)} ± {_fmt(s.sd)}<br>[{_fmt(s.ci_low)}, {_fmt(s.ci_high)}]"
                )
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines += ["", "Shapiro-Wilk p per arm and metric (normality of the per-seed values):", ""]
        lines += [head, "|" + "---|" * (len(metrics) + 1)]
        for a in arms:
            cells = [_p(summarize(values[a][m]).shapiro_p) for m in metrics]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
        # Paired comparisons
        if cfg.kind == "ablation":
            pairs = list(zip(arms[1:], arms[:-1]))  # each step against the previous one
            family = "each arm against the previous one"
        else:
            pairs = list(itertools.combinations(arms, 2))
            family = "all pairs of arms"
        comps = _comparisons(values, arms, pairs, metrics)
        for metric, a, b, t in comps:
            comparison_rows.append(
                {"task": task, "metric": metric, "a": a, "b": b} | vars(t) | {"n_seeds": t.n}
            )
        lines += [
            f"Paired comparisons on Dice ({family}; paired t-test when the per-seed differences "
            "pass Shapiro-Wilk at 0.05, else Wilcoxon signed-rank; Holm-corrected within the "
            "metric). All metrics: comparisons.csv.",
            "",
            "| a | b | mean(a − b) | test | p | p (Holm) |",
            "|---|---|---|---|---|---|",
        ]
        for metric, a, b, t in comps:
            if metric == "dice":
                lines.append(
                    f"| {a} | {b} | {_fmt(t.mean_diff, 4)} | {t.test} | {_p(t.p)} | "
                    f"{_p(t.p_holm)} |"
                )
        lines += [
            "",
            f"With {len(seeds)} seeds the smallest possible Wilcoxon p is "
            f"{_p(wilcoxon_floor(len(seeds)))}.",
            "",
        ]
        lines += _target_table(by_arm, arms, seeds)
        if cfg.kind == "cross-modality":
            lines += _cross_table(by_arm, arms, seeds)
        # Figures
        plots.violins(
            values, metrics, f"{cfg.name}: {task} ({len(seeds)} seeds)", out / f"violin_{task}.png"
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
        lines += [
            f"![violins](violin_{task}.png) ![per seed](seeds_{task}.png)",
            f"![training](training_{task}.png)",
            "",
        ]
        claims_text += _claims(cfg, task, values, comps, seeds)
    if cfg.claims:
        lines[2:2] = ["## The paper's claims on our data", "", *claims_text, ""]
    lines += [
        "## What was scaled down",
        "",
        cfg.scaled_down,
        "",
        "## Reproduce",
        "",
        f"`promptseg study run {config_path}` (add `--workers 2` on two cores) trains the "
        f"missing runs and rewrites this folder; `promptseg study report {config_path}` "
        "rewrites it from finished runs. Per-run results: runs/*.json (config, loss curve, "
        "per-target and per-dataset metrics, seconds, git hash).",
        "",
    ]
    _write_csv(out / "runs.csv", run_rows)
    _write_csv(out / "summary.csv", summary_rows)
    _write_csv(out / "comparisons.csv", comparison_rows)
    _write_text(out / "study.json", json.dumps(meta, indent=1, default=str) + "\n")
    _write_text(out / "report.md", "\n".join(lines))
    return out


def _claims(cfg, task, values, comps, seeds) -> list[str]:
    out = []
    for claim in cfg.claims:
        metric = claim.get("metric", "dice")
        sign = -1 if metric in LOWER_IS_BETTER else 1
        if claim.get("task") == task:  # "arm X is the best on this task"
            arm = claim["arm"]
            means = {a: sign * summarize(v[metric]).mean for a, v in values.items()}
            best = max(means, key=means.get)
            rel = [t for m, a, b, t in comps if m == metric and arm in (a, b)]
            wins = [
                t
                for m, a, b, t in comps
                if m == metric
                and arm in (a, b)
                and (t.mean_diff * sign > 0) == (a == arm)
                and t.p_holm < 0.05
            ]
            if best == arm:
                verdict = (
                    "**holds** (best mean, and significantly better than every other arm)"
                    if len(wins) == len(rel)
                    else f"**holds in the means only**: best mean {metric}, but significantly "
                    f"better than {len(wins)} of {len(rel)} other arms after Holm correction"
                )
            else:
                verdict = (
                    f"**does not hold**: {best} has the best mean {metric} "
                    f"({_fmt(sign * means[best])} vs {_fmt(sign * means[arm])} for {arm})"
                )
            out.append(f"- {claim['text']} ({task}, {len(seeds)} seeds): {verdict}.")
        elif "better" in claim:
            t = next(
                (
                    t
                    for m, a, b, t in comps
                    if m == metric and a == claim["better"] and b == claim["worse"]
                ),
                None,
            )
            if t is None:
                continue
            if sign * t.mean_diff > 0 and t.p_holm < 0.05:
                verdict = "**holds**"
            elif sign * t.mean_diff > 0:
                verdict = "**not shown**: better in the mean, not significant"
            else:
                verdict = "**does not hold**: worse or equal in the mean"
            out.append(
                f"- {claim['text']} ({task}, {len(seeds)} seeds): {verdict} "
                f"(mean {metric} difference {_fmt(t.mean_diff, 4)}, {t.test}, "
                f"p {_p(t.p)}, Holm {_p(t.p_holm)})."
            )
    return out


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
    if not rows:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
