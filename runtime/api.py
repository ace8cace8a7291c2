"""``promptseg.runtime.run``: the Python API that ``promptseg-run`` mirrors.

Everything is validated before the first output is written: options, the engine folder
(manifest and file sizes; each file's hash on its first use), the prompt cache and every
prompt, every input (read completely), every output path, and the image graph or plan when
the engine is opened (once, before the first input is segmented). Each output is written
atomically.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import promptseg
from promptseg.data.readers import (
    InputError,
    PathLike,
    Volume,
    write_nifti_atomic,
    write_png_atomic,
    write_text_atomic,
)
from promptseg.postprocess import POSTPROCESS_MODES
from promptseg.runtime import dicom_seg
from promptseg.runtime.engines import (
    PRECISIONS,
    BackendError,
    Engine,
    check_backend,
    select_backend,
)
from promptseg.runtime.io import (
    Image2D,
    _probe_writable,
    check_output,
    input_kind,
    labels_sidecar,
    plan_outputs,
    read_input,
)
from promptseg.runtime.manifest import EngineFolder
from promptseg.runtime.orientation import volume_reorientation
from promptseg.runtime.pipeline import (
    MODALITY_CHOICES,
    SegmentationResult,
    check_engine,
    segment,
)
from promptseg.runtime.prompt_resolver import PromptResolver, ResolvedPrompt

_CACHE_BYTES = 1 << 30  # keep validated inputs in memory up to this size, re-read the rest


def _check_options(
    backend: str,
    precision: str | None,
    batch: int,
    threshold: float,
    modality: str,
    volume: int | None,
    threads: int | None = None,
) -> None:
    try:
        check_backend(backend)
    except ValueError as exc:
        raise InputError("--backend", str(exc)) from None
    if precision is not None and precision not in PRECISIONS:
        raise InputError(
            "--precision", f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}"
        )
    if int(batch) < 1:
        raise InputError("--batch", f"must be at least 1, got {batch}")
    if not 0.0 < float(threshold) < 1.0:
        raise InputError("--threshold", f"must be between 0 and 1 (exclusive), got {threshold}")
    if modality not in MODALITY_CHOICES:
        raise InputError(
            "--modality", f"unknown modality {modality!r}; valid: {', '.join(MODALITY_CHOICES)}"
        )
    if volume is not None and int(volume) < 0:
        raise InputError("--volume", f"must be 0 or more, got {volume}")
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise InputError("--threads", f"must be a positive integer, got {threads}")


def _open_engine(
    name: str, folder: EngineFolder, precision: str | None, threads: int | None
) -> Engine:
    try:
        return select_backend(name, folder, precision, threads=threads)
    except InputError:
        raise  # already names the file (a corrupted graph or plan, a bad manifest)
    except (BackendError, ImportError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--backend {name}", first) from exc


def _write_mask(image: Volume | Image2D, result: SegmentationResult, out: Path) -> None:
    """Write the label map with the input's grid (NIfTI) or size (PNG), atomically."""
    labels = result.labels
    if isinstance(image, Image2D):
        if len(result.prompts) == 1:
            labels = (labels > 0).astype(np.uint8) * np.uint8(255)
        write_png_atomic(np.ascontiguousarray(labels, dtype=np.uint8), out)
        return
    header = None
    src = image.meta.get("nifti_header")
    if src is not None:
        header = copy.deepcopy(src)
        header["cal_min"], header["cal_max"] = 0, 0
        header["descrip"] = b"promptseg-run label map"
    write_nifti_atomic(labels, image.affine, out, header=header, dtype=np.uint8)


def _sidecar(result: SegmentationResult, inp: Path, out: Path, folder: EngineFolder) -> str:
    labels = {str(s["label"]): {"prompt": s["prompt"], "target": s["target"]} for s in result.stats}
    doc = {
        "format": "promptseg-labels",
        "version": 1,
        "input": str(inp),
        "mask": str(out),
        "background": 0,
        "labels": labels,
        "engine_manifest_sha256": folder.manifest_sha256,
    }
    return json.dumps(doc, indent=2) + "\n"


def _shape(image: Volume | Image2D) -> list[int]:
    return [int(s) for s in image.data.shape]


