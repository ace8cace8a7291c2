"""Studies: statistics, config validation and a real (tiny) end-to-end study through the CLI."""

from __future__ import annotations

import csv
import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from promptseg.studies import runner
from promptseg.studies.report import write_study
from promptseg.studies.spec import METRICS, RunSpec, StudyConfig
from promptseg.studies.stats import (
    holm,
    mannwhitney_floor,
    paired_test,
    summarize,
    unpaired_test,
    wilcoxon_floor,
)

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


def test_run_key_of_an_existing_result_is_unchanged():
    # The committed study results (results/experiments/*) are keyed by this hash.
    spec = RunSpec(
        "abdomen", ("chaos-mr", "btcv-ct"), ("chaos-mr", "btcv-ct"),
        ("liver", "spleen", "left kidney", "right kidney"), "jaccard", cbam=False, neg_ratio=0.0,
    )  # fmt: skip
    assert spec.key() == "007acdcad5474d85"


def _base_config(tmp_path: Path) -> dict:
    return {
        "name": "t",
        "kind": "loss",
        "out": str(tmp_path / "o"),
        "tasks": ["brain"],
        "seeds": [0, 1],
        "arms": {"d": {"loss": "dice"}, "j": {"loss": "jaccard"}},
    }


def _without(key: str):
    return lambda c: {k: v for k, v in c.items() if k != key}


def _with(**values):
    return lambda c: c | values


def _arm(**values):
    return lambda c: c | {"arms": {"d": {"loss": "dice"}, "j": {"loss": "jaccard", **values}}}


