"""Segmenter (the in-memory API) against promptseg-run, and parity's path against the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "promptseg" / "examples" / "chaos_mr_1.nii.gz"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "promptseg.runtime.cli", *args, "--quiet", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def segmenter():
    from promptseg import Segmenter

    with Segmenter(backend="ort-cpu", threads=1) as seg:
        yield seg


def test_segmenter_import_is_torch_free() -> None:
    code = "import sys; from promptseg import Segmenter; assert 'torch' not in sys.modules, 'torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_readme_python_api_example_runs(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- python-api -->\n```python\n(.*?)```", text, re.S)
    assert block, "README.md has no python-api block"
    code = block.group(1).replace("/tmp/liver_spleen.nii.gz", str(tmp_path / "ls.nii.gz"))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "['liver', 'spleen'] [True, True] (256, 256, 37) uint8" in done.stdout
    import nibabel as nib

    written = nib.load(str(tmp_path / "ls.nii.gz"))
    np.testing.assert_array_equal(written.affine, nib.load(str(EXAMPLE)).affine)
    assert set(np.unique(np.asarray(written.dataobj))) == {0, 1, 2}


def test_segmenter_gives_the_voxels_of_promptseg_run(segmenter, tmp_path: Path) -> None:
    import nibabel as nib

    out = tmp_path / "cli.nii.gz"
    done = _cli(str(EXAMPLE), "--prompt", "liver", "--prompt", "spleen", "-o", str(out))
    assert done.returncode == 0, done.stderr
    cli = np.asarray(nib.load(str(out)).dataobj)
    res = segmenter(EXAMPLE, ["liver", "spleen"])
    assert res.labels.dtype == np.uint8 and res.targets == ["liver", "spleen"]
    assert res.present == [True, True]
    np.testing.assert_array_equal(res.labels, cli)
    img = res.to_nifti()
    np.testing.assert_array_equal(img.affine, nib.load(str(EXAMPLE)).affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), cli)
    # a nibabel image in memory gives the same label map; the Segmenter is reused
    again = segmenter(nib.load(str(EXAMPLE)), ["liver", "spleen"])
    np.testing.assert_array_equal(again.labels, cli)
    np.testing.assert_array_equal(res.mask("spleen"), cli == 2)


def test_segmenter_on_a_2d_array_matches_the_png_run(segmenter, data_root, tmp_path) -> None:
    from PIL import Image

    png = data_root / "brain-tumor-cheng" / "images" / "188.png"
    out = tmp_path / "m.png"
    done = _cli(str(png), "--prompt", "meningioma", "-o", str(out))
    assert done.returncode == 0, done.stderr
    cli = np.asarray(Image.open(out))
    array = np.asarray(Image.open(png).convert("L"))  # uint8 (H, W)
    res = segmenter(array, "meningioma")
    assert res.labels.shape == array.shape and res.targets == ["meningioma"]
    np.testing.assert_array_equal((res.labels > 0).astype(np.uint8) * 255, cli)
    with pytest.raises(ValueError, match="2-D image has no affine"):
        res.to_nifti()


def test_segmenter_rejects_bad_input_in_one_line(segmenter) -> None:
    from promptseg.runtime.errors import InputError

    with pytest.raises(InputError, match=r"<array>: got a 3-D array"):
        segmenter(np.zeros((4, 4, 4), np.float32), "liver")
    with pytest.raises(InputError, match="unsupported input dict"):
        segmenter({}, "liver")
    with pytest.raises(InputError, match="--threshold: must be between 0 and 1"):
        type(segmenter)(threshold=1.5, load=False)


def test_parity_path_agrees_with_the_cli_to_the_voxel(data_root, tmp_path: Path) -> None:
    """A parity row's masks on CHAOS patient 1 are promptseg-run's on the same volume."""
    import nibabel as nib

    from promptseg.calibration.parity import _open_rows, case_masks
    from promptseg.cases import iter_cases
    from promptseg.runtime.manifest import EngineFolder
    from promptseg.runtime.prompt_resolver import PromptResolver

    folder = EngineFolder.open(None)
    prompt = "Segment the spleen"  # parity's canonical prompt
    films = {"spleen": PromptResolver(folder).resolve(prompt).film}
    rows, engines = _open_rows(folder, None, "no checkpoint in this test", films, 1)
    try:
        row = next(r for r in rows if r.name == "onnxruntime-fp32")
        case = next(
            c
            for c in iter_cases("chaos-mr", data_root / "chaos-mr-t2spir", "val")
            if c.case_id == "chaos/1"
        )
        taus = folder.manifest["presence_thresholds"]  # what parity gates with by default
        for postprocess, gate in (("largest", True), ("none", False)):
            masks = case_masks(row, case, ["spleen"], folder.preprocessing, threshold=0.5,
                               batch=16, postprocess=postprocess,
                               taus=taus if gate else None)  # fmt: skip
            out = tmp_path / f"{postprocess}.nii.gz"
            done = _cli(str(EXAMPLE), "--prompt", prompt, "--backend", "ort-cpu",
                        "--postprocess", postprocess, "-o", str(out),
                        *([] if gate else ["--no-presence-gate"]))  # fmt: skip
            assert done.returncode == 0, done.stderr
            cli = np.asarray(nib.load(str(out)).dataobj).transpose(2, 0, 1)  # LAS -> (Z, H, W)
            assert masks[0].any()
            np.testing.assert_array_equal(masks[0], cli == 1)
    finally:
        for engine in engines:
            engine.close()


def test_presence_gate_empties_the_slices_below_tau(tiny_checkpoint) -> None:
    """A UNet whose forward returns (mask, presence): TorchEngine outputs ``presence`` and the
    slice path empties exactly the slices whose presence probability is below tau."""
    torch = pytest.importorskip("torch")
    from promptseg.checkpoint import load_checkpoint
    from promptseg.data.readers import read_volume
    from promptseg.preprocess import sigmoid
    from promptseg.runtime.slices import segment_slices
    from promptseg.runtime.torch_engine import TorchEngine

    loaded = load_checkpoint(tiny_checkpoint)
    unet = loaded.model.unet

    class MaskOnly(torch.nn.Module):
        """The UNet's mask logits alone (a network without a presence output)."""

        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config, self.film_dim = unet, unet.config, unet.film_dim

        def forward(self, image, film):
            return self.inner(image, film)[0]

    class WithPresence(MaskOnly):
        """The mask logits plus a presence logit: each slice's highest mask logit."""

        def forward(self, image, film):
            mask = super().forward(image, film)
            return mask, mask.amax(dim=(2, 3))

    plain, gated = TorchEngine.from_unet(MaskOnly()), TorchEngine.from_unet(WithPresence())
    assert [s.name for s in TorchEngine.from_unet(unet).outputs] == ["logits", "presence"]
    assert [s.name for s in plain.outputs] == ["logits"]
    assert [s.name for s in gated.outputs] == ["logits", "presence"]
    slices = read_volume(EXAMPLE).data.transpose(2, 0, 1)[10:22]
    with torch.no_grad():
        film = loaded.model.film(loaded.embedding(loaded.vocabulary.canonical("liver"))[None])
    films = [film[0].numpy()]
    run = dict(batch=len(slices))  # one batch, as the presence reference below
    ref = segment_slices(
        plain, slices, films, loaded.preprocessing, "mr", probabilities=True, **run
    )
    threshold = float(np.median(ref.probabilities))  # masks on about half of the pixels
    ref = segment_slices(
        plain, slices, films, loaded.preprocessing, "mr", threshold=threshold, **run
    )
    off = segment_slices(
        gated, slices, films, loaded.preprocessing, "mr", threshold=threshold, **run
    )
    np.testing.assert_array_equal(off.masks, ref.masks)  # no tau: no gate
    presence = sigmoid(gated.infer(_inputs(slices, films[0], loaded))["presence"][:, 0])
    tau = float(np.median(presence))
    on = segment_slices(gated, slices, films, loaded.preprocessing, "mr", threshold=threshold,
                        presence_thresholds=[tau], **run)  # fmt: skip
    below = presence < tau
    assert 0 < below.sum() < len(slices) and ref.masks[0][below].any()
    assert not on.masks[0][below].any()
    np.testing.assert_array_equal(on.masks[0][~below], ref.masks[0][~below])
    report = on.presence[0]
    assert report.slices_gated == int(below.sum()) and report.threshold == tau
    assert report.max_probability == pytest.approx(float(presence.max()))
    assert off.presence[0].slices_gated == 0 and off.presence[0].max_probability is not None
    assert ref.presence[0].max_probability is None


def _inputs(slices: np.ndarray, film: np.ndarray, loaded) -> dict[str, np.ndarray]:
    """Model inputs of all slices, prepared as the slice path does."""
    from promptseg.preprocess import normalize, resize_bilinear

    res = loaded.config.resolution
    image = resize_bilinear(normalize(slices, "mr", loaded.preprocessing), (res, res))[:, None]
    return {"image": image, "film": np.repeat(film[None], len(slices), 0).astype(np.float32)}
