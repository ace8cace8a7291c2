"""``promptseg.runtime.run``: the Python API that ``promptseg-run`` mirrors.

It plans and checks every output, reads every input, segments each with one
:class:`~promptseg.runtime.segmenter.Segmenter` and writes the results. Everything is validated before the first output is written: options, the engine folder
(manifest and file sizes; each file's hash on its first use), the prompt cache and every
prompt, every input (read completely), every output path, and the image graph or plan when
the engine is opened (once, before the first input is segmented). Each output is written
atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import promptseg
from promptseg.data.readers import Volume
from promptseg.runtime import dicom_seg
from promptseg.runtime.engines import Engine
from promptseg.runtime.errors import InputError, PathLike, first_line
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
from promptseg.runtime.pipeline import Options, SegmentationResult, check_prompt_count
from promptseg.runtime.prompt_resolver import PromptResolver, ResolvedPrompt
from promptseg.runtime.segmenter import Segmenter, SegmenterResult
from promptseg.runtime.writers import (
    atomic_write,
    write_json_atomic,
    write_png_atomic,
)

_CACHE_BYTES = 1 << 30  # keep validated inputs in memory up to this size, re-read the rest


def _write_mask(done: SegmenterResult, out: Path) -> None:
    """Write the label map with the input's grid (NIfTI) or size (PNG), atomically."""
    labels = done.labels
    if isinstance(done.image, Image2D):
        if len(done.targets) == 1:
            labels = (labels > 0).astype(np.uint8) * np.uint8(255)
        write_png_atomic(np.ascontiguousarray(labels, dtype=np.uint8), out)
        return
    import nibabel as nib

    img = done.to_nifti()
    atomic_write(out, lambda tmp: nib.save(img, str(tmp)))


@dataclass(frozen=True)
class EngineFacts:
    """The engine as summaries and label sidecars name it: a local one or a server's.

    Attributes:
        path: The engine folder.
        manifest_sha256: SHA-256 of its manifest.
        backend, precision, providers: As :meth:`Engine.describe` gives them.
        notes: The backend selection notes.
    """

    path: str
    manifest_sha256: str
    backend: str
    precision: str
    providers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, engine: Engine, folder: EngineFolder) -> EngineFacts:
        """The facts of an opened engine and its folder."""
        info = engine.describe()
        return cls(
            str(folder.path),
            folder.manifest_sha256,
            info["backend"],
            info["precision"],
            list(info["providers"]),
            list(info["notes"]),
        )

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> EngineFacts:
        """The facts in a summary written by :func:`result_summary` (a server's answer)."""
        return cls(
            summary["engine"]["path"],
            summary["engine"]["manifest_sha256"],
            summary["backend"],
            summary["precision"],
            list(summary["providers"]),
            list(summary.get("backend_notes", [])),
        )


def result_summary(result: SegmentationResult, facts: EngineFacts) -> dict[str, Any]:
    """What a run says about one segmentation: modality, orientation, engine, per prompt."""
    return {
        "modality": result.modality,
        "orientation": None if result.reorientation is None else result.reorientation.input_axcodes,
        "backend": facts.backend,
        "precision": facts.precision,
        "providers": list(facts.providers),
        "engine": {"path": facts.path, "manifest_sha256": facts.manifest_sha256},
        "promptseg_version": promptseg.__version__,
        "prompts": result.stats,
    }


def _sidecar(result: SegmentationResult, inp: Path, out: Path, facts: EngineFacts) -> dict:
    labels = {str(s["label"]): {"prompt": s["prompt"], "target": s["target"]} for s in result.stats}
    return {
        "format": "promptseg-labels",
        "version": 1,
        "input": str(inp),
        "mask": str(out),
        "background": 0,
        "labels": labels,
        "engine_manifest_sha256": facts.manifest_sha256,
    }


