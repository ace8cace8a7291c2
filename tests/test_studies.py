"""Studies: statistics, config validation and a real (tiny) end-to-end study through the CLI."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from promptseg.studies.spec import RunSpec, StudyConfig
from promptseg.studies.stats import holm, paired_test, summarize, wilcoxon_floor

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def test_summary_matches_textbook_t_interval():
    x = [0.70, 0.72, 0.69, 0.75, 0.71]
    s = summarize(x)
    half = stats.t.ppf(0.975, 4) * np.std(x, ddof=1) / math.sqrt(5)
    assert s.n == 5 and s.mean == pytest.approx(np.mean(x))
    assert (s.ci_low, s.ci_high) == pytest.approx((s.mean - half, s.mean + half))
    assert 0 < s.shapiro_p <= 1
    assert math.isnan(summarize([0.5]).sd) and math.isnan(summarize([1, 1, 1]).shapiro_p)
    assert summarize([float("nan"), 0.4, 0.6]).n == 2


def test_paired_test_picks_t_for_normal_and_wilcoxon_for_skewed_differences():
    a = [0.70, 0.72, 0.69, 0.75, 0.71, 0.74]
    b = [0.60, 0.65, 0.66, 0.70, 0.69, 0.66]
    t = paired_test(a, b)
    assert t.test == "paired t" and t.p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    skewed_b = [x - d for x, d in zip(a, [0.001, 0.002, 0.001, 0.002, 0.001, 0.5])]
    w = paired_test(a, skewed_b)
    assert w.test == "wilcoxon" and w.p == pytest.approx(
        stats.wilcoxon(np.subtract(a, skewed_b)).pvalue
    )
    assert paired_test(a, a).p == 1.0 and paired_test(a[:2], b[:2]).test == "none"


def test_holm_adjustment_is_monotone_and_bounded():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adj = holm([0.5, float("nan"), 0.9])
    assert adj[0] == pytest.approx(1.0) and math.isnan(adj[1]) and adj[2] == pytest.approx(1.0)
    assert wilcoxon_floor(5) == pytest.approx(0.0625)


def test_run_keys_ignore_the_data_path_but_not_the_loss():
    a = RunSpec("brain", ("brain-tumor",), ("brain-tumor",), ("glioma",), "dice")
    b = RunSpec("brain", ("brain-tumor",), ("brain-tumor",), ("glioma",), "dice", data_root="/x")
    c = RunSpec("brain", ("brain-tumor",), ("brain-tumor",), ("glioma",), "jaccard")
    assert a.key() == b.key() != c.key()


def test_shipped_study_configs_share_the_full_model_runs():
    cfgs = {n: StudyConfig.load(Path("configs/studies") / f"{n}.json") for n in
            ("loss_study", "ablation", "cross_modality")}  # fmt: skip
    keys = {n: {s.key() for _, _, s in c.runs()} for n, c in cfgs.items()}
    assert len(cfgs["loss_study"].seeds) >= 5
    assert len(keys["loss_study"] & keys["ablation"]) == 2 * len(cfgs["ablation"].seeds)
    assert keys["cross_modality"] & keys["loss_study"]


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"kind": "vibes"}, "kind must be"),
        ({"tasks": ["knee"]}, "unknown task"),
        ({"arms": {"x": {"loss": "nope"}}}, "nope"),
        ({"arms": {"x": {"colour": 1}}}, "unknown fields"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_bad_study_configs_are_refused_through_the_cli(tmp_path, patch, message):
    cfg = {"name": "t", "kind": "loss", "out": str(tmp_path / "o"), "arms": {"d": {"loss": "dice"}}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg | patch))
    proc = subprocess.run([sys.executable, "-m", "promptseg.cli", "study", "report", str(path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_tiny_study_end_to_end_on_real_brain_slices(tmp_path):
    cfg = {
        "name": "tiny loss study",
        "kind": "loss",
        "out": str(tmp_path / "study"),
        "tasks": ["brain"],
        "seeds": [0, 1, 2],
        "base": {"widths": [4, 8, 8, 16], "resolution": 32, "steps": 4, "batch": 4},
        "arms": {"dice": {"loss": "dice"}, "jaccard": {"loss": "jaccard"}},
        "claims": [{"text": "Dice is best", "task": "brain", "arm": "dice", "metric": "dice"}],
        "scaled_down": "everything",
    }
    path = tmp_path / "study.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "promptseg.cli", "study", "run", str(path), "--cache",
           str(tmp_path / "cache"), "--data-root", str(DATA), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "study"
    report = (out / "report.md").read_text()
    assert "Dice is best (brain, 3 seeds): **" in report and "Holm" in report
    with open(out / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["arm"], r["seed"]) for r in rows} == {(a, str(s)) for a in ("dice", "jaccard")
                                                     for s in (0, 1, 2)}  # fmt: skip
    assert all(0 <= float(r["dice"]) <= 1 for r in rows)
    with open(out / "comparisons.csv") as fh:
        comps = list(csv.DictReader(fh))
    assert {c["metric"] for c in comps} >= {"dice", "hd95", "kappa"}
    for name in ("violin_brain.png", "seeds_brain.png", "training_brain.png"):
        assert (out / name).stat().st_size > 5000
    meta = json.loads((out / "study.json").read_text())
    assert meta["tasks"]["brain"]["seeds_complete"] == [0, 1, 2]
    # A second run trains nothing new (resumable) and gives the same table.
    before = (out / "summary.csv").read_text()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "0 to run" in proc.stdout
    assert (out / "summary.csv").read_text() == before
