"""``Segmenter``: the in-memory API (torch-free).

    >>> from promptseg import Segmenter
    >>> seg = Segmenter()                                  # doctest: +SKIP
    >>> res = seg("scan.nii.gz", ["liver", "spleen"])      # doctest: +SKIP
    >>> res.labels, res.targets, res.present               # doctest: +SKIP
    >>> res.to_nifti().to_filename("labels.nii.gz")        # doctest: +SKIP

A :class:`Segmenter` opens the engine folder, its prompt resolver and one engine once and is
then reused for any number of images; calls may come from several threads (engines that are
not safe to share, TensorRT and PyTorch, run one call at a time). Inputs are a path (NIfTI
file, DICOM series folder or a .dcm in it, MRC volume, PNG/JPEG/TIFF image), a nibabel image,
a :class:`~promptseg.data.readers.Volume`, an :class:`~promptseg.runtime.io.Image2D` or a 2-D
numpy array. ``promptseg-run`` is this class between reading and writing files.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.data.readers import Volume, nifti_volume
from promptseg.runtime.engines import (
    PRECISIONS,
    BackendError,
    Engine,
    check_backend,
    select_backend,
)
from promptseg.runtime.errors import InputError, PathLike, first_line
from promptseg.runtime.io import Image2D, read_input
from promptseg.runtime.manifest import EngineFolder
from promptseg.runtime.pipeline import (
    Options,
    SegmentationResult,
    check_engine,
    resolve_prompt_list,
    segment_checked,
)
from promptseg.runtime.prompt_resolver import PromptResolver, ResolvedPrompt

ImageLike = str | Path | Volume | Image2D | np.ndarray | Any


@dataclass
class SegmenterResult:
    """One image's segmentation.

    Attributes:
        labels: uint8 label map on the input's grid ((X, Y, Z) for volumes, (H, W) for 2-D
            images): 0 background, k for the k-th target.
        targets: Target names in label order.
        present: Per target, whether its mask has any voxel.
        image: The input as read (:class:`Volume` or :class:`Image2D`).
        result: Everything else: resolved prompts, per-prompt statistics, timings, modality.
        warnings: Reader and segmentation warnings (one line each).
    """

    labels: np.ndarray
    targets: list[str]
    present: list[bool]
    image: Volume | Image2D
    result: SegmentationResult
    warnings: list[str] = field(default_factory=list)

    @property
    def stats(self) -> list[dict[str, Any]]:
        """Per prompt: label, voxels, volume_ml, slices_with_target, presence facts."""
        return self.result.stats

    def mask(self, target: str) -> np.ndarray:
        """bool mask of one target on the input's grid."""
        return self.labels == self.targets.index(target) + 1

    def to_nifti(self) -> Any:
        """The label map as a nibabel image with the input's affine (and header, if NIfTI).

        Raises:
            ValueError: The input was a 2-D image (no affine).
        """
        from promptseg.runtime.writers import nifti_image

        if not isinstance(self.image, Volume):
            raise ValueError("a 2-D image has no affine; use .labels (write it as a PNG)")
        header = None
        src = self.image.meta.get("nifti_header")
        if src is not None:
            header = copy.deepcopy(src)
            header["cal_min"], header["cal_max"] = 0, 0
            header["descrip"] = b"promptseg-run label map"
        return nifti_image(self.labels, self.image.affine, header=header, dtype=np.uint8)


def open_engine(
    backend: str, folder: EngineFolder, precision: str | None, threads: int | None
) -> Engine:
    """The engine of a backend name, any failure as a one-line InputError."""
    try:
        return select_backend(backend, folder, precision, threads=threads)
    except InputError:
        raise  # already names the file (a corrupted graph or plan, a bad manifest)
    except (BackendError, ImportError, ValueError) as exc:
        raise InputError(f"--backend {backend}", first_line(exc)) from exc


