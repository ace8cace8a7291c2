"""Tests for promptseg.data.readers and promptseg.data.dicom_writer."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from promptseg.data.dicom_writer import write_dicom_series
from promptseg.data.readers import (
    InputError,
    Volume,
    _atomic_write,
    detect_kind,
    read_dicom_series,
    read_image_2d,
    read_mask_2d,
    read_mrc,
    read_nifti,
    read_volume,
    write_nifti_atomic,
    write_png_atomic,
    write_text_atomic,
)

REPO = Path(__file__).resolve().parents[1]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def data_root() -> Path:
    """The shared real-data folder (skips the test when it is absent)."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"real data folder not found: {root}")
    return root


@pytest.fixture(scope="module")
def chaos(data_root: Path) -> Volume:
    """CHAOS MR T2-SPIR patient 1."""
    return read_nifti(data_root / "chaos-mr-t2spir" / "image_1.nii.gz")


def _assert_input_error(exc: pytest.ExceptionInfo[InputError], path: Path) -> str:
    """Check an InputError message is one line naming the file; return it."""
    msg = str(exc.value)
    assert path.name in msg
    assert "\n" not in msg
    return msg


def _no_temp_files(folder: Path) -> bool:
    """True if no atomic-write temp file is left in ``folder``."""
    return not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------- real files


def test_read_nifti_chaos(chaos: Volume, data_root: Path) -> None:
    path = data_root / "chaos-mr-t2spir" / "image_1.nii.gz"
    ref = nib.load(str(path))
    assert chaos.kind == "nifti" and chaos.source == str(path)
    assert chaos.data.shape == (256, 256, 37) and chaos.data.dtype == np.float32
    np.testing.assert_allclose(chaos.spacing, (1.25, 1.25, 7.7), rtol=1e-5)
    np.testing.assert_allclose(chaos.affine, ref.affine)
    assert chaos.affine.shape == (4, 4) and chaos.affine.dtype == np.float64
    assert chaos.meta["nifti_header"] is not None
    assert 0.0 <= chaos.data.min() and chaos.data.max() < 5000.0


def test_nifti_orientation_known_follows_the_header_codes(chaos: Volume, tmp_path: Path) -> None:
    assert chaos.meta["orientation_known"] is True  # CHAOS: qform_code = sform_code = 1
    data = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    plain = nib.Nifti1Image(data, None)  # no affine: both codes stay 0
    assert int(plain.header["qform_code"]) == 0 and int(plain.header["sform_code"]) == 0
    nib.save(plain, str(tmp_path / "plain.nii"))
    vol = read_nifti(tmp_path / "plain.nii")
    assert vol.meta["orientation_known"] is False
    np.testing.assert_array_equal(vol.data, data)  # still read, in the file's voxel order
    sform_only = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    sform_only.header.set_qform(None, code=0)
    nib.save(sform_only, str(tmp_path / "sform.nii"))
    assert read_nifti(tmp_path / "sform.nii").meta["orientation_known"] is True


def test_read_brain_png_and_mask(data_root: Path) -> None:
    image, info = read_image_2d(data_root / "brain-tumor-cheng" / "images" / "10.png")
    assert image.shape == (512, 512) and image.dtype == np.float32
    assert info == {"bit_depth": 8, "mode": "L", "was_rgb": False}
    assert 0.0 <= image.min() and image.max() <= 255.0
    mask = read_mask_2d(data_root / "brain-tumor-cheng" / "masks" / "10_mask.png")
    assert mask.dtype == bool and mask.shape == (512, 512)
    assert 0 < mask.sum() < mask.size


def test_read_btcv_png(data_root: Path) -> None:
    path = next(iter(sorted((data_root / "btcv-ct-slices" / "img").glob("*.png"))))
    image, info = read_image_2d(path)
    assert image.shape == (257, 257) and image.dtype == np.float32
    assert info["bit_depth"] == 8 and info["mode"] in ("RGB", "L")
    pil_gray = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert np.abs(image - pil_gray).max() <= 1.0


