"""DICOM SEG output of ``promptseg-run``: real series written here, the real CLI, read back.

The series holds CHAOS patient 1 (real MR) in the same world as its NIfTI file; the shipped
default engine segments it. Every SEG is read back with highdicom and rebuilt on the source
grid, and compared voxel for voxel with the NIfTI output of the same series.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from promptseg.runtime.manifest import DEFAULT_ENGINE_DIR
from tests.test_runtime_cli import _ok, run_cli

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

CHAOS_IMAGE = Path("chaos-mr-t2spir") / "image_1.nii.gz"
PROMPTS = ("liver", "spleen")


def write_chaos_series(nifti: Path, folder: Path, *, shuffle: bool = True) -> list[Path]:
    """CHAOS patient 1 as a DICOM series with the NIfTI's world geometry (files in slice order)."""
    from promptseg.data.dicom_writer import write_dicom_series

    img = nib.load(str(nifti))
    data = np.asarray(img.dataobj, dtype=np.float64)
    top = img.affine @ np.array([0, 0, data.shape[2] - 1, 1.0])
    return write_dicom_series(
        data[:, :, ::-1],
        folder,
        spacing=(1.25, 1.25, 7.7),
        orientation=(1, 0, 0, 0, -1, 0),
        origin=(-top[0], -top[1], top[2]),
        modality="MR",
        shuffle_files=shuffle,
    )


def reverse_instance_order(files: list[Path]) -> None:
    """Number the instances top-down and name the files in that order (positions unchanged)."""
    n = len(files)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(str(f))
        ds.InstanceNumber = n - k
        f.unlink()
        pydicom.dcmwrite(str(f.with_name(f"slice_{n - k:03d}.dcm")), ds, enforce_file_format=True)


