"""Tests for the ``promptseg`` console script (info, train argument validation), in subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import nonblank_lines, run_promptseg

from promptseg.model.unet import UNet, count_parameters, preset_config


def test_info_prints_both_presets_with_parameter_counts():
    # Counts FLOPs with a real forward pass of the paper preset at 256 px: seconds on an idle
    # core, much longer on a shared machine, hence the generous limit.
    result = run_promptseg("info", timeout=1800)
    assert result.returncode == 0, result.stderr
    for name in ("small", "paper"):
        millions = count_parameters(UNet(preset_config(name))) / 1e6
        line = next((ln for ln in result.stdout.splitlines() if ln.startswith(name)), None)
        assert line is not None, result.stdout
        assert f"{millions:.3f} M parameters" in line
        flops = re.search(r"([\d.]+) GFLOPs", line)
        assert flops and float(flops.group(1)) > 0
        res = preset_config(name).resolution
        assert f"at {res}x{res}" in line


def test_info_selected_preset():
    result = run_promptseg("info", "--presets", "tiny")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiny")
    assert f"film vector {UNet(preset_config('tiny')).film_dim}" in lines[0]


def test_train_bad_dataset_name_on_the_command_line(tmp_path):
    result = run_promptseg("train", "--datasets", "chaos-ct", "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    errors = [ln for ln in nonblank_lines(result.stderr) if "error:" in ln]
    assert len(errors) == 1
    assert "--datasets: 'chaos-ct' is not one of" in errors[0]
    assert not (tmp_path / "run").exists()  # failed before any work


def test_train_bad_dataset_name_in_a_config_file(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"datasets": ["brain-tumour"], "out": str(tmp_path / "run")}))
    result = run_promptseg("train", "--config", str(config))
    assert result.returncode == 2
    lines = nonblank_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("promptseg train: error:")
    assert "brain-tumour" in lines[0] and "brain-tumor" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("run.json", '{"total_samples": 64, "learning_rate": 0.1}\n'),
        ("run.yaml", "total_samples: 64\nlearning_rate: 0.1\n"),
    ],
)
def test_train_config_unknown_key(tmp_path, name, text):
    config = tmp_path / name
    config.write_text(text)
    result = run_promptseg("train", "--config", str(config))
    assert result.returncode == 2
    lines = nonblank_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert str(config) in lines[0]
    assert "learning_rate" in lines[0]


def test_train_missing_config_file(tmp_path):
    missing = tmp_path / "absent.json"
    result = run_promptseg("train", "--config", str(missing))
    assert result.returncode == 2
    lines = nonblank_lines(result.stderr)
    assert len(lines) == 1 and str(missing) in lines[0]


def test_no_subcommand_is_a_usage_error():
    result = run_promptseg()
    assert result.returncode == 2
    assert "usage: promptseg" in result.stderr


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("broken.json", '{"total_samples": 64,,}\n'),
        ("broken.yaml", "total_samples: [1\n"),
        ("typed.json", '{"total_samples": "three"}\n'),
    ],
)
def test_train_malformed_config_names_the_file(tmp_path, name, text):
    config = tmp_path / name
    config.write_text(text)
    result = run_promptseg("train", "--config", str(config))
    assert result.returncode == 2
    lines = nonblank_lines(result.stderr)
    assert len(lines) == 1 and str(config) in lines[0], result.stderr


# --------------------------------------------------------------------------- no torch


EXAMPLES = Path(__file__).resolve().parents[1] / "promptseg" / "examples"


def test_render_and_help_do_not_import_torch(tmp_path):
    """``promptseg render`` (and --help of every command but study) runs without torch."""
    png = tmp_path / "example.png"
    code = f"""
import sys
from promptseg.cli import main

for argv in (["--help"], ["render", "--help"], ["grids", "--help"], ["train", "--help"],
             ["study", "--help"]):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