def run(
    inputs: Sequence[PathLike] | PathLike,
    prompts: Sequence[str] | str,
    output: PathLike | None = None,
    engine: PathLike | EngineFolder | None = None,
    *,
    backend: str = "auto",
    precision: str | None = None,
    batch: int = 16,
    threshold: float = 0.5,
    modality: str = "auto",
    json_path: PathLike | None = None,
    volume: int | None = None,
    series: str | None = None,
    threads: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    render: PathLike | None = None,
    postprocess: str = "largest",
    output_format: str = "auto",
) -> list[dict[str, Any]]:
    """Segment inputs for prompts and write masks (the API of ``promptseg-run``).

    Args:
        inputs: NIfTI files, DICOM folders (or a .dcm inside one), MRC volumes or 2-D images.
        prompts: One or several prompts; several give a label map 1..K plus a
            ``<output>.labels.json`` sidecar.
        output: One input: the mask file (default ``<stem>_mask.nii.gz`` / ``.png`` beside the
            input). Several inputs: a folder.
        engine: Engine folder (default: the packaged ``runtime/default_engine``).
        backend: "auto", "tensorrt", "ort-cuda", "ort-cpu" or "torch".
        precision: "fp32", "fp16", "int8" or None (backend default).
        batch: Slices per engine call.
        threshold: Probability threshold.
        modality: "auto", "ct" or "mr".
        json_path: Also write the summaries to this JSON file.
        volume: Volume index of a 4-D NIfTI.
        series: SeriesInstanceUID in a DICOM folder holding several series.
        threads: ONNX Runtime intra-op threads (None: its default).
        progress: Show a tqdm progress bar over slices on stderr.
        log: Called with one line per written output and per warning.
        render: Also draw a PNG picture of the label map (3-D views and an axial overlay,
            :mod:`promptseg.render`; needs ``promptseg[render]``). One volume input only.
        postprocess: "largest" (keep each organ's largest 3D component in volumes) or "none".
        output_format: "nifti", "dicom-seg" (DICOM series inputs; one segment per prompt) or
            "auto" (DICOM SEG for one input with ``output`` ending in .dcm, else NIfTI/PNG).

    Returns:
        One summary dict per input (output, backend, precision, engine hash, seconds per stage,
        and per prompt: voxels, volume_ml, slices_with_target).

    Raises:
        InputError: Any bad input, option, engine folder or prompt (one line naming it).
    """
    say = log or (lambda line: None)
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not paths:
        raise InputError(
            "INPUT", "no input given; expected NIfTI files, DICOM folders or 2-D images"
        )
    _check_options(backend, precision, batch, threshold, modality, volume, threads)
    if postprocess not in POSTPROCESS_MODES:
        raise InputError(
            "--postprocess", f"unknown mode {postprocess!r}; valid: {', '.join(POSTPROCESS_MODES)}"
        )
    t_start = time.perf_counter()
    folder = engine if isinstance(engine, EngineFolder) else EngineFolder.open(engine)
    resolver = PromptResolver(folder, threads=threads)
    resolved = resolver.resolve_all(prompt_list)
    kinds = [input_kind(p) for p in paths]
    seg = dicom_seg.wants_dicom_seg(output_format, output, len(paths))
    if seg:
        outputs = dicom_seg.plan_seg_outputs(paths, output, kinds)
    else:
        outputs = plan_outputs(paths, output, kinds)
    several = len(resolved) > 1 and not seg  # a SEG names its segments itself
    if several:
        for out in outputs:
            if out.parent.exists():
                check_output(labels_sidecar(out), paths, False, what="labels sidecar")
    if json_path is not None:
        check_output(Path(json_path), paths, False, what="JSON summary")
    if render is not None:
        _check_render(Path(render), paths, kinds, outputs, json_path, len(resolved))
    # Read every input completely before the first inference (no partial outputs).
    loaded: dict[int, tuple[Volume | Image2D, list[str], float]] = {}
    budget = _CACHE_BYTES
    for i, p in enumerate(paths):
        t = time.perf_counter()
        image, notes = read_input(p, volume_index=volume, series_uid=series)
        if image.data.nbytes <= budget:
            loaded[i] = (image, notes, time.perf_counter() - t)
            budget -= image.data.nbytes
        del image
    setup = time.perf_counter() - t_start
    summaries: list[dict[str, Any]] = []
    bar = None
    with _open_engine(backend, folder, precision, threads) as eng:
        check_engine(eng, folder.preprocessing, int(resolved[0].film.shape[-1]))
        say(f"backend: {eng.backend} ({eng.precision}; {', '.join(eng.providers)})")
        for i, (inp, out) in enumerate(zip(paths, outputs)):
            if i in loaded:
                image, notes, t_read = loaded.pop(i)
            else:
                t = time.perf_counter()
                image, notes = read_input(inp, volume_index=volume, series_uid=series)
                t_read = time.perf_counter() - t
            n_slices = (
                1
                if isinstance(image, Image2D)
                else int(image.data.shape[_slice_axis(image, folder)])
            )
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=n_slices, desc=inp.name, unit="slice", leave=False)
            try:
                result = segment(
                    image,
                    resolved,
                    eng,
                    resolver,
                    folder.preprocessing,
                    batch=batch,
                    threshold=threshold,
                    modality=modality,
                    axcodes=folder.axcodes,
                    progress=bar.update if bar is not None else None,
                    postprocess=postprocess,
                )
            finally:
                if bar is not None:
                    bar.close()
            t = time.perf_counter()
            if not out.parent.exists():  # the -o folder of several inputs (parent checked)
                out.parent.mkdir(exist_ok=True)
            if seg:
                dicom_seg.write_dicom_seg(
                    image,
                    result.labels,
                    dicom_seg.segments_of(result.stats),
                    out,
                    version=promptseg.__version__,
                    engine_id=folder.manifest_sha256,
                )
            else:
                _write_mask(image, result, out)
            sidecar = None
            if several:
                sidecar = labels_sidecar(out)
                write_text_atomic(_sidecar(result, inp, out, folder), sidecar)
            t_write = time.perf_counter() - t
            if render is not None:
                from promptseg.render import Mask, draw

                t = time.perf_counter()
                masks = [Mask(st["target"], result.labels == st["label"]) for st in result.stats]
                draw(image, masks, render, title=f"{inp.name}: promptseg-run, {eng.backend}")
                t_write += time.perf_counter() - t
            warnings_list = notes + result.warnings
            for w in warnings_list:
                say(f"warning: {inp}: {w}")
            summary = _summary(inp, out, sidecar, image, result, eng, folder, t_read, t_write)
            summary["warnings"] = warnings_list
            summary["backend_notes"] = list(eng.notes)
            if i == 0:
                summary["seconds"]["setup"] = round(setup, 4)
            summaries.append(summary)
            found = ", ".join(f"{s['target']}: {s['voxels']} voxels" for s in result.stats)
            say(f"wrote {out} ({found})")
            if render is not None:
                summary["picture"] = str(render)
                say(f"wrote {render}")
    if json_path is not None:
        write_text_atomic(json.dumps({"results": summaries}, indent=2) + "\n", json_path)
    return summaries