def seg_content(path: Path) -> tuple[list[tuple], dict[tuple, np.ndarray]]:
    """(segment descriptions, {rounded frame position: (rows, columns) label plane})."""
    seg = hd.seg.segread(str(path))
    segments = []
    for number in seg.get_segment_numbers():
        desc = seg.get_segment_description(number)
        modifiers = tuple(
            m.CodeValue
            for m in getattr(
                desc.SegmentedPropertyTypeCodeSequence[0],
                "SegmentedPropertyTypeModifierCodeSequence",
                [],
            )
        )
        segments.append((number, desc.segment_label, desc.segmented_property_type.value, modifiers))
    planes: dict[tuple, np.ndarray] = {}
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        pos = tuple(round(float(v), 2) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        plane = planes.setdefault(pos, np.zeros((seg.Rows, seg.Columns), np.uint8))
        plane[seg.pixel_array[i] > 0] = number
    return segments, planes


@pytest.fixture(scope="module")
def engine() -> Path:
    if not (DEFAULT_ENGINE_DIR / "manifest.json").is_file():
        pytest.skip(f"the shipped default engine is missing ({DEFAULT_ENGINE_DIR})")
    return DEFAULT_ENGINE_DIR


@pytest.fixture(scope="module")
def series(data_root: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seg") / "chaos1"
    write_chaos_series(data_root / CHAOS_IMAGE, folder)
    return folder


def segment(inp: Path | list[Path], out: Path, engine: Path, *extra: object) -> None:
    inputs = inp if isinstance(inp, list) else [inp]
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    _ok(run_cli(*inputs, *args, "-o", out, "--engine", engine, "--quiet", *extra))


@pytest.fixture(scope="module")
def seg_file(series: Path, engine: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg-out") / "chaos1.dcm"
    segment(series, out, engine)
    return out


def test_seg_round_trips_to_the_nifti_voxels(
    series: Path, seg_file: Path, engine: Path, tmp_path: Path
) -> None:
    from promptseg.data.readers import read_volume
    from promptseg.runtime.dicom_seg import read_seg_labels

    nifti = tmp_path / "chaos1.nii.gz"
    segment(series, nifti, engine)
    expected = np.asarray(nib.load(str(nifti)).dataobj)
    source = read_volume(series)
    labels = read_seg_labels(seg_file, source.meta["files"])
    assert labels.shape == expected.shape
    for k in (1, 2):
        assert (expected == k).sum() > 1000, f"label {k} is (nearly) empty: nothing to compare"
    np.testing.assert_array_equal(labels, expected)

    seg = hd.seg.segread(str(seg_file))
    assert seg.SegmentationType == "BINARY"
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.FrameOfReferenceUID == pydicom.dcmread(source.meta["files"][0]).FrameOfReferenceUID
    liver, spleen = (seg.get_segment_description(n) for n in (1, 2))
    assert liver.segment_label == "liver" and spleen.segment_label == "spleen"
    assert liver.segmented_property_type.value == "10200004"  # SNOMED CT Liver
    assert spleen.segmented_property_type.value == "78961009"  # SNOMED CT Spleen
    alg = liver.SegmentationAlgorithmIdentificationSequence[0]
    algorithm = alg.AlgorithmName, alg.AlgorithmVersion
    import promptseg

    assert algorithm == ("promptseg", promptseg.__version__)
    # Each frame references the source instance at its own position.
    uid_pos = {}
    for f in source.meta["files"]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        uid_pos[ds.SOPInstanceUID] = [round(float(v), 3) for v in ds.ImagePositionPatient]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert uid_pos[ref] == pos


def test_file_names_and_instance_order_do_not_change_the_seg(
    seg_file: Path, data_root: Path, engine: Path, tmp_path: Path
) -> None:
    flipped = tmp_path / "flipped"
    reverse_instance_order(write_chaos_series(data_root / CHAOS_IMAGE, flipped, shuffle=False))
    out = tmp_path / "flipped.dcm"
    segment(flipped, out, engine)
    segments_a, planes_a = seg_content(seg_file)
    segments_b, planes_b = seg_content(out)
    assert segments_a == segments_b
    assert sorted(planes_a) == sorted(planes_b) and planes_a
    for pos in planes_a:
        np.testing.assert_array_equal(planes_a[pos], planes_b[pos])


def test_kidney_segments_carry_laterality(series: Path, engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "kidneys.dcm"
    _ok(
        run_cli(
            series,
            "--prompt",
            "left kidney",
            "--prompt",
            "right kidney",
            "-o",
            out,
            "--engine",
            engine,
            "--quiet",
        )
    )
    segments, _ = seg_content(out)
    assert segments == [
        (1, "left kidney", "64033007", ("7771000",)),  # Kidney, modifier Left
        (2, "right kidney", "64033007", ("24028007",)),  # Kidney, modifier Right
    ]


def test_output_format_dicom_seg_for_several_series(
    series: Path, seg_file: Path, data_root: Path, engine: Path, tmp_path: Path
) -> None:
    second = tmp_path / "second"
    shutil.copytree(series, second)
    out = tmp_path / "segs"
    segment([series, second], out, engine, "--output-format", "dicom-seg")
    assert sorted(p.name for p in out.iterdir()) == ["chaos1_seg.dcm", "second_seg.dcm"]
    want = seg_content(seg_file)
    for name in ("chaos1_seg.dcm", "second_seg.dcm"):
        got = seg_content(out / name)
        assert got[0] == want[0]
        for pos in want[1]:
            np.testing.assert_array_equal(got[1][pos], want[1][pos])


@pytest.mark.parametrize("kind", ["nifti", "png"])
def test_non_dicom_input_with_a_dcm_output_is_refused(
    kind: str, data_root: Path, engine: Path, tmp_path: Path
) -> None:
    if kind == "nifti":
        inp = data_root / CHAOS_IMAGE
    else:
        inp = next((data_root / "brain-tumor-cheng").rglob("*.png"), None)
        if inp is None:
            pytest.skip("no PNG in the brain-tumor data")
    out = tmp_path / "x.dcm"
    proc = run_cli(inp, "--prompt", "liver", "-o", out, "--engine", engine)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{inp}: is a {kind if kind == 'nifti' else 'image'}" in lines[0]
    assert "DICOM SEG" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_dciodvfy_accepts_the_seg(seg_file: Path) -> None:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    proc = subprocess.run([tool, str(seg_file)], capture_output=True, text=True, timeout=120)
    report = proc.stdout + proc.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    assert "Segmentation" in report