def open_checked_engine(
    backend: str,
    folder: EngineFolder,
    precision: str | None,
    threads: int | None,
    film_dim: int,
) -> Engine:
    """:func:`open_engine`, then checked against the preprocessing and the FiLM vector length.

    Raises:
        InputError: The backend cannot run, or the engine disagrees with its folder.
    """
    eng = open_engine(backend, folder, precision, threads)
    try:
        check_engine(eng, folder.preprocessing, film_dim)
    except BaseException:
        eng.close()
        raise
    return eng


def check_backend_options(backend: str, precision: str | None, threads: int | None) -> None:
    """One-line InputErrors for an unknown backend or precision or a bad thread count."""
    try:
        check_backend(backend)
    except ValueError as exc:
        raise InputError("--backend", str(exc)) from None
    if precision is not None and precision not in PRECISIONS:
        raise InputError(
            "--precision", f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}"
        )
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise InputError("--threads", f"must be a positive integer, got {threads}")


def as_image(
    image: ImageLike, *, volume: int | None = None, series: str | None = None
) -> tuple[Volume | Image2D, list[str]]:
    """Any supported input as a :class:`Volume` or :class:`Image2D`, and reader warnings.

    Raises:
        InputError: Unreadable file, unsupported object, an array that is not 2-D.
    """
    if isinstance(image, Volume | Image2D):
        return image, []
    if isinstance(image, str | Path):
        return read_input(image, volume_index=volume, series_uid=series)
    if isinstance(image, np.ndarray):
        if image.ndim != 2:
            raise InputError(
                "<array>",
                f"got a {image.ndim}-D array of shape {image.shape}; a numpy input must be one "
                "2-D image (H, W); pass volumes as a file or a nibabel image (they need an affine)",
            )
        data = image.astype(np.float32)
        if not np.all(np.isfinite(data)):
            raise InputError("<array>", "holds NaN or Inf values")
        bits = 8 if image.dtype == np.uint8 else image.dtype.itemsize * 8
        return Image2D(data, {"bit_depth": bits, "mode": f"array:{image.dtype}"}, "<array>"), []
    if hasattr(image, "affine") and hasattr(image, "dataobj"):
        name = getattr(image, "get_filename", lambda: None)() or "<nibabel image>"
        return nifti_volume(image, name, volume), []
    raise InputError(
        "<input>",
        f"unsupported input {type(image).__name__}; expected a path, a nibabel image or a 2-D "
        "numpy array",
    )


