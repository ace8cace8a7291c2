"""``promptseg robustness``: a real (small) run of the shipped model through the CLI, its
bookkeeping on real truth masks, and its one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cli_run import nonblank_lines, run_promptseg

from promptseg.data.datasets import DATASET_FOLDERS, load_cases
from promptseg.robustness import (
    DEFAULT_FREE_FORM,
    FreeForm,
    _Tally,
    draw_phrasings,
    heldout_kind,
    kidney_confusion_row,
    load_free_form,
)

MAX_CASES = 3  # BTCV val slices 48, 49 (right kidney only) and 50 (both kidneys)
DATASETS = ("btcv-ct", "brain-tumor")


def _run(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return run_promptseg("robustness", *args, timeout=timeout)


@pytest.fixture(scope="module")
def loaded():
    from promptseg.checkpoint import load_checkpoint

    return load_checkpoint("default")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, data_root):
    """The shipped model on the first 3 BTCV and brain validation cases, 1 phrasing per set."""
    out = tmp_path_factory.mktemp("robustness") / "out"
    result = _run(
        "default",
        "--data-root",
        str(data_root),
        "--out",
        str(out),
        "--datasets",
        *DATASETS,
        "--max-cases",
        str(MAX_CASES),
        "--phrasings",
        "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_writes_numbers_and_one_png_only(small_run, loaded):
    out, results, _ = small_run
    assert sorted(p.name for p in out.iterdir()) == [
        "btcv-ct",
        "cases.csv",
        "kidney_confusion.png",
        "report.md",
        "results.json",
    ]
    # Licence: BTCV per-case rows go to a folder .gitignore keeps local, never to cases.csv.
    assert [p.name for p in (out / "btcv-ct").iterdir()] == ["cases.csv"]
    with open(out / "cases.csv", newline="") as fh:
        assert {r["dataset"] for r in csv.DictReader(fh)} == {"brain-tumor"}
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", "results/x/btcv-ct/cases.csv"],
        cwd=Path(__file__).resolve().parents[1],
    )
    assert ignored.returncode == 0
    from PIL import Image

    with Image.open(out / "kidney_confusion.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 150
    meta = results["meta"]
    assert meta["command"].startswith("promptseg robustness default --data-root ")
    assert f"--max-cases {MAX_CASES}" in meta["command"] and "--phrasings 1" in meta["command"]
    assert meta["presence_gate"] is True and meta["postprocess"] == "largest"
    assert meta["presence_thresholds"] == dict(loaded.presence_thresholds)
    assert meta["datasets"]["btcv-ct"]["cases"] == MAX_CASES
    assert meta["datasets"]["brain-tumor"]["cases"] == MAX_CASES


def test_kidney_confusion_rows_sum_to_one(small_run):
    _, results, _ = small_run
    rows = results["kidney_confusion"]
    assert set(rows) == {"btcv-ct"}  # brain slices are never used for the kidney matrix
    for prompt in ("left kidney", "right kidney"):
        r = rows["btcv-ct"][prompt]
        fractions = [r["in_left"], r["in_right"], r["elsewhere"]]
        if r["pred_voxels"]:
            assert all(0.0 <= f <= 1.0 for f in fractions)
            assert sum(fractions) == pytest.approx(1.0, abs=1e-9)
        assert r["dice_right_n"] == 3 and r["dice_left_n"] == 1
        assert all(0.0 <= r[k] <= 1.0 for k in ("dice_left", "dice_right"))


def test_canonical_rows_match_promptseg_evaluate(small_run, data_root, tmp_path):
    """Same model, same cases, same canonical prompts: the Dice means of evaluate."""
    from promptseg.evaluate import evaluate

    out, results, _ = small_run
    rows = []
    for path in (out / "cases.csv", out / "btcv-ct" / "cases.csv"):
        with open(path, newline="") as fh:
            rows += list(csv.DictReader(fh))
    for kind in DATASETS:
        cases = list(load_cases(kind, data_root / DATASET_FOLDERS[kind], "val"))[:MAX_CASES]
        present = sum(int(m.any()) for c in cases for m in c.masks.values())
        canonical = [r for r in rows if r["dataset"] == kind and r["set"] == "canonical"]
        assert len(canonical) == present
        assert all(r["prompt"] == f"Segment the {r['target']}" for r in canonical)
        summary = evaluate(
            "default",
            data_root / DATASET_FOLDERS[kind],
            kind,
            tmp_path / kind,
            split="val",
            threads=1,
            max_cases=MAX_CASES,
            progress=False,
        )  # both score what promptseg-run delivers: presence gate and post-processing on
        for target, e in summary["targets"].items():
            got = results["prompt_sets"][kind][target]["canonical"]
            assert got["n"] == e["n"]
            # Prompt batching differs (chunks of 8 vs all targets): allow a flipped pixel.
            assert got["dice_mean"] == pytest.approx(e["dice_mean"], abs=5e-3)
    # The acceptance table (promptseg report --targets) reads the same summaries back.
    proc = run_promptseg("report", *(str(tmp_path / kind) for kind in DATASETS), "--targets")
    assert proc.returncode == 0, proc.stderr
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in proc.stdout.splitlines()
    }
    for kind in DATASETS:
        summary = json.loads((tmp_path / kind / "summary.json").read_text())
        for target, goal in (("liver", 0.92), ("glioma", 0.65), ("meningioma", 0.80)):
            row = summary["targets"].get(target)
            cells = rows.get(f"{kind} {target} Dice")
            assert (cells is None) == (row is None or row["dice_mean"] is None)
            if cells is not None:
                assert cells[1] == f"{row['dice_mean']:.3f}"
                assert cells[3].startswith("met" if row["dice_mean"] >= goal else "**not met**")
    absent = next(v for k, v in rows.items() if k.startswith("absent-target prompts"))
    assert absent[1] == " / ".join(
        f"{json.loads((tmp_path / k / 'summary.json').read_text())['absent_empty_rate']:.3f}"
        for k in DATASETS
    )


def test_wrong_target_counts_follow_the_domains(small_run):
    _, results, _ = small_run
    wrong = results["wrong_target"]
    # The first 3 brain validation slices are meningiomas: glioma and pituitary prompts are
    # same-domain wrong targets there, every abdominal prompt is cross-domain.
    for target in ("glioma", "pituitary tumour"):
        assert wrong["same"][target]["brain-tumor"]["n"] == MAX_CASES
        assert wrong["cross"][target]["btcv-ct"]["n"] == MAX_CASES
    assert "meningioma" not in wrong["same"]
    for target in ("liver", "spleen", "left kidney", "right kidney", "liver tumour"):
        assert wrong["cross"][target]["brain-tumor"]["n"] == MAX_CASES
    # BTCV slices 48-50 contain no liver and no spleen; the left kidney is absent on 2 of them.
    assert wrong["same"]["liver"]["btcv-ct"]["n"] == MAX_CASES
    assert wrong["same"]["left kidney"]["btcv-ct"]["n"] == 2
    for domain in ("same", "cross"):
        for by_ds in wrong[domain].values():
            for e in by_ds.values():
                assert 0.0 <= e["empty_rate"] <= 1.0 and 0.0 <= e["mean_predicted_fraction"] <= 1


def test_report_lists_every_phrasing_and_the_command(small_run):
    _, results, report = small_run
    ff = json.loads(DEFAULT_FREE_FORM.read_text())
    for item in ff["targeted"]:
        assert f"| {item['prompt']} | {item['target']} |" in report
    for prompt in ff["off_topic"]:
        assert f"| {prompt} |" in report
    for target, phrasings in results["per_phrasing"]["heldout"].items():
        for prompt in phrasings:
            assert f"| {target} | {prompt} |" in report
    assert results["meta"]["command"] in report and results["meta"]["git"] in report
    for kind, targets in results["prompt_sets"].items():
        for target, e in targets.items():
            assert f"| {kind} | {target} | {e['canonical']['dice_mean']:.3f} ± " in report
    for t in results["free_form"]["off_topic"]:
        # Off-topic prompts are far from every known target: the runtime refuses them.
        assert t["refusal"]["refused"] is True, t
    for t in results["free_form"]["targeted"]:
        # The verdict names the target the runtime would use: never the other kidney.
        if not t["refusal"]["refused"]:
            assert t["refusal"]["nearest_target"] == t["target"], t
    assert results["meta"]["free_form_file"] == str(DEFAULT_FREE_FORM)


def test_reported_sd_is_the_population_sd_it_is_labelled(small_run):
    out, results, report = small_run
    assert "Dice mean ± population sd (ddof=0)" in report
    with open(out / "cases.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["set"] == "train"]
    by_target: dict[str, list[float]] = {}
    for r in rows:
        by_target.setdefault(r["target"], []).append(float(r["dice"]))
    spread = [t for t, d in by_target.items() if len(d) > 1 and np.std(d) > 1e-3]
    assert spread, by_target  # a target where ddof=0 and ddof=1 differ visibly
    for target in spread:
        dice = by_target[target]
        got = results["prompt_sets"]["brain-tumor"][target]["train"]["dice_sd"]
        assert got == pytest.approx(np.std(dice), abs=1e-5)  # cases.csv rounds to 6 places
        assert got != pytest.approx(np.std(dice, ddof=1), abs=1e-5)


def test_default_free_form_file_is_package_data():
    import promptseg

    package = Path(promptseg.__file__).resolve().parent
    assert DEFAULT_FREE_FORM == package / "data" / "free_form.json"
    assert DEFAULT_FREE_FORM.is_file()
    repo = Path(__file__).resolve().parents[1]
    assert not (repo / "configs" / "robustness" / "free_form.json").exists()  # one copy only


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"threads": 0}, "--threads must be an integer >= 1, got 0"),
        ({"batch": 0}, "batch must be an integer >= 1, got 0"),
        ({"max_cases": -1}, "--max-cases must be an integer >= 0, got -1"),
        ({"phrasings": 0}, "--phrasings must be an integer >= 1, got 0"),
        ({"datasets": ["chaos-ct"]}, "unknown dataset 'chaos-ct'"),
    ],
)
def test_bad_arguments_raise_before_anything_is_written(tmp_path, data_root, overrides, match):
    from promptseg.robustness import robustness

    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        robustness("default", data_root, out, **overrides)
    assert not out.exists()


def test_confusion_bookkeeping_on_real_chaos_truth(data_root):
    """Feeding the truth masks as predictions gives the identity matrix: no left/right swap."""
    case = next(iter(load_cases("chaos-mr", data_root / DATASET_FOLDERS["chaos-mr"], "val")))
    tally = _Tally(FreeForm((), (), Path("x"), ""))
    for t in ("left kidney", "right kidney"):
        tally.use(case, f"Segment the {t}", case.masks[t], ("kidney", t))
    left = kidney_confusion_row(tally.kidney["chaos-mr"]["left kidney"])
    right = kidney_confusion_row(tally.kidney["chaos-mr"]["right kidney"])
    assert (left["in_left"], left["in_right"], left["elsewhere"]) == (1.0, 0.0, 0.0)
    assert (right["in_left"], right["in_right"], right["elsewhere"]) == (0.0, 1.0, 0.0)
    assert left["dice_left"] == 1.0 and left["dice_right"] == 0.0
    assert right["dice_right"] == 1.0 and right["dice_left"] == 0.0
    # CHAOS label 3 is the left kidney; it lies at higher row index (patient's left).
    rows = (
        np.nonzero(case.masks["left kidney"])[1].mean(),
        np.nonzero(case.masks["right kidney"])[1].mean(),
    )
    assert rows[0] > rows[1]


def test_phrasing_draws_and_heldout_kinds(loaded):
    vocab = loaded.vocabulary
    for target in vocab.targets:
        drawn = draw_phrasings(loaded, "heldout", target, "case/1", 5)
        assert len(set(drawn)) == 5 and set(drawn) <= set(vocab.heldout_prompts(target))
        assert draw_phrasings(loaded, "heldout", target, "case/1", 5) == drawn  # deterministic
        kinds = [heldout_kind(loaded, target, p) for p in vocab.heldout_prompts(target)]
        n_syn, n_tmpl = len(vocab.heldout_synonyms[target]), len(vocab.heldout_templates)
        assert kinds.count("synonym") == n_syn * len(vocab.templates)
        assert kinds.count("template") == len(vocab.synonyms[target]) * n_tmpl
        assert kinds.count("synonym+template") == n_syn * n_tmpl
        assert "unknown" not in kinds


def test_free_form_file_is_validated(tmp_path, loaded):
    shipped = load_free_form(DEFAULT_FREE_FORM, loaded.vocabulary.targets)
    assert 8 <= len(shipped.targeted) <= 12 and len(shipped.off_topic) >= 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"targeted": [{"prompt": "x", "target": "femur"}], "off_topic": []}))
    with pytest.raises(ValueError, match="bad.json.*'femur'"):
        load_free_form(bad, loaded.vocabulary.targets)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_free_form(bad, loaded.vocabulary.targets)


def test_bad_checkpoint_exits_2_with_one_line(tmp_path, data_root):
    out = tmp_path / "out"
    result = _run(str(tmp_path / "missing.pt"), "--data-root", str(data_root), "--out", str(out))
    assert result.returncode == 2
    lines = nonblank_lines(result.stderr)
    assert len(lines) == 1 and "missing.pt" in lines[0] and "checkpoint not found" in lines[0]
    assert lines[0].startswith("promptseg robustness: error:")
    assert not out.exists()


def test_bad_free_form_file_exits_2_with_one_line(tmp_path, data_root):
    bad = tmp_path / "prompts.json"
    bad.write_text(json.dumps({"targeted": [{"prompt": "x", "target": "lung"}], "off_topic": []}))
    out = tmp_path / "out"
    result = _run(
        "default", "--data-root", str(data_root), "--out", str(out), "--free-form", str(bad)
    )
    assert result.returncode == 2
    lines = nonblank_lines(result.stderr)
    assert len(lines) == 1 and "prompts.json" in lines[0] and "'lung'" in lines[0], lines
    assert not out.exists()


def test_command_records_the_raw_mask_options(tmp_path):
    """A run that scores the network's raw masks says so in its reproducing command."""
    from promptseg.data.datasets import KINDS
    from promptseg.robustness.free_form import DEFAULT_FREE_FORM
    from promptseg.robustness.run import robustness_command

    args = ("default", "../shared/data", tmp_path, KINDS, 0, 3, 0, DEFAULT_FREE_FORM, None)
    assert "--no-presence-gate" not in robustness_command(*args)
    raw = robustness_command(*args, False, "none")
    assert raw.endswith("--no-presence-gate --postprocess none")