def test_read_lits_mrc(data_root: Path) -> None:
    import mrcfile

    path = data_root / "lits-ct" / "img_117.mrc"
    vol = read_mrc(path)
    assert vol.kind == "mrc" and vol.data.shape == (128, 128, 128)
    assert vol.data.dtype == np.float32
    assert vol.spacing == (1.0, 1.0, 1.0) and vol.meta["voxel_size_missing"]
    with mrcfile.open(str(path)) as mrc:
        np.testing.assert_array_equal(vol.data, mrc.data.transpose(2, 1, 0))
    assert vol.data.min() < -500.0  # CT in HU: air
    assert read_volume(path).data.shape == (128, 128, 128)


# --------------------------------------------------------------------------- DICOM


def _crop_with_affine(
    vol: Volume, start: tuple[int, int, int], size: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a volume; return (data, affine of the crop)."""
    (i, j, k), (a, b, c) = start, size
    shift = np.eye(4)
    shift[:3, 3] = start
    return vol.data[i : i + a, j : j + b, k : k + c].copy(), vol.affine @ shift


def _slope(files: list[Path]) -> float:
    """RescaleSlope of the first file of a series."""
    return float(pydicom.dcmread(str(files[0])).RescaleSlope)


def test_dicom_roundtrip_matches_nifti_geometry(chaos: Volume, tmp_path: Path) -> None:
    crop, affine = _crop_with_affine(chaos, (100, 90, 5), (24, 20, 6))
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row, col = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    if np.dot(lps[:3, 2], np.cross(row, col)) < 0:  # slices must step along the normal
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1.0, crop.shape[2] - 1
        crop, affine = crop[:, :, ::-1], affine @ flip
        lps = LPS_TO_RAS @ affine
    files = write_dicom_series(
        crop, tmp_path, spacing=tuple(spacing), orientation=(*row, *col), origin=lps[:3, 3]
    )
    assert sorted(files) != files  # file names do not give the slice order
    numbers = [int(pydicom.dcmread(str(f)).InstanceNumber) for f in files]
    assert numbers != sorted(numbers)

    vol = read_dicom_series(tmp_path)
    assert vol.kind == "dicom" and vol.meta["modality"] == "MR"
    assert vol.meta["files"] == [str(f) for f in files]
    np.testing.assert_allclose(vol.data, crop, atol=_slope(files) / 2 + 1e-3)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, chaos.spacing, rtol=1e-5)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix (3, 3) from angles in degrees about x, y, z."""
    x, y, z = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_dicom_oblique_affine_maps_voxel_centres(chaos: Volume, tmp_path: Path) -> None:
    crop, _ = _crop_with_affine(chaos, (80, 120, 10), (16, 12, 5))
    crop = crop * 0.37 - 1000.0  # non-integer values exercise RescaleSlope/Intercept
    rot = _rotation(20.0, -15.0, 30.0)
    files = write_dicom_series(
        crop,
        tmp_path,
        spacing=(0.8, 1.1, 2.5),
        orientation=(*rot[:, 0], *rot[:, 1]),
        origin=(-50.5, 30.25, 12.0),
        modality="CT",
        seed=3,
    )
    vol = read_dicom_series(tmp_path)
    assert vol.meta["modality"] == "CT"
    np.testing.assert_allclose(vol.data, crop, atol=_slope(files) / 2 + 1e-3)
    ni, nj = crop.shape[0] - 1, crop.shape[1] - 1
    for k, file in enumerate(files):
        ds = pydicom.dcmread(str(file))
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        for i, j in ((0, 0), (ni, 0), (0, nj), (ni, nj), (3, 7)):
            lps = ipp + i * col_spacing * iop[:3] + j * row_spacing * iop[3:]
            world = vol.affine @ np.array([i, j, k, 1.0])
            np.testing.assert_allclose(world[:3], lps * [-1, -1, 1], atol=1e-4)
        np.testing.assert_allclose(
            vol.data[:, :, k],
            ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
        )
    np.testing.assert_allclose(vol.spacing, (0.8, 1.1, 2.5), rtol=1e-6)


def _write_non_image_dicom(path: Path) -> None:
    """Write a DICOM file with no image (like a DICOMDIR) that readers must skip."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientID = "X"
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)


def test_dicom_several_series(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    uid_a, uid_b = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    vol_a = rng.integers(0, 1000, size=(8, 6, 4)).astype(np.float32)
    vol_b = rng.integers(-1000, 1000, size=(8, 6, 3)).astype(np.float32)
    files_a = write_dicom_series(vol_a, tmp_path, series_uid=uid_a, description="T2 SPIR")
    write_dicom_series(vol_b, tmp_path, series_uid=uid_b, modality="CT", seed=1)
    (tmp_path / "README.txt").write_text("not dicom\n")
    _write_non_image_dicom(tmp_path / "DICOMDIR")

    with pytest.raises(InputError) as exc:
        read_dicom_series(tmp_path)
    msg = _assert_input_error(exc, tmp_path)
    assert uid_a in msg and uid_b in msg and "--series" in msg and "T2 SPIR" in msg
    assert "(4 slices)" in msg and "(3 slices)" in msg

    np.testing.assert_array_equal(read_dicom_series(tmp_path, uid_b).data, vol_b)
    np.testing.assert_array_equal(read_volume(tmp_path, series_uid=uid_a).data, vol_a)
    np.testing.assert_array_equal(read_volume(files_a[0]).data, vol_a)  # one file: its series
    with pytest.raises(InputError, match="not found"):
        read_dicom_series(tmp_path, "1.2.3.4")


def test_dicom_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        read_dicom_series(tmp_path)
    _assert_input_error(exc, tmp_path)
    (tmp_path / "README").write_text("no images here\n")
    with pytest.raises(InputError, match="no DICOM image"):
        read_volume(tmp_path)


def test_dicom_gap_warns(tmp_path: Path) -> None:
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    files = write_dicom_series(vol, tmp_path)
    files[3].unlink()
    with pytest.warns(UserWarning, match="not uniform"):
        read_dicom_series(tmp_path)


# --------------------------------------------------------------------------- bad inputs


def _nifti(path: Path, data: np.ndarray) -> Path:
    """Save ``data`` as a NIfTI file at ``path``."""
    nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])).to_filename(str(path))
    return path


def _missing(tmp: Path, root: Path) -> Path:
    return tmp / "missing.nii.gz"


def _empty(tmp: Path, root: Path) -> Path:
    path = tmp / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def _truncated(tmp: Path, root: Path) -> Path:
    raw = (root / "chaos-mr-t2spir" / "image_1.nii.gz").read_bytes()
    path = tmp / "truncated.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _png_renamed(tmp: Path, root: Path) -> Path:
    path = tmp / "renamed_png.nii.gz"
    path.write_bytes((root / "brain-tumor-cheng" / "images" / "10.png").read_bytes())
    return path


def _two_d(tmp: Path, root: Path) -> Path:
    return _nifti(tmp / "flat.nii.gz", np.zeros((8, 8), np.float32))


def _nan(tmp: Path, root: Path) -> Path:
    data = np.ones((6, 5, 4), np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    return _nifti(tmp / "nan.nii.gz", data)


def _unknown_suffix(tmp: Path, root: Path) -> Path:
    path = tmp / "scan.xyz"
    path.write_bytes(b"abc")
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_missing, "not found"),
        (_empty, "empty"),
        (_truncated, "truncated gzip stream"),
        (_png_renamed, "PNG"),
        (_two_d, "expected a 3-D volume"),
        (_nan, "3 NaN and 1 Inf"),
        (_unknown_suffix, ".nii.gz"),
    ],
)
def test_bad_inputs(
    make: Callable[[Path, Path], Path], expected: str, tmp_path: Path, data_root: Path
) -> None:
    path = make(tmp_path, data_root)
    with pytest.raises(InputError) as exc:
        read_volume(path)
    assert expected in _assert_input_error(exc, path)


def test_4d_nifti(tmp_path: Path) -> None:
    data = np.arange(6 * 5 * 4 * 3, dtype=np.float32).reshape(6, 5, 4, 3)
    path = _nifti(tmp_path / "series4d.nii.gz", data)
    with pytest.raises(InputError) as exc:
        read_nifti(path)
    msg = _assert_input_error(exc, path)
    assert "(6, 5, 4, 3)" in msg and "--volume" in msg
    np.testing.assert_array_equal(read_volume(path, volume_index=1).data, data[..., 1])
    with pytest.raises(InputError, match="out of range"):
        read_nifti(path, volume_index=3)
    single = _nifti(tmp_path / "single.nii.gz", data[..., :1])
    assert read_nifti(single).data.shape == (6, 5, 4)


def test_detect_kind(tmp_path: Path) -> None:
    assert detect_kind(tmp_path) == "dicom"
    assert detect_kind("a/SCAN.NII.GZ") == "nifti"
    assert detect_kind("a/x.nii") == "nifti"
    assert detect_kind("a/x.dcm") == "dicom"
    assert detect_kind("a/x.mrc") == "mrc"
    assert {detect_kind(f"x.{s}") for s in ("png", "jpg", "jpeg", "tif", "tiff")} == {"image"}


def test_read_volume_rejects_2d_image(tmp_path: Path) -> None:
    path = tmp_path / "slice.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    with pytest.raises(InputError, match="2-D image"):
        read_volume(path)


def test_read_image_2d_16bit_and_float_tiff(tmp_path: Path) -> None:
    import tifffile

    png16 = tmp_path / "img16.png"
    Image.fromarray(np.full((3, 4), 40000, np.uint16)).save(png16)
    image, info = read_image_2d(png16)
    assert info["bit_depth"] == 16 and image.max() == 40000.0
    tif = tmp_path / "float.tif"
    values = np.linspace(-1000.0, 2000.0, 12).reshape(3, 4)
    tifffile.imwrite(tif, values)  # float64: PIL cannot read it
    image, _ = read_image_2d(tif)
    np.testing.assert_allclose(image, values, rtol=1e-6)
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(InputError) as exc:
        read_image_2d(bad)
    _assert_input_error(exc, bad)


def test_readers_import_without_optional_packages() -> None:
    code = (
        "import sys, promptseg.data.readers, promptseg.data.dicom_writer\n"
        "bad = {'nibabel', 'pydicom', 'mrcfile', 'PIL', 'tifffile', 'torch'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


def test_missing_optional_package_names_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.dcm").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r"promptseg\[dicom\]"):
        read_dicom_series(tmp_path)
    monkeypatch.setitem(sys.modules, "mrcfile", None)
    with pytest.raises(ImportError, match=r"promptseg\[train\]"):
        read_mrc(tmp_path / "a.dcm")


# --------------------------------------------------------------------------- atomic writes


def test_write_nifti_atomic_roundtrip(tmp_path: Path) -> None:
    src = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), np.diag([-1.2, 1.3, 4.0, 1.0]))
    src.header.set_slope_inter(2.0, 5.0)  # must not leak into the written mask
    mask = np.zeros((6, 5, 4), bool)
    mask[1:3, 2:4, 1] = True
    out = write_nifti_atomic(mask, src.affine, tmp_path / "mask.nii.gz", header=src.header)
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), mask.astype(np.uint8))
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-6)
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip-compressed
    assert _no_temp_files(tmp_path)


def test_write_png_and_text_atomic(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    png = write_png_atomic(arr, tmp_path / "m.png")
    np.testing.assert_array_equal(np.asarray(Image.open(png)), arr)
    txt = write_text_atomic("report\n", tmp_path / "r.txt")
    assert txt.read_text() == "report\n"
    assert _no_temp_files(tmp_path)
    with pytest.raises(TypeError):
        write_png_atomic(arr.astype(np.float32), tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


def test_atomic_write_failures_leave_nothing(tmp_path: Path) -> None:
    target = tmp_path / "nofolder" / "seg.nii.gz"
    with pytest.raises(InputError) as exc:
        write_nifti_atomic(np.zeros((2, 2, 2)), np.eye(4), target)
    _assert_input_error(exc, target)
    assert not target.exists()

    target = tmp_path / "seg.nii.gz"
    with pytest.raises(TypeError):
        write_nifti_atomic(np.array([["a"]], dtype=object), np.eye(4), target)
    assert not target.exists()

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    existing = tmp_path / "keep.txt"
    existing.write_text("old")
    for path in (tmp_path / "new.txt", existing):
        with pytest.raises(RuntimeError):
            _atomic_write(path, half_then_fail)
    assert not (tmp_path / "new.txt").exists()
    assert existing.read_text() == "old"
    assert _no_temp_files(tmp_path)
