"""Pictures: ``promptseg render``, ``promptseg-run --render`` and ``promptseg grids``.

Real CHAOS volumes and label maps from ``../shared/data``; bad inputs are small NIfTI files the
tests write themselves. Empty masks are drawn (the picture says "empty mask" and the legend
says which label is empty), not refused: an absent organ is a legitimate answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="pictures need matplotlib (promptseg[render])")
pytest.importorskip("skimage", reason="pictures need scikit-image (promptseg[render])")

from promptseg.cli import main  # noqa: E402
from promptseg.data.readers import InputError  # noqa: E402
from promptseg.render import DPI, FIG_SIZE, render  # noqa: E402
from promptseg.runtime.manifest import DEFAULT_ENGINE_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "promptseg" / "examples" / "chaos_mr_1.nii.gz"
EXAMPLE_LABEL = REPO / "promptseg" / "examples" / "chaos_mr_1_label.nii.gz"
CHAOS_NAMES = {"1": "liver", "2": "right kidney", "3": "left kidney", "4": "spleen"}
SIZE = tuple(int(round(v * DPI)) for v in FIG_SIZE)


def png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".tmp")]


@pytest.fixture(scope="module")
def chaos(data_root: Path) -> tuple[Path, Path]:
    folder = data_root / "chaos-mr-t2spir"
    return folder / "image_19.nii.gz", folder / "label_19.nii.gz"


def write_like(ref: Path, data: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    img = nib.load(str(ref))
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), str(path))
    return path


# --------------------------------------------------------------------------- render


def test_render_real_chaos_label_map(chaos: tuple[Path, Path], tmp_path: Path) -> None:
    image, label = chaos
    names = tmp_path / "names.json"
    names.write_text(json.dumps(CHAOS_NAMES))
    out = tmp_path / "chaos.png"
    info = render(image, [label], out, labels_json=names)
    assert png_size(out) == SIZE == tuple(info["size"])
    assert [r["name"] for r in info["labels"]] == list(CHAOS_NAMES.values())
    truth = np.asarray(nib.load(str(label)).dataobj)
    voxel_ml = float(np.prod(nib.load(str(image)).header.get_zooms()[:3])) / 1000
    for k, row in enumerate(info["labels"], start=1):
        assert row["voxels"] == int((truth == k).sum()) > 0
        assert row["volume_ml"] == pytest.approx(row["voxels"] * voxel_ml, abs=1e-3)
    # The axial panel shows the slice with the largest labelled area (axis 2 is S here).
    assert info["axial_slice"] == int(np.argmax((truth > 0).sum((0, 1))))
    assert info["empty"] == [] and leftovers(tmp_path) == []


def test_reoriented_file_gives_the_same_ras_picture_data(tmp_path: Path) -> None:
    """A transposed and flipped copy of a scan is drawn from the same RAS+ arrays."""
    from promptseg.data.readers import read_volume
    from promptseg.render import Mask, _to_ras

    img = nib.load(str(EXAMPLE))
    data = np.asarray(img.dataobj, dtype=np.float32)
    lab = np.asarray(nib.load(str(EXAMPLE_LABEL)).dataobj).astype(np.uint8)
    # New voxel (i, j, k) = old (k, n1-1-j, i): permute axes (2, 1, 0) and flip the middle one.
    swap = np.zeros((4, 4))
    swap[0, 2] = swap[2, 0] = swap[3, 3] = 1
    swap[1, 1], swap[1, 3] = -1, data.shape[1] - 1
    affine = img.affine @ swap
    moved = write_like(
        EXAMPLE, np.transpose(data, (2, 1, 0))[:, ::-1], tmp_path / "v.nii.gz", affine
    )
    moved_lab = write_like(
        EXAMPLE, np.transpose(lab, (2, 1, 0))[:, ::-1], tmp_path / "l.nii.gz", affine
    )
    a, b = read_volume(EXAMPLE), read_volume(moved)
    ra = _to_ras(a, [Mask("l", lab > 0)])
    rb = _to_ras(b, [Mask("l", np.asarray(nib.load(str(moved_lab)).dataobj) > 0)])
    np.testing.assert_array_equal(ra[0], rb[0])
    np.testing.assert_array_equal(ra[1][0], rb[1][0])
    np.testing.assert_allclose(ra[2], rb[2])
    info = render(moved, [moved_lab], tmp_path / "b.png")
    assert [r["voxels"] for r in info["labels"]] == [int((lab == k).sum()) for k in range(1, 5)]
    # The axial slice is found along the moved file's first axis, at the original's index.
    assert info["axial_axis"] == 0
    assert info["axial_slice"] == int(np.argmax((lab > 0).sum((0, 1))))


def test_render_several_mask_files_named_by_file(chaos: tuple[Path, Path], tmp_path: Path) -> None:
    image, label = chaos
    truth = np.asarray(nib.load(str(label)).dataobj)
    liver = write_like(label, (truth == 1).astype(np.uint8), tmp_path / "liver.nii.gz")
    spleen = write_like(label, (truth == 4).astype(np.uint8) * 255, tmp_path / "spleen.nii.gz")
    info = render(image, [liver, spleen], tmp_path / "two.png")
    assert [r["name"] for r in info["labels"]] == ["liver", "spleen"]
    assert info["labels"][1]["voxels"] == int((truth == 4).sum())


def test_promptseg_run_sidecar_names_labels(tmp_path: Path) -> None:
    """A label map with a promptseg-run sidecar beside it is named by the sidecar."""
    data = np.asarray(nib.load(str(EXAMPLE_LABEL)).dataobj).astype(np.uint8)
    data[data == 2] = 0  # label 2 named but absent
    mask = write_like(EXAMPLE_LABEL, data, tmp_path / "m.nii.gz")
    labels = {str(k): {"prompt": f"the {n}", "target": n} for k, n in CHAOS_NAMES.items()}
    sidecar = {"format": "promptseg-labels", "version": 1, "background": 0, "labels": labels}
    (tmp_path / "m.labels.json").write_text(json.dumps(sidecar))
    info = render(EXAMPLE, [mask], tmp_path / "m.png")
    assert [r["name"] for r in info["labels"]] == list(CHAOS_NAMES.values())
    assert info["empty"] == ["right kidney"]


def test_empty_mask_gives_a_picture_that_says_so(tmp_path: Path) -> None:
    empty = write_like(EXAMPLE_LABEL, np.zeros((256, 256, 37), np.uint8), tmp_path / "e.nii.gz")
    out = tmp_path / "empty.png"
    assert main(["render", str(EXAMPLE), str(empty), "-o", str(out)]) == 0
    assert png_size(out) == SIZE
    info = render(EXAMPLE, [empty], tmp_path / "again.png")
    assert info["empty"] == ["e"] and info["labels"][0]["voxels"] == 0


def _bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str, str]]:
    """name -> (arguments after 'render', file the message must name, words it must say)."""
    lab = np.asarray(nib.load(str(EXAMPLE_LABEL)).dataobj)
    small = write_like(EXAMPLE_LABEL, lab[:, :, :20].astype(np.uint8), tmp_path / "small.nii.gz")
    shifted_affine = nib.load(str(EXAMPLE_LABEL)).affine.copy()
    shifted_affine[0, 3] += 50
    shifted = write_like(
        EXAMPLE_LABEL, lab.astype(np.uint8), tmp_path / "shift.nii.gz", shifted_affine
    )
    frac = write_like(EXAMPLE_LABEL, (lab * 0.5).astype(np.float32), tmp_path / "frac.nii.gz")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a nifti file at all")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    ex, exl, out = str(EXAMPLE), str(EXAMPLE_LABEL), "-o"
    pic = str(tmp_path / "out.png")
    return {
        "missing volume": (
            [str(tmp_path / "nope.nii.gz"), exl, out, pic],
            "nope.nii.gz",
            "not found",
        ),
        "missing mask": ([ex, str(tmp_path / "gone.nii.gz"), out, pic], "gone.nii.gz", "not found"),
        "shape mismatch": ([ex, str(small), out, pic], "small.nii.gz", "does not match"),
        "affine mismatch": ([ex, str(shifted), out, pic], "shift.nii.gz", "affine"),
        "not integer": ([ex, str(frac), out, pic], "frac.nii.gz", "integer"),
        "not nifti": ([ex, str(garbage), out, pic], "garbage.nii.gz", ""),
        "bad labels json": ([ex, exl, "--labels", str(bad_json), out, pic], "bad.json", "JSON"),
        "not png": ([ex, exl, out, str(tmp_path / "out.jpg")], "out.jpg", ".png"),
    }


def test_bad_inputs_one_line_exit_2_no_output(tmp_path: Path, capsys) -> None:
    cases = _bad_cases(tmp_path)
    for name, (args, named, words) in cases.items():
        code = main(["render", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and err.startswith("promptseg render: error: "), err
        assert named in err and words in err, (name, err)
        assert not (tmp_path / "out.png").exists() and not (tmp_path / "out.jpg").exists(), name
        assert leftovers(tmp_path) == [], name


def test_render_api_raises_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="labels file not found"):
        render(EXAMPLE, [EXAMPLE_LABEL], tmp_path / "x.png", labels_json=tmp_path / "no.json")
    with pytest.raises(InputError, match="is an input"):
        render(EXAMPLE, [tmp_path / "a.png"], tmp_path / "a.png")
    assert sorted(tmp_path.iterdir()) == []


def test_render_module_does_not_import_torch() -> None:
    code = "import sys, promptseg.render; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# --------------------------------------------------------------------------- promptseg-run --render


def _run(*args: object) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("promptseg-run")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "promptseg.runtime.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PROMPTSEG_DEBUG", None)
    return subprocess.run(
        [*cmd, *map(str, args), "--threads", "1", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def default_engine() -> Path:
    if not (DEFAULT_ENGINE_DIR / "manifest.json").is_file():
        pytest.skip(f"the shipped default engine is missing ({DEFAULT_ENGINE_DIR}/manifest.json)")
    return DEFAULT_ENGINE_DIR


def test_promptseg_run_render_example(default_engine: Path, tmp_path: Path) -> None:
    mask, pic, summary = tmp_path / "liver.nii.gz", tmp_path / "liver.png", tmp_path / "s.json"
    proc = _run(EXAMPLE, "--prompt", "liver", "-o", mask, "--render", pic, "--json", summary)
    assert proc.returncode == 0, proc.stderr
    assert mask.is_file() and png_size(pic) == SIZE
    result = json.loads(summary.read_text())["results"][0]
    assert result["picture"] == str(pic) and result["prompts"][0]["voxels"] > 0


def test_promptseg_run_render_bad_options_write_nothing(
    default_engine: Path, data_root: Path, tmp_path: Path
) -> None:
    brain = sorted((data_root / "brain-tumor-cheng" / "images").glob("*.png"))[0]
    mask = tmp_path / "m.nii.gz"
    cases = {
        "2-D input": ([brain, "-o", tmp_path / "m.png", "--render", tmp_path / "p.png"], "2-D"),
        "not png": ([EXAMPLE, "-o", mask, "--render", tmp_path / "p.jpg"], ".png"),
        "no folder": ([EXAMPLE, "-o", mask, "--render", tmp_path / "no" / "p.png"], "folder"),
        "same as mask": ([EXAMPLE, "-o", mask, "--render", mask], "another output"),
    }
    for name, (args, words) in cases.items():
        proc = _run(*args, "--prompt", "liver")
        err = proc.stderr.strip()
        assert proc.returncode == 2, (name, err)
        assert len(err.splitlines()) == 1 and words in err, (name, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], (name, err)


def test_promptseg_run_render_checks_labels_and_folder_before_writing(
    default_engine: Path, tmp_path: Path
) -> None:
    """Too many labels to draw, or an unwritable picture folder: exit 2 before the mask is written."""
    from promptseg.render import MAX_LABELS

    out = tmp_path / "out"
    out.mkdir()
    mask = out / "m.nii.gz"
    many = [a for _ in range(MAX_LABELS + 1) for a in ("--prompt", "liver")]
    cases = {
        "too many labels": (
            [EXAMPLE, "-o", mask, "--render", out / "p.png", *many],
            f"{MAX_LABELS + 1} prompts; a picture draws at most {MAX_LABELS} labels",
        ),
    }
    if Path("/proc/self").is_dir():
        cases["unwritable folder"] = (
            [EXAMPLE, "-o", mask, "--render", "/proc/promptseg-picture.png", "--prompt", "liver"],
            "/proc/promptseg-picture.png: cannot write to folder /proc",
        )
    for name, (args, words) in cases.items():
        proc = _run(*args)
        err = proc.stderr.strip()
        assert proc.returncode == 2, (name, err)
        assert len(err.splitlines()) == 1 and words in err, (name, err)
        assert list(out.iterdir()) == [], (name, err)  # no mask, no sidecar, no picture


def test_render_draws_a_nifti_without_orientation_in_array_order(tmp_path: Path) -> None:
    """qform_code = sform_code = 0: drawn like an MRC (array order, no side letters).

    The same voxels with the same affine, once with the orientation codes set, give another
    picture: only the codes differ, so the difference is the orientation_known branch.
    """
    from PIL import Image

    from promptseg.data.readers import read_volume
    from promptseg.render import Mask, draw

    data = np.zeros((16, 12, 6), np.float32)
    data[4:10, 3:8, 1:5] = 100.0
    nib.save(nib.Nifti1Image(data, None), str(tmp_path / "plain.nii.gz"))
    plain = read_volume(tmp_path / "plain.nii.gz")
    nib.save(nib.Nifti1Image(data, plain.affine), str(tmp_path / "coded.nii.gz"))
    coded = read_volume(tmp_path / "coded.nii.gz")
    assert plain.meta["orientation_known"] is False and coded.meta["orientation_known"] is True
    np.testing.assert_array_equal(plain.affine, coded.affine)
    pictures = []
    for volume, name in ((plain, "plain.png"), (coded, "coded.png")):
        draw(volume, [Mask("blob", volume.data > 0)], tmp_path / name, title="same title")
        assert png_size(tmp_path / name) == SIZE
        with Image.open(tmp_path / name) as im:
            pictures.append(np.asarray(im.convert("RGB")))
    assert not np.array_equal(pictures[0], pictures[1])


# --------------------------------------------------------------------------- grids


def test_pick_samples_rule_labels() -> None:
    from promptseg.evaluate import pick_samples

    def sample(case: str, d: float) -> dict:
        return {"row": {"case": case, "target": "liver", "dice": d}}

    picked = pick_samples([sample("a", 0.1), sample("b", 0.9), sample("c", 0.5), sample("d", 0.3)])
    assert [(p["pick"], p["row"]["case"]) for p in picked] == [
        ("best", "b"),
        ("median", "c"),
        ("worst", "a"),
    ]
    one = pick_samples([sample("a", 0.4)])
    assert [p["pick"] for p in one] == ["best=median=worst"]


def test_grids_command_on_a_tiny_subset(data_root: Path, tmp_path: Path, capsys) -> None:
    """The CLI on the shipped model, four brain slices (2-D cases): one grid with the picks."""
    pytest.importorskip("torch")
    out = tmp_path / "grids"
    args = ["grids", "default", "--data-root", str(data_root), "--out", str(out)]
    assert main([*args, "--datasets", "brain-tumor", "--max-cases", "4"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid_brain-tumor.png"]
    width, height = png_size(out / "grid_brain-tumor.png")
    assert width == 800 and height >= 3 * 2.6 * 80  # four slices of one class: three picks
    assert "wrote" in capsys.readouterr().out


def test_grids_volume_cases_use_3d_dice(tiny_checkpoint: Path, data_root: Path, tmp_path: Path):
    """A CHAOS volume is one case per target, scored in 3-D, shown at its largest truth slice."""
    from promptseg.evaluate import overlay_grid
    from promptseg.grids import case_samples, grid_title

    samples = case_samples(tiny_checkpoint, data_root / "chaos-mr-t2spir", "chaos-mr", max_cases=1)
    targets = {"liver", "spleen", "left kidney", "right kidney"}
    assert sorted(s["row"]["target"] for s in samples) == sorted(targets)
    for s in samples:
        assert s["image"].shape == s["truth"].shape == s["pred"].shape == (256, 256)
        assert s["truth"].any() and 0.0 <= s["row"]["dice"] <= 1.0
    title = grid_title(tiny_checkpoint, "chaos-mr", "val", samples)
    assert "best, median and worst case by 3D Dice per volume" in title
    assert all(f"{t} 1" in title for t in targets)
    path = overlay_grid(samples, tmp_path / "g.png", title=title)
    assert png_size(path)[1] >= 4 * 2.6 * 80  # one row per target (best=median=worst)


def test_grids_unknown_data_root_is_exit_2(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    code = main(["grids", "default", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2 and "dataset folder not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