def _check_render(
    picture: Path,
    paths: list[Path],
    kinds: list[str],
    outputs: list[Path],
    json_path: PathLike | None,
    n_labels: int,
) -> None:
    """Validate ``--render`` before anything is written.

    One volume input, at most ``promptseg.render.MAX_LABELS`` prompts, a free .png path in a
    writable folder, and the render extra installed.
    """
    if len(paths) != 1:
        raise InputError("--render", f"draws one input's picture; got {len(paths)} inputs")
    if kinds[0] == "image":
        raise InputError(
            "--render", f"{paths[0]} is a 2-D image; pictures are drawn for volumes only"
        )
    from promptseg import render as pictures

    others = [*paths, *outputs, *([Path(json_path)] if json_path is not None else [])]
    if any(picture.resolve() == Path(o).resolve() for o in others):
        raise InputError(picture, "--render path is an input or another output; choose another")
    if n_labels > pictures.MAX_LABELS:
        raise InputError(
            "--render",
            f"{n_labels} prompts; a picture draws at most {pictures.MAX_LABELS} labels",
        )
    pictures.check_output(picture)
    _probe_writable(picture.parent, picture)
    try:
        pictures.check_available()
    except ImportError as exc:
        raise InputError("--render", str(exc).splitlines()[0]) from exc


def _slice_axis(image: Volume, folder: EngineFolder) -> int:
    """Input axis that becomes the slice axis after reorientation."""
    reo, _ = volume_reorientation(image, folder.axcodes)
    return int(reo.inverse[2, 0])


def _summary(
    inp: Path,
    out: Path,
    sidecar: Path | None,
    image: Volume | Image2D,
    result: SegmentationResult,
    eng: Engine,
    folder: EngineFolder,
    t_read: float,
    t_write: float,
) -> dict[str, Any]:
    seconds = {"read": t_read, **result.seconds, "write": t_write}
    seconds["total"] = sum(seconds.values())
    info = eng.describe()
    return {
        "input": str(inp),
        "output": str(out),
        "labels_json": str(sidecar) if sidecar is not None else None,
        "kind": image.kind,
        "shape": _shape(image),
        "modality": result.modality,
        "orientation": None if result.reorientation is None else result.reorientation.input_axcodes,
        "backend": info["backend"],
        "precision": info["precision"],
        "providers": info["providers"],
        "engine": {"path": str(folder.path), "manifest_sha256": folder.manifest_sha256},
        "promptseg_version": promptseg.__version__,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "prompts": result.stats,
    }


def resolve_prompts(
    prompts: Sequence[str], engine: PathLike | EngineFolder | None = None
) -> list[ResolvedPrompt]:
    """Resolve prompts against an engine folder without segmenting anything."""
    folder = engine if isinstance(engine, EngineFolder) else EngineFolder.open(engine)
    return PromptResolver(folder).resolve_all(list(prompts))