BAD_CONFIGS = {
    "missing out": (_without("out"), "missing required keys ['out']"),
    "top level list": (lambda c: [c], "top level must be a JSON object"),
    "seeds not a list": (_with(seeds=3), "'seeds' must be"),
    "widths not a list": (_with(base={"widths": 5}), "'widths' must be a list"),
    "task_arms unknown arm": (_with(task_arms={"brain": ["d", "x"]}), "unknown arms ['x']"),
    "claim unknown arm": (
        _with(claims=[{"text": "x", "task": "brain", "arm": "dcie"}]),
        "names arms ['dcie']",
    ),
    "claim missing worse": (_with(claims=[{"text": "x", "better": "d"}]), "'better' and 'worse'"),
    "claim missing text": (_with(claims=[{"better": "d", "worse": "j"}]), "'text'"),
    "duplicate seeds": (_with(seeds=[0, 1, 1]), "'seeds' has duplicates"),
    "arm sets seed": (_arm(seed=3), "sets 'seed'"),
    "arm sets task": (_arm(task="abdomen"), "sets 'task'"),
    "arm sets data_root": (_arm(data_root="/x"), "sets 'data_root'"),
    "bad kind": (_with(kind="vibes"), "'kind' must be"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_study_configs_are_refused_through_the_cli(tmp_path, case):
    patch, message = BAD_CONFIGS[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(patch(_base_config(tmp_path))))
    cmd = [sys.executable, "-m", "promptseg.cli", "study", "run", str(path), "--cache",
           str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(path) in lines[0] and message in lines[0], lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "patch, message",
    [
        (_with(tasks=["knee"]), "unknown task 'knee'"),
        (_arm(loss="nope"), "bad loss 'nope'"),
        (_arm(colour=1), "unknown fields ['colour']"),
        (_arm(se="yes"), "'se' must be true or false"),
        (_arm(loss="dice"), "arms 'd' and 'j' give identical brain runs"),
        (_with(extra=1), "unknown keys ['extra']"),
        (_with(base={"seed": 1}), "base sets 'seed'"),
        (_with(task_base={"brian": {}}), "unknown task 'brian'"),
        (_with(claims=[{"text": "x", "better": "d", "worse": "j", "metric": "dcie"}]), "metric"),
        (_with(claims=[{"text": "x", "task": "abdomen", "arm": "d"}]), "task 'abdomen' is not"),
        (_with(seeds=[]), "'seeds' must be"),
        (_with(paired="no"), "'paired' must be"),
    ],
)
def test_more_bad_study_configs_are_refused(tmp_path, patch, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(patch(_base_config(tmp_path))))
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        StudyConfig.load(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_seeds_are_the_outermost_loop(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(_base_config(tmp_path)))
    runs = StudyConfig.load(path).runs()
    assert [(a, s.seed) for _, a, s in runs] == [("d", 0), ("j", 0), ("d", 1), ("j", 1)]


# ----------------------------------------------------------------------------- statistics


def test_wilcoxon_reports_the_pairs_it_used():
    a = [0.70, 0.72, 0.69, 0.75, 0.71, 0.74]
    b = [0.70, 0.719, 0.689, 0.749, 0.709, 0.24]  # one zero difference, one outlier
    t = paired_test(a, b)
    assert t.test == "wilcoxon" and t.n == 6 and t.n_effective == 5
    assert paired_test([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]).n_effective == 0


def test_unpaired_test_is_welch_or_mann_whitney():
    a = [0.70, 0.72, 0.69, 0.75, 0.71]
    b = [0.60, 0.65, 0.66, 0.70, 0.62]
    t = unpaired_test(a, b)
    assert t.test == "welch t"
    assert t.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    skewed = [0.60, 0.61, 0.60, 0.62, 0.10]
    u = unpaired_test(a, skewed)
    assert u.test == "mann-whitney" and u.p == pytest.approx(
        stats.mannwhitneyu(a, skewed, alternative="two-sided").pvalue
    )
    assert u.mean_diff == pytest.approx(np.mean(a) - np.mean(skewed)) and u.n_effective == 10
    assert mannwhitney_floor(3, 3) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- run reuse


def _fingerprint(device: str = "cpu", splits: str = "a" * 64) -> dict:
    return {
        "device": device,
        "splits_sha256": splits,
        "encoder": {"name": "minilm", "weights_sha256": "w"},
        "preprocessing": runner.preprocessing(32),
    }


def test_stale_reasons_compare_fingerprints_and_the_legacy_device():
    fp = _fingerprint()
    assert runner.stale_reasons({"fingerprint": fp}, fp) == []
    assert runner.stale_reasons({"fingerprint": fp}, _fingerprint("cuda")) == ["device cpu -> cuda"]
    moved = runner.stale_reasons({"fingerprint": fp}, _fingerprint(splits="b" * 64))
    assert len(moved) == 1 and moved[0].startswith("splits aaaa")
    # Results from before fingerprints: reused, unless the (implied CPU) device differs.
    assert runner.stale_reasons({}, fp) == []
    assert runner.stale_reasons({}, _fingerprint("cuda")) == ["device cpu -> cuda"]
    assert runner.stale_reasons({"device": "cuda"}, _fingerprint("cuda")) == []


def _spec(seed: int = 0, **kw) -> RunSpec:
    values = {"widths": (4, 8), "resolution": 32, "steps": 2, "batch": 2, "seed": seed} | kw
    return RunSpec("brain", ("brain-tumor",), ("brain-tumor",), ("glioma",), "dice", **values)


def test_plan_retrains_runs_made_under_other_conditions(tmp_path):
    encoder = {"name": "minilm", "weights_sha256": "w"}
    done, legacy, moved, missing = _spec(0), _spec(1), _spec(2), _spec(3)
    (tmp_path / "runs").mkdir()
    for spec, result in (
        (done, {"fingerprint": runner.fingerprint(done, "cpu", encoder)}),
        (legacy, {}),
        (
            moved,
            {"fingerprint": runner.fingerprint(moved, "cpu", encoder) | {"splits_sha256": "0"}},
        ),
    ):
        runner.result_path(tmp_path, spec).write_text(json.dumps(result))
    specs = [done, legacy, moved, missing]
    todo, stale = runner._plan(specs, tmp_path, "cpu", encoder)
    assert todo == [moved, missing] and list(stale.values()) == [1]
    todo, stale = runner._plan(specs, tmp_path, "cuda", encoder)
    assert todo == specs and stale["device cpu -> cuda"] == 2 and sum(stale.values()) == 3


def test_bank_names_change_with_data_root_and_splits(tmp_path, monkeypatch):
    a = runner._bank_path(tmp_path, "brain-tumor", "train", _spec())
    assert a == runner._bank_path(tmp_path, "brain-tumor", "train", _spec(seed=4))
    assert a != runner._bank_path(tmp_path, "brain-tumor", "train", _spec(data_root="/elsewhere"))
    assert a.name.startswith("bank_brain-tumor_train_32_")
    monkeypatch.setattr(runner, "splits_sha256", lambda: "0" * 64)
    assert a != runner._bank_path(tmp_path, "brain-tumor", "train", _spec())


class _FakeEncoder:
    """Stands in for TextEncoder: identity from a class attribute, embeddings of zeros."""

    weights = "w1"

    def identity(self):
        from promptseg.model.text import EncoderIdentity

        return EncoderIdentity("fake", "bert", 4, 16, self.weights)

    def embed_unique(self, prompts):
        import torch

        return {p: torch.full((4,), len(self.weights), dtype=torch.float32) for p in prompts}


def test_embeddings_are_rebuilt_when_the_encoder_changes(tmp_path, monkeypatch):
    import promptseg.model.text

    monkeypatch.setattr(promptseg.model.text, "TextEncoder", _FakeEncoder)
    path = tmp_path / "embeddings.pkl"
    first = runner._ensure_embeddings(tmp_path)
    blob = path.read_bytes()
    assert first["weights_sha256"] == "w1"
    assert runner._ensure_embeddings(tmp_path) == first and path.read_bytes() == blob
    monkeypatch.setattr(_FakeEncoder, "weights", "w22")
    second = runner._ensure_embeddings(tmp_path)
    stored = pickle.loads(path.read_bytes())
    assert second["weights_sha256"] == "w22" and stored["encoder"].weights_sha256 == "w22"
    assert next(iter(stored["embeddings"].values()))[0] == 3.0


# ----------------------------------------------------------------------------- reports


def _fake_result(spec: RunSpec, dice: float, fingerprint: dict | None) -> dict:
    metrics = {m: dice for m in METRICS} | {"hd95": 10 - 10 * dice}
    result = {
        "metrics": metrics,
        "per_target": {"glioma": metrics | {"n": 3}},
        "per_dataset": {"brain-tumor": {"glioma": metrics | {"n": 3}}},
        "empty_rate": 0.5,
        "n_negatives": 4,
        "key": spec.key(),
        "spec": spec.to_dict(),
        "loss_curve": [[1, 1.0], [2, 0.5]],
        "train_seconds": 50.0,
        "eval_seconds": 10.0,
        "git": "abc",
    }
    if fingerprint:  # else: a run from before fingerprints (and --device)
        result |= {"device": fingerprint["device"], "fingerprint": fingerprint}
    return result


DICE = {  # arm -> per-seed Dice; a < b < c
    "a": [0.50, 0.52, 0.47, 0.55],
    "b": [0.60, 0.61, 0.59, 0.66],
    "c": [0.70, 0.69, 0.71, 0.78],
}


def _ablation(tmp_path: Path, **extra) -> tuple[StudyConfig, Path]:
    cfg = {
        "name": "fake ablation",
        "kind": "ablation",
        "out": str(tmp_path / "out"),
        "tasks": ["brain"],
        "seeds": [0, 1, 2, 3],
        "arms": {"a": {"fusion": "concat"}, "b": {"fusion": "film"}, "c": {"cbam": False}},
        "claims": [
            {"text": "A beats B", "better": "a", "worse": "b"},
            {"text": "B beats A", "better": "b", "worse": "a"},
            {"text": "C beats A", "better": "c", "worse": "a"},
            {"text": "C is best", "task": "brain", "arm": "c"},
        ],
    } | extra
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(cfg))
    return StudyConfig.load(path), path


def _fill_cache(cfg: StudyConfig, cache: Path) -> None:
    """Fake results: arm c on cuda (two splits hashes), a and b from before fingerprints."""
    (cache / "runs").mkdir(parents=True, exist_ok=True)
    for _, arm, spec in cfg.runs():
        fp = _fingerprint("cuda", str(spec.seed % 2) * 64) if arm == "c" else None
        result = _fake_result(spec, DICE[arm][spec.seed], fp)
        runner.result_path(cache, spec).write_text(json.dumps(result))


def test_report_claims_provenance_and_stale_files(tmp_path):
    cfg, path = _ablation(tmp_path)
    cache = tmp_path / "cache"
    _fill_cache(cfg, cache)
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "brain_gone_seed9.json").write_text("{}")  # from an older report
    (out / "violin_knee.png").write_bytes(b"old")
    write_study(cfg, path, cache)
    report = (out / "report.md").read_text()
    diff = np.mean(DICE["a"]) - np.mean(DICE["b"])
    assert "A beats B (brain, 4 seeds): **does not hold**" in report
    assert f"difference a − b {diff:.4f}" in report  # found in the b-vs-a orientation
    assert f"difference b − a {-diff:.4f}" in report
    assert "C beats A (brain, 4 seeds): not tested (pair not compared)." in report
    assert "Holm over the 2 comparisons of c with each other arm on dice" in report
    assert "CPU-thread minutes" in report and "minutes on cuda" in report
    assert "--device cuda" in report and "--workers 2" not in report
    assert "**The runs disagree on the splits**" in report
    assert "8 of 12 runs predate run fingerprints" in report and "brain/a/seed 0" in report
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        f"brain_{a}_seed{s}.json" for a in "abc" for s in range(4)
    )
    assert not (out / "violin_knee.png").exists() and (out / "violin_brain.png").is_file()
    meta = json.loads((out / "study.json").read_text())
    assert meta["splits_sha256"] == ["0" * 64, "1" * 64]
    with open(out / "comparisons.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["a"], r["b"]) for r in rows} == {("b", "a"), ("c", "b")}
    assert all(r["n_effective"] == "4" for r in rows if r["metric"] == "dice")
    # No complete seed any more: no tables, figures or run copies of the old report stay.
    for f in (cache / "runs").glob("*.json"):
        if json.loads(f.read_text())["spec"]["fusion"] == "concat":
            f.unlink()
    write_study(cfg, path, cache)
    assert "No complete seed yet" in (out / "report.md").read_text()
    left = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert left == ["report.md", "study.json"]


def test_unpaired_config_uses_unpaired_tests(tmp_path):
    cfg, path = _ablation(tmp_path, paired=False, claims=[])
    _fill_cache(cfg, tmp_path / "cache")
    write_study(cfg, path, tmp_path / "cache")
    with open(tmp_path / "out" / "comparisons.csv") as fh:
        tests = {r["test"] for r in csv.DictReader(fh)}
    assert tests and tests <= {"welch t", "mann-whitney", "none"} and "welch t" in tests
    assert '("paired": false)' in (tmp_path / "out" / "report.md").read_text()


def test_cross_modality_report_says_what_seed_pairing_shares(tmp_path):
    cfg = {
        "name": "x",
        "kind": "cross-modality",
        "out": str(tmp_path / "out"),
        "tasks": ["abdomen"],
        "seeds": [0, 1, 2],
        "arms": {"MR": {"train_datasets": ["chaos-mr"]}, "CT": {"train_datasets": ["btcv-ct"]}},
    }
    path = tmp_path / "x.json"
    path.write_text(json.dumps(cfg))
    study = StudyConfig.load(path)
    from promptseg.studies.report import _pairing_note

    assert "pairs only the initial weights" in " ".join(_pairing_note(study, "abdomen"))
    study.paired = False
    assert _pairing_note(study, "abdomen") == []


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
    assert "Splits (sha256 of datasets.load_splits()) recorded by the runs" in report
    # A result recorded under other splits is trained again; the others are reused.
    run_file = sorted((tmp_path / "cache" / "runs").glob("*.json"))[0]
    result = json.loads(run_file.read_text())
    assert result["fingerprint"]["device"] == "cpu"
    assert len(result["fingerprint"]["splits_sha256"]) == 64
    result["fingerprint"]["splits_sha256"] = "0" * 64
    run_file.write_text(json.dumps(result))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "1 to run" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "splits 000000000000 ->" in proc.stdout
    assert json.loads(run_file.read_text())["fingerprint"]["splits_sha256"] != "0" * 64