assert "torch" not in sys.modules, "--help imported torch"
volume, label = {str(EXAMPLES / "chaos_mr_1.nii.gz")!r}, {str(EXAMPLES / "chaos_mr_1_label.nii.gz")!r}
assert main(["render", volume, label, "-o", {str(png)!r}]) == 0
assert "torch" not in sys.modules, "render imported torch"
print("no torch")
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().endswith("no torch")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_help_shows_the_real_study_options():
    """The study parser is built without torch (the trainings import it when they run)."""
    result = run_promptseg("study", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--workers", "--cache", "--device", "{run|report}"):
        assert option in result.stdout
    listing = run_promptseg("--help")
    assert re.search(r"^\s+study\s+\S", listing.stdout, re.M), listing.stdout
    missing = run_promptseg("study", "run")
    assert missing.returncode == 2
    lines = nonblank_lines(missing.stderr)
    assert len(lines) == 1 and "CONFIGS" in lines[0], missing.stderr


# --------------------------------------------------------------------------- bad input


def _one_line_exit_2(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = nonblank_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _command(name: str, out: Path, data_root: Path) -> list[str]:
    if name == "evaluate":
        data = str(data_root / "chaos-mr-t2spir")
        return ["evaluate", "default", "--data", data, "--dataset", "chaos-mr", "--out", str(out)]
    return [name, "default", "--data-root", str(data_root), "--out", str(out)]


@pytest.mark.parametrize("command", ["grids", "robustness", "evaluate"])
@pytest.mark.parametrize("threads", ["0", "-2", "two"])
def test_bad_threads_is_a_one_line_error(tmp_path, data_root, command, threads):
    out = tmp_path / "out"
    result = run_promptseg(*_command(command, out, data_root), "--threads", threads)
    line = _one_line_exit_2(result, f"promptseg {command}: error:", "--threads", repr(threads))
    assert "integer >= 1" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["grids", "robustness"])
def test_negative_max_cases_is_a_one_line_error(tmp_path, data_root, command):
    out = tmp_path / "out"
    result = run_promptseg(*_command(command, out, data_root), "--max-cases", "-1")
    _one_line_exit_2(result, "--max-cases", "integer >= 0", "'-1'")
    assert not out.exists()


def test_grids_missing_checkpoint_creates_nothing(tmp_path, data_root):
    out = tmp_path / "grids"
    missing = tmp_path / "missing.pt"
    result = run_promptseg("grids", str(missing), "--data-root", str(data_root), "--out", str(out))
    _one_line_exit_2(result, "promptseg grids: error:", str(missing), "checkpoint not found")
    assert not out.exists()


def test_grids_unreadable_checkpoint_creates_nothing(tmp_path, data_root):
    out = tmp_path / "grids"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run_promptseg("grids", str(bad), "--data-root", str(data_root), "--out", str(out))
    _one_line_exit_2(result, "promptseg grids: error:", str(bad))
    assert not out.exists()


def test_evaluate_missing_data_folder_creates_nothing(tmp_path):
    out = tmp_path / "eval"
    missing = tmp_path / "no-such-data"
    result = run_promptseg(
        "evaluate", "default", "--data", str(missing), "--dataset", "chaos-mr", "--out", str(out)
    )
    _one_line_exit_2(result, "promptseg evaluate: error:", str(missing), "not found")
    assert not out.exists()


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"lr": True}, "lr"),
        ({"weight_decay": False}, "weight_decay"),
        ({"uniform_fraction": True}, "uniform_fraction"),
        ({"total_samples": True}, "total_samples"),
        ({"total_samples": 320.5}, "total_samples"),
        ({"save_every_steps": 0}, "save_every_steps"),
        ({"datasets": "chaos-mr"}, "datasets"),
        ({"threads": 0}, "threads"),
    ],
)
def test_train_config_wrong_type_or_value_names_the_key(tmp_path, values, key):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({**values, "out": str(tmp_path / "run")}))
    result = run_promptseg("train", "--config", str(config))
    line = _one_line_exit_2(result, "promptseg train: error:", key)
    assert str(config) in line or key in ("threads", "save_every_steps")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "option", ["--threads", "--total-samples", "--batch", "--eval-every-samples"]
)
def test_train_non_positive_numbers_on_the_command_line(tmp_path, option):
    result = run_promptseg("train", option, "0", "--out", str(tmp_path / "run"))
    _one_line_exit_2(result, "promptseg train: error:", option, "integer >= 1")
    assert not (tmp_path / "run").exists()