class Segmenter:
    """Segment images from text prompts with one engine, loaded once.

    Args:
        engine: Engine folder (path or :class:`EngineFolder`; None: the packaged default).
        backend: "auto", "tensorrt", "ort-cuda", "ort-cpu" or "torch".
        precision: "fp32", "fp16", "int8" or None (the backend's default).
        threads: ONNX Runtime intra-op threads (None: its default).
        batch, threshold, modality, postprocess, presence_threshold, presence_gate: See
            :class:`promptseg.runtime.pipeline.Options`.
        load: Open the engine now (False: on :meth:`load` or the first call).

    Raises:
        InputError: A bad option, engine folder or backend (one line naming it).
    """

    def __init__(
        self,
        engine: PathLike | EngineFolder | None = None,
        backend: str = "auto",
        *,
        precision: str | None = None,
        threads: int | None = None,
        batch: int = 16,
        threshold: float = 0.5,
        modality: str = "auto",
        postprocess: str = "largest",
        presence_threshold: float | None = None,
        presence_gate: bool = True,
        load: bool = True,
    ) -> None:
        check_backend_options(backend, precision, threads)
        self.options = Options(
            batch, threshold, modality, postprocess, presence_threshold, presence_gate
        ).check()
        self.backend, self.precision, self.threads = backend, precision, threads
        self.folder = engine if isinstance(engine, EngineFolder) else EngineFolder.open(engine)
        self.resolver = PromptResolver(self.folder, threads=threads)
        self.engine: Engine | None = None
        self._resolve_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._infer_lock: threading.Lock | None = None
        if load:
            self.load()

    @property
    def film_dim(self) -> int:
        """P, the length of the prompts' FiLM vectors."""
        return int(self.resolver.cache.film.shape[-1])

    def load(self) -> Engine:
        """Open the engine (once) and check it against the preprocessing and the prompts."""
        with self._load_lock:
            if self.engine is None:
                self._attach(
                    open_checked_engine(
                        self.backend, self.folder, self.precision, self.threads, self.film_dim
                    )
                )
        return self.engine

    def use_engine(self, engine: Engine) -> Engine:
        """Segment with an engine opened elsewhere (``promptseg serve``'s slice model), once
        checked against the preprocessing and the prompts; the Segmenter closes it.

        Raises:
            InputError: The engine disagrees with the engine folder.
            ValueError: The Segmenter already has an engine.
        """
        with self._load_lock:
            if self.engine is not None:
                raise ValueError("this Segmenter already has an engine")
            check_engine(engine, self.folder.preprocessing, self.film_dim)
            self._attach(engine)
        return engine

    def _attach(self, engine: Engine) -> None:
        shared = engine.backend.startswith("ort")  # ORT sessions run concurrently
        self._infer_lock = None if shared else threading.Lock()
        self.engine = engine

    @property
    def targets(self) -> list[str]:
        """The targets the engine knows."""
        return list(self.resolver.targets)

    def resolve(self, prompts: Sequence[str | ResolvedPrompt] | str) -> list[ResolvedPrompt]:
        """Resolve prompts (strings or already resolved) in label order.

        Raises:
            InputError: No prompt, more than 255, or a refused prompt.
        """
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._resolve_lock:
            return resolve_prompt_list(items, self.resolver)

    def segment(
        self,
        image: Volume | Image2D,
        prompts: Sequence[ResolvedPrompt],
        progress: Callable[[int], Callable[[int], None] | None] | None = None,
        options: Options | None = None,
    ) -> SegmentationResult:
        """The label map of a read image for resolved prompts (the step ``promptseg-run`` runs).

        ``progress`` is called with the number of slices and returns a per-batch callback.
        ``options`` replaces the Segmenter's own for this call (already checked, as
        ``Options(...).check()`` returns them; ``promptseg serve`` takes them per request).
        """
        engine = self.load()
        lock = self._infer_lock if self._infer_lock is not None else contextlib.nullcontext()
        with lock:
            return segment_checked(
                image,
                prompts,
                engine,
                self.folder.preprocessing,
                self.options if options is None else options,
                axcodes=self.folder.axcodes,
                presence_thresholds=self.folder.manifest.get("presence_thresholds"),
                progress=progress,
            )

    def __call__(
        self,
        image: ImageLike,
        prompts: Sequence[str] | str,
        *,
        volume: int | None = None,
        series: str | None = None,
        progress: bool = False,
    ) -> SegmenterResult:
        """Segment one image for one or several prompts.

        Args:
            image: A path (NIfTI, DICOM folder or .dcm, MRC, PNG/JPEG/TIFF), a nibabel image,
                a Volume / Image2D, or a 2-D numpy array (uint8: divided by 255, else the MR
                percentile rule unless the Segmenter's modality says "ct").
            prompts: One prompt or several (label k is the k-th).
            volume: Volume of a 4-D NIfTI.
            series: SeriesInstanceUID in a DICOM folder holding several series.
            progress: Show a tqdm progress bar over slices on stderr.

        Raises:
            InputError: Bad input or refused prompt (one line naming it).
        """
        resolved = self.resolve(prompts)
        img, notes = as_image(image, volume=volume, series=series)
        result = self.segment(img, resolved, tqdm_progress(img, progress))
        return SegmenterResult(
            labels=result.labels,
            targets=[rp.target for rp in resolved],
            present=[bool(s["present"]) for s in result.stats],
            image=img,
            result=result,
            warnings=notes + result.warnings,
        )

    def close(self) -> None:
        """Release the engine (idempotent)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tqdm_progress(
    image: Volume | Image2D, enabled: bool
) -> Callable[[int], Callable[[int], None] | None] | None:
    """A progress factory for :meth:`Segmenter.segment`: a tqdm bar over the slices."""
    if not enabled:
        return None

    def start(total: int) -> Callable[[int], None]:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=Path(str(image.source)).name, unit="slice", leave=False)

        def update(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return update

    return start