def check_run_args(
    inputs: Sequence[PathLike] | PathLike, prompts: Sequence[str] | str, volume: int | None
) -> tuple[list[Path], list[str]]:
    """The inputs and prompts of a run as lists, with the checks that need no engine.

    Raises:
        InputError: No input, no prompt (or more than 255), a negative ``volume``.
    """
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not paths:
        raise InputError(
            "INPUT", "no input given; expected NIfTI files, DICOM folders or 2-D images"
        )
    check_prompt_count(len(prompt_list))
    if volume is not None and int(volume) < 0:
        raise InputError("--volume", f"must be 0 or more, got {volume}")
    return paths, prompt_list


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
    presence_threshold: float | None = None,
    presence_gate: bool = True,
    output_format: str = "auto",
    server: str | None = None,
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
        presence_threshold: One presence tau for every prompt (None: the manifest's
            ``presence_thresholds``); engines with a ``presence`` output only.
        presence_gate: False keeps every slice's mask whatever the presence output says.
        output_format: "nifti", "dicom-seg" (DICOM series inputs; one segment per prompt) or
            "auto" (DICOM SEG for one input with ``output`` ending in .dcm, else NIfTI/PNG).
        server: HOST:PORT of a ``promptseg serve`` server (its HTTP port) that segments
            instead of a local engine (:mod:`promptseg.runtime.remote`; needs
            ``promptseg[serve]``); ``engine``, ``backend``, ``precision``, ``threads`` and
            ``render`` are then refused.

    Returns:
        One summary dict per input (output, backend, precision, engine hash, seconds per stage,
        and per prompt: voxels, volume_ml, slices_with_target, present,
        presence_max_probability, slices_gated).

    Raises:
        InputError: Any bad input, option, engine folder or prompt (one line naming it).
    """
    say = log or (lambda line: None)
    paths, prompt_list = check_run_args(inputs, prompts, volume)
    if server is not None:
        from promptseg.runtime.remote import check_local_only, run_remote

        check_local_only(
            **{"--engine": engine, "--backend": None if backend == "auto" else backend},
            **{"--precision": precision, "--threads": threads, "--render": render},
        )
        options = Options(
            batch, threshold, modality, postprocess, presence_threshold, presence_gate
        ).check()
        return run_remote(
            paths, prompt_list, server, output, options, json_path, volume, series,
            output_format, say,
        )  # fmt: skip
    t_start = time.perf_counter()
    seg = Segmenter(
        engine,
        backend,
        precision=precision,
        threads=threads,
        batch=batch,
        threshold=threshold,
        modality=modality,
        postprocess=postprocess,
        presence_threshold=presence_threshold,
        presence_gate=presence_gate,
        load=False,
    )
    resolved = seg.resolve(prompt_list)
    kinds = [input_kind(p) for p in paths]
    dicom = dicom_seg.wants_dicom_seg(output_format, output, len(paths))
    outputs = plan_run(paths, output, kinds, json_path, dicom)
    check_sidecars(outputs, paths, len(resolved), dicom)
    if render is not None:
        _check_render(Path(render), paths, kinds, outputs, json_path, len(resolved))
    loaded = read_inputs(paths, volume, series)
    setup = time.perf_counter() - t_start
    summaries: list[dict[str, Any]] = []
    with seg:
        eng = seg.load()
        facts = EngineFacts.of(eng, seg.folder)
        say(f"backend: {eng.backend} ({eng.precision}; {', '.join(eng.providers)})")
        for i, image, notes, t_read in each_image(paths, loaded, volume, series):
            done = seg(image, resolved, progress=progress)
            done.warnings[:0] = notes
            summary = write_result(done, paths[i], outputs[i], facts, t_read, say, dicom, render)
            if i == 0:
                summary["seconds"]["setup"] = round(setup, 4)
            summaries.append(summary)
    if json_path is not None:
        write_json_atomic({"results": summaries}, json_path)
    return summaries


def plan_run(
    paths: list[Path],
    output: PathLike | None,
    kinds: list[str],
    json_path: PathLike | None,
    dicom: bool = False,
) -> list[Path]:
    """Every output path (masks or DICOM SEGs, the JSON summary), checked before anything is
    read or written."""
    if dicom:
        outputs = dicom_seg.plan_seg_outputs(paths, output, kinds)
    else:
        outputs = plan_outputs(paths, output, kinds)
    if json_path is not None:
        check_output(Path(json_path), paths, False, what="JSON summary")
    return outputs


def check_sidecars(outputs: list[Path], paths: list[Path], n_labels: int, dicom: bool) -> None:
    """Check the labels sidecar paths a run with ``n_labels`` labels writes (a DICOM SEG names
    its segments itself: none)."""
    if n_labels > 1 and not dicom:
        for out in outputs:
            if out.parent.exists():
                check_output(labels_sidecar(out), paths, False, what="labels sidecar")


def read_inputs(
    paths: list[Path], volume: int | None, series: str | None
) -> dict[int, tuple[Volume | Image2D, list[str], float]]:
    """Read every input completely before the first inference (no partial outputs); keep
    those that fit in memory (``_CACHE_BYTES``), re-read the rest later (:func:`each_image`).

    Returns:
        Input index -> (image, reader warnings, seconds spent reading).
    """
    loaded: dict[int, tuple[Volume | Image2D, list[str], float]] = {}
    budget = _CACHE_BYTES
    for i, p in enumerate(paths):
        t = time.perf_counter()
        image, notes = read_input(p, volume_index=volume, series_uid=series)
        if image.data.nbytes <= budget:
            loaded[i] = (image, notes, time.perf_counter() - t)
            budget -= image.data.nbytes
        del image
    return loaded


def each_image(
    paths: list[Path],
    loaded: dict[int, tuple[Volume | Image2D, list[str], float]],
    volume: int | None,
    series: str | None,
) -> Iterator[tuple[int, Volume | Image2D, list[str], float]]:
    """(index, image, reader warnings, read seconds) of every input in order: the ones
    :func:`read_inputs` kept, the others read again."""
    for i, inp in enumerate(paths):
        if i in loaded:
            image, notes, t_read = loaded.pop(i)
        else:
            t = time.perf_counter()
            image, notes = read_input(inp, volume_index=volume, series_uid=series)
            t_read = time.perf_counter() - t
        yield i, image, notes, t_read


def write_result(
    done: SegmenterResult,
    inp: Path,
    out: Path,
    facts: EngineFacts,
    t_read: float,
    say: Callable[[str], None],
    dicom: bool = False,
    render: PathLike | None = None,
) -> dict[str, Any]:
    """Write one input's mask or DICOM SEG (and sidecar, picture); its summary."""
    result = done.result
    t = time.perf_counter()
    if not out.parent.exists():  # the -o folder of several inputs (parent checked)
        out.parent.mkdir(exist_ok=True)
    if dicom:
        dicom_seg.write_dicom_seg(
            done.image,
            result.labels,
            dicom_seg.segments_of(result.stats),
            out,
            version=promptseg.__version__,
            engine_id=facts.manifest_sha256,
        )
    else:
        _write_mask(done, out)
    sidecar = None
    if len(done.targets) > 1 and not dicom:
        sidecar = labels_sidecar(out)
        write_json_atomic(_sidecar(result, inp, out, facts), sidecar)
    t_write = time.perf_counter() - t
    if render is not None:
        from promptseg.render import Mask, draw

        t = time.perf_counter()
        masks = [Mask(st["target"], result.labels == st["label"]) for st in result.stats]
        draw(done.image, masks, render, title=f"{inp.name}: promptseg-run, {facts.backend}")
        t_write += time.perf_counter() - t
    for w in done.warnings:
        say(f"warning: {inp}: {w}")
    seconds = {"read": t_read, **result.seconds, "write": t_write}
    seconds["total"] = sum(seconds.values())
    summary = {
        "input": str(inp),
        "output": str(out),
        "labels_json": str(sidecar) if sidecar is not None else None,
        "kind": done.image.kind,
        "shape": [int(s) for s in done.image.data.shape],
        **result_summary(result, facts),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "warnings": list(done.warnings),
        "backend_notes": list(facts.notes),
    }
    found = ", ".join(f"{s['target']}: {s['voxels']} voxels" for s in result.stats)
    say(f"wrote {out} ({found})")
    if render is not None:
        summary["picture"] = str(render)
        say(f"wrote {render}")
    return summary


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
        raise InputError("--render", first_line(exc)) from exc


def resolve_prompts(
    prompts: Sequence[str], engine: PathLike | EngineFolder | None = None
) -> list[ResolvedPrompt]:
    """Resolve prompts against an engine folder without segmenting anything."""
    folder = engine if isinstance(engine, EngineFolder) else EngineFolder.open(engine)
    return PromptResolver(folder).resolve_all(list(prompts))
