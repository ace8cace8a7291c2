"""Tests for the ``promptseg`` console script (info, train argument validation), in subprocesses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from promptseg.model.unet import UNet, count_parameters, preset_config


def _promptseg() -> list[str]:
    """The installed console script (next to this interpreter), else ``python -m``."""
    script = Path(sys.executable).with_name("promptseg")
    if script.is_file():
        return [str(script)]
    found = shutil.which("promptseg")
    return [found] if found else [sys.executable, "-m", "promptseg.cli"]


def _run(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*_promptseg(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_info_prints_both_presets_with_parameter_counts():
    # Counts FLOPs with a real forward pass of the paper preset at 256 px: seconds on an idle
    # core, much longer on a shared machine, hence the generous limit.
    result = _run("info", timeout=1800)
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
    result = _run("info", "--presets", "tiny")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiny")
    assert f"film vector {UNet(preset_config('tiny')).film_dim}" in lines[0]


def test_train_bad_dataset_name_on_the_command_line(tmp_path):
    result = _run("train", "--datasets", "chaos-ct", "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    errors = [ln for ln in _error_lines(result.stderr) if "error:" in ln]
    assert len(errors) == 1
    assert "invalid choice: 'chaos-ct'" in errors[0]
    assert not (tmp_path / "run").exists()  # failed before any work


def test_train_bad_dataset_name_in_a_config_file(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"datasets": ["brain-tumour"], "out": str(tmp_path / "run")}))
    result = _run("train", "--config", str(config))
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("promptseg train: error:")
    assert "brain-tumour" in lines[0] and "brain-tumor" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("run.json", '{"epochs": 1, "learning_rate": 0.1}\n'),
        ("run.yaml", "epochs: 1\nlearning_rate: 0.1\n"),
    ],
)
def test_train_config_unknown_key(tmp_path, name, text):
    config = tmp_path / name
    config.write_text(text)
    result = _run("train", "--config", str(config))
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert str(config) in lines[0]
    assert "learning_rate" in lines[0]


def test_train_missing_config_file(tmp_path):
    missing = tmp_path / "absent.json"
    result = _run("train", "--config", str(missing))
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and str(missing) in lines[0]


def test_no_subcommand_is_a_usage_error():
    result = _run()
    assert result.returncode == 2
    assert "usage: promptseg" in result.stderr


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("broken.json", '{"epochs": 1,,}\n'),
        ("broken.yaml", "epochs: [1\n"),
        ("typed.json", '{"epochs": "three"}\n'),
    ],
)
def test_train_malformed_config_names_the_file(tmp_path, name, text):
    config = tmp_path / name
    config.write_text(text)
    result = _run("train", "--config", str(config))
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and str(config) in lines[0], result.stderr
