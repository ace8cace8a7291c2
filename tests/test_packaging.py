"""A real wheel of the project (``pip wheel``, offline, no build isolation): what it holds, and
that the installed copy runs without the source tree (studies, free-form prompts, model data).

The sources are copied to a temporary folder first, so the build writes no ``build/`` or
``*.egg-info`` into the working tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Source folder -> its package in the wheel ([tool.setuptools.package-dir] in pyproject.toml).
SOURCES = {
    "promptseg": "promptseg",
    "runtime": "promptseg/runtime",
    "export": "promptseg/export",
    "calibration": "promptseg/calibration",
}


def test_licence_file_matches_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (REPO / "LICENSE").read_text("utf-8")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) == 201


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*")
    for folder in SOURCES:
        shutil.copytree(REPO / folder, src / folder, ignore=junk)
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-q", "-w", str(dist)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = dist.glob("promptseg-*.whl")
    return path


@pytest.fixture(scope="module")
def names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def _source_files(pattern: str, folder: str) -> set[str]:
    """Wheel names of the files of ``folder`` (relative to the repo) matching ``pattern``."""
    top = folder.split("/")[0]
    root = REPO / folder
    return {
        f"{SOURCES[top]}/{p.relative_to(REPO / top).as_posix()}"
        for p in root.glob(pattern)
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_every_subpackage_and_module_is_in_the_wheel(names):
    for top in SOURCES:
        modules = _source_files("**/*.py", top)
        assert modules, top
        missing = sorted(modules - names)
        assert not missing, f"modules missing from the wheel: {missing}"
    studies = {n for n in names if n.startswith("promptseg/studies/") and n.endswith(".py")}
    assert {"promptseg/studies/__init__.py", "promptseg/studies/command.py"} <= studies


def test_data_files_are_in_the_wheel(names):
    required = {
        "promptseg/data/free_form.json",
        "promptseg/data/partition.json",
        "promptseg/runtime/default_engine/manifest.json",
        "promptseg/weights/default.pt",
    }
    assert required <= names, sorted(required - names)
    for folder in ("runtime/default_engine", "promptseg/weights", "promptseg/examples"):
        files = _source_files("*", folder)
        assert files and files <= names, sorted(files - names)


def test_installed_wheel_runs_outside_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
        + ["--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    code = f"""
import sys
from pathlib import Path
import promptseg
from promptseg.cli import main
target = Path({str(target)!r}).resolve()
assert Path(promptseg.__file__).resolve().is_relative_to(target), promptseg.__file__
for argv in (["study", "--help"], ["robustness", "--help"], ["render", "--help"]):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
import promptseg.studies.command
from promptseg.robustness import DEFAULT_FREE_FORM, load_free_form
from promptseg.checkpoint import load_checkpoint
assert DEFAULT_FREE_FORM.resolve().is_relative_to(target), DEFAULT_FREE_FORM
loaded = load_checkpoint("default")
assert Path(loaded.path).resolve().is_relative_to(target), loaded.path
ff = load_free_form(DEFAULT_FREE_FORM, loaded.vocabulary.targets)
assert ff.targeted and ff.off_topic
from promptseg.runtime.manifest import EngineFolder
engine = EngineFolder.open(None)
assert Path(engine.path).resolve().is_relative_to(target), engine.path
print("installed ok")
"""
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().endswith("installed ok")
