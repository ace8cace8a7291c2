"""INT8 calibration data: real TRAIN-split slices paired with cached FiLM vectors.

A :class:`CalibrationSet` holds N preprocessed slices ``image`` (N, 1, R, R) float32 in [0, 1]
and one packed prompt vector per slice ``film`` (N, P) float32, looked up in the engine folder's
``prompt_cache.safetensors``. Slices are drawn deterministically (``seed``) from the *train*
split of every shared dataset found under the data root (never validation), balanced over
datasets and over each dataset's targets; most samples prompt a target present on the slice,
a fraction (``absent_fraction``) prompts a same-domain target known to be absent, as inference
will see both.

Preprocessing is the runtime's (orientation + normalisation + resize): the shared datasets are
already in the training orientation ("LAS" rows/columns, see :mod:`promptseg.data.datasets`),
each case is normalised as a whole (MR percentiles per volume) and every slice is resized
bilinearly to R x R, exactly as :func:`promptseg.preprocess.normalize` and
:func:`promptseg.preprocess.resize_bilinear` do for every runtime.

A set saves to / loads from ``.npz`` (no pickles), so ``--calib-data`` accepts either such a
file or a dataset root. :class:`CalibrationReader` serves it to
``onnxruntime.quantization.quantize_static`` as batches ``{"image": (B, 1, R, R),
"film": (B, P)}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from promptseg.data.bank import DOMAIN
from promptseg.data.datasets import ABDOMEN, BRAIN, DATASET_FOLDERS, KINDS, Case, load_splits
from promptseg.preprocess import Preprocessing, normalize, resize_bilinear
from promptseg.runtime.prompt_resolver import PromptCache, normalise_prompt
from promptseg.runtime.writers import atomic_write

__all__ = [
    "CALIB_FORMAT",
    "DATASET_TARGETS",
    "CalibrationReader",
    "CalibrationSet",
    "PromptCache",
    "build_calibration_set",
    "cache_index",
    "film_for",
    "prompts_for",
    "is_train_sample",
    "read_prompt_cache",
    "resolve_calibration",
]

CALIB_FORMAT = "promptseg-calibration"
CALIB_VERSION = 1
PROMPT_CACHE = "prompt_cache.safetensors"

# Targets each dataset annotates: positives come from these, absent ones are hard negatives.
DATASET_TARGETS: dict[str, tuple[str, ...]] = {
    "brain-tumor": BRAIN,
    "chaos-mr": ABDOMEN,
    "btcv-ct": ABDOMEN,
    "lits-ct": ("liver", "liver tumour"),
}

# Brain tumour cases (one slice each) loaded per requested sample, and CHAOS volumes loaded.
_BRAIN_CASES_PER_SAMPLE = 3
_CHAOS_VOLUMES = 4


# --------------------------------------------------------------------------- prompt cache


def read_prompt_cache(path: str | Path) -> PromptCache:
    """The runtime's validated reader of ``prompt_cache.safetensors`` (file or engine folder).

    Raises:
        InputError: Missing or invalid cache (one line naming the file).
    """
    path = Path(path)
    return PromptCache.load(path / PROMPT_CACHE if path.is_dir() else path)


def cache_index(cache: PromptCache, prompt: str) -> int | None:
    """Row of ``prompt`` in the cache (exact, then normalised as the runtime does), or None."""
    if prompt in cache.prompts:
        return cache.prompts.index(prompt)
    key = normalise_prompt(prompt)
    return next((i for i, p in enumerate(cache.prompts) if normalise_prompt(p) == key), None)


def prompts_for(cache: PromptCache, target: str) -> list[str]:
    """Every cached prompt whose canonical target is ``target`` (cache order)."""
    return [p for p, t in zip(cache.prompts, cache.targets) if t == target]


def film_for(cache: PromptCache, prompt: str) -> np.ndarray:
    """(P,) float32 FiLM vector of a cached prompt.

    Raises:
        KeyError: The prompt is not cached (names the cache file).
    """
    i = cache_index(cache, prompt)
    if i is None:
        raise KeyError(f"{cache.path}: prompt {prompt!r} is not cached")
    return cache.film[i]


# --------------------------------------------------------------------------- calibration set


@dataclass
class CalibrationSet:
    """N calibration samples: slices, FiLM vectors and where each came from.

    Attributes:
        image: (N, 1, R, R) float32 slices in [0, 1].
        film: (N, P) float32 packed prompt vectors.
        case_id, dataset, target, prompt: (N,) str per sample.
        slice_index: (N,) int, slice of the case (absolute index for LiTS).
        present: (N,) bool, whether ``target`` is on the slice.
    """

    image: np.ndarray
    film: np.ndarray
    case_id: np.ndarray
    slice_index: np.ndarray
    dataset: np.ndarray
    target: np.ndarray
    prompt: np.ndarray
    present: np.ndarray
    seed: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image = np.ascontiguousarray(self.image, dtype=np.float32)
        self.film = np.ascontiguousarray(self.film, dtype=np.float32)
        n = self.image.shape[0]
        if self.image.ndim != 4 or self.image.shape[1] != 1:
            raise ValueError(f"image must be (N, 1, R, R), got {self.image.shape}")
        if self.film.ndim != 2 or self.film.shape[0] != n:
            raise ValueError(f"film must be ({n}, P), got {self.film.shape}")
        for name in ("case_id", "slice_index", "dataset", "target", "prompt", "present"):
            arr = np.asarray(getattr(self, name))
            if arr.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
            setattr(self, name, arr)

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.image.shape[-1])

    @property
    def film_dim(self) -> int:
        return int(self.film.shape[1])

    def inputs(self) -> dict[str, np.ndarray]:
        """All samples as model inputs ``{"image": (N, 1, R, R), "film": (N, P)}``."""
        return {"image": self.image, "film": self.film}

    def reader(self, batch_size: int = 16) -> CalibrationReader:
        return CalibrationReader(self, batch_size)

    def summary(self) -> dict:
        """Counts per dataset and per (target, present) for reports."""
        per_dataset = {str(d): int((self.dataset == d).sum()) for d in np.unique(self.dataset)}
        per_target: dict[str, dict[str, int]] = {}
        for t in np.unique(self.target):
            sel = self.target == t
            per_target[str(t)] = {
                "present": int((sel & self.present).sum()),
                "absent": int((sel & ~self.present).sum()),
            }
        return {
            "n": len(self),
            "resolution": self.resolution,
            "film_dim": self.film_dim,
            "seed": self.seed,
            "datasets": per_dataset,
            "targets": per_target,
            "absent_fraction": float(1.0 - self.present.mean()) if len(self) else 0.0,
        }

    def with_films(self, cache: PromptCache) -> CalibrationSet:
        """The same slices with FiLM vectors re-read from another engine's prompt cache."""
        missing = sorted({str(p) for p in self.prompt if cache_index(cache, str(p)) is None})
        if missing:
            raise KeyError(
                f"{cache.path}: {len(missing)} calibration prompts are not "
                f"cached, e.g. {missing[:3]}; rebuild the calibration set from a dataset root"
            )
        film = np.stack([film_for(cache, str(p)) for p in self.prompt])
        return CalibrationSet(
            self.image, film, self.case_id, self.slice_index, self.dataset, self.target,
            self.prompt, self.present, self.seed, dict(self.meta),
        )  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write a compressed ``.npz`` (strings as unicode arrays, no pickles); atomic."""

        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"{path}: calibration sets are saved as .npz files")
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": CALIB_FORMAT, "version": CALIB_VERSION, "seed": self.seed, **self.meta}

        def write(tmp: Path) -> None:
            np.savez_compressed(
                tmp,
                header=np.array(json.dumps(header)),
                image=self.image,
                film=self.film,
                case_id=self.case_id.astype(str),
                slice_index=self.slice_index.astype(np.int64),
                dataset=self.dataset.astype(str),
                target=self.target.astype(str),
                prompt=self.prompt.astype(str),
                present=self.present.astype(bool),
            )

        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        """Read a set written by :meth:`save`.

        Raises:
            FileNotFoundError: No file at ``path``.
            ValueError: The file is not a promptseg calibration set.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: calibration file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # noqa: BLE001 - zip/format errors mean a bad file
            raise ValueError(f"{path}: not a readable .npz calibration set ({exc})") from exc
        if "header" not in arrays:
            raise ValueError(f"{path}: missing 'header'; not a promptseg calibration set")
        header = json.loads(str(arrays.pop("header")))
        if header.get("format") != CALIB_FORMAT:
            raise ValueError(f"{path}: format={header.get('format')!r}, expected {CALIB_FORMAT!r}")
        seed = int(header.pop("seed", 0))
        header.pop("format", None)
        header.pop("version", None)
        expected = {"image", "film", "case_id", "slice_index", "dataset", "target", "prompt",
                    "present"}  # fmt: skip
        if set(arrays) != expected:
            raise ValueError(f"{path}: arrays {sorted(arrays)}, expected {sorted(expected)}")
        return cls(**arrays, seed=seed, meta=header)


class CalibrationReader(CalibrationDataReader):
    """Serves a :class:`CalibrationSet` to ONNX Runtime's static quantisation in batches.

    ``get_next()`` returns ``{"image": (B, 1, R, R), "film": (B, P)}`` float32 or None at the
    end; ``len()`` is the number of batches and ``set_range(start, end)`` restricts it to a
    range of batches (ORT's ``CalibStridedMinMax`` option uses both to bound memory).
    """

    def __init__(self, calib: CalibrationSet, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.calib = calib
        self.batch_size = int(batch_size)
        self._n_batches = -(-len(calib) // self.batch_size)
        self._start, self._end = 0, self._n_batches
        self._pos = 0

    def __len__(self) -> int:
        return self._n_batches

    def batch(self, i: int) -> dict[str, np.ndarray]:
        """Batch ``i`` as model inputs."""
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return {"image": self.calib.image[s], "film": self.calib.film[s]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = self._start + self._pos
        if i >= self._end:
            return None
        self._pos += 1
        return self.batch(i)

    def rewind(self) -> None:
        self._pos = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start = max(0, int(start_index))
        self._end = min(self._n_batches, int(end_index))
        self._pos = 0

    def __iter__(self) -> Iterable[dict[str, np.ndarray]]:
        for i in range(self._n_batches):
            yield self.batch(i)


# --------------------------------------------------------------------------- building


def is_train_sample(
    dataset: str, case_id: str, slice_index: int, splits: dict | None = None
) -> bool:
    """True when (case, slice) belongs to the documented train split of ``dataset``."""
    train = (splits or load_splits())[dataset]["train"]
    if dataset == "brain-tumor":
        return int(case_id.split("/")[1]) in set(train)
    if dataset == "chaos-mr":
        return int(case_id.split("/")[1]) in set(train)
    if dataset == "btcv-ct":
        return int(case_id.split("/")[1]) in set(train)
    if dataset == "lits-ct":
        lo, hi = train["slices"]
        return lo <= int(slice_index) < hi
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(KINDS)}")


@dataclass
class _Slice:
    case_id: str
    dataset: str
    z: int  # absolute slice index
    image: np.ndarray  # (R, R) float32
    present: dict[str, bool]


def _train_cases(kind: str, root: Path, rng: np.random.Generator, quota: int) -> list[Case]:
    """Load (a deterministic subset of) the train cases of one dataset."""
    from promptseg.data import datasets as ds

    train = load_splits()[kind]["train"]
    if kind == "brain-tumor":
        k = min(len(train), max(24, quota * _BRAIN_CASES_PER_SAMPLE))
        ids = set(int(i) for i in rng.choice(np.asarray(train), size=k, replace=False))
        return list(ds.load_brain(root, ids))
    if kind == "chaos-mr":
        k = min(len(train), _CHAOS_VOLUMES)
        ids = set(int(i) for i in rng.choice(np.asarray(train), size=k, replace=False))
        return list(ds.load_chaos(root, ids))
    if kind == "btcv-ct":
        return list(ds.load_btcv(root, set(int(i) for i in train)))
    if kind == "lits-ct":
        return list(ds.load_lits(root, None, (int(train["slices"][0]), int(train["slices"][1]))))
    raise ValueError(f"unknown dataset {kind!r}; expected one of {list(KINDS)}")


def _slices(kind: str, cases: list[Case], pre: Preprocessing, resolution: int) -> list[_Slice]:
    """Normalise each case as a whole, resize every slice to R x R, note present targets."""
    offset = load_splits()["lits-ct"]["train"]["slices"][0] if kind == "lits-ct" else 0
    out: list[_Slice] = []
    for case in cases:
        small = resize_bilinear(normalize(case.image, case.modality, pre), (resolution,) * 2)
        for z in range(small.shape[0]):
            present = {t: bool(case.masks[t][z].any())
                       for t in set(DATASET_TARGETS[kind]) | DOMAIN[kind] if t in case.masks}  # fmt: skip
            out.append(_Slice(case.case_id, kind, z + offset, small[z], present))
    return out


def _round_robin(pools: dict[str, list[int]], n: int) -> list[tuple[str, int]]:
    """Take ``n`` items cycling over the pools' keys, skipping exhausted pools."""
    picks: list[tuple[str, int]] = []
    pos = {k: 0 for k in pools}
    while len(picks) < n and any(pos[k] < len(v) for k, v in pools.items()):
        for k, v in pools.items():
            if len(picks) >= n:
                break
            if pos[k] < len(v):
                picks.append((k, v[pos[k]]))
                pos[k] += 1
    return picks


def _draw(
    slices: list[_Slice],
    kind: str,
    targets: list[str],
    cache: PromptCache,
    quota: int,
    absent_fraction: float,
    rng: np.random.Generator,
) -> list[tuple[str, int, bool]]:
    """``quota`` (target, slice, present) picks, balanced over targets.

    Positives come from the dataset's annotated ``targets``; negatives prompt a same-domain
    target known to be absent (bank.DOMAIN). When one kind runs out (every LiTS train slice
    shows liver and tumour) the other fills in; only a dataset too small for ``quota`` distinct
    pairs repeats pairs.
    """
    negatives = [t for t in sorted(DOMAIN[kind]) if prompts_for(cache, t)]

    def shuffled() -> list[int]:
        return [int(i) for i in rng.permutation(len(slices))]

    pos = {t: [i for i in shuffled() if slices[i].present.get(t)] for t in targets}
    neg = {t: [i for i in shuffled() if t in slices[i].present and not slices[i].present[t]]
           for t in negatives}  # fmt: skip
    pos_all = [(t, i, True) for t, i in _round_robin(pos, quota)]
    neg_all = [(t, i, False) for t, i in _round_robin(neg, quota)]
    n_neg = min(len(neg_all), int(round(quota * absent_fraction)))
    chosen = neg_all[:n_neg] + pos_all[: quota - n_neg]
    chosen += neg_all[n_neg : n_neg + quota - len(chosen)]
    pool = pos_all + neg_all
    while pool and len(chosen) < quota:
        chosen.append(pool[len(chosen) % len(pool)])
    return chosen


def _quotas(n: int, kinds: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(n, len(kinds))
    return {k: base + (1 if i < extra else 0) for i, k in enumerate(kinds)}


def build_calibration_set(
    data_root: str | Path,
    prompt_cache: PromptCache | str | Path,
    *,
    n: int = 128,
    seed: int = 0,
    resolution: int | None = None,
    preprocessing: Preprocessing | None = None,
    datasets: Sequence[str] | None = None,
    absent_fraction: float = 0.25,
) -> CalibrationSet:
    """Draw ``n`` calibration samples from the TRAIN split of the shared datasets.

    Args:
        data_root: Folder holding the dataset folders (``../shared/data``).
        prompt_cache: The engine's prompt cache (object, file or engine folder).
        n: Number of samples, split evenly over the datasets found.
        seed: Makes the draw (cases, slices, targets, phrasings) reproducible.
        resolution: Model input size R (default: ``preprocessing.resolution``).
        preprocessing: Normalisation settings (default: ``Preprocessing(resolution=R)``).
        datasets: Dataset kinds to use (default: every kind present under ``data_root``).
        absent_fraction: Share of samples that prompt a target absent from the slice.

    Returns:
        A :class:`CalibrationSet` with ``image`` (n, 1, R, R) and ``film`` (n, P).

    Raises:
        FileNotFoundError: No dataset folder under ``data_root``.
        ValueError: Bad ``n``/``absent_fraction``, or the cache lacks every target.
    """
    root = Path(data_root)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= absent_fraction < 1.0:
        raise ValueError(f"absent_fraction must be in [0, 1), got {absent_fraction}")
    cache = (
        prompt_cache if isinstance(prompt_cache, PromptCache) else read_prompt_cache(prompt_cache)
    )
    if preprocessing is None:
        preprocessing = Preprocessing(resolution=resolution or 128)
    res = int(resolution or preprocessing.resolution)
    requested = list(datasets) if datasets else list(KINDS)
    unknown = [k for k in requested if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown datasets {unknown}; expected a subset of {list(KINDS)}")
    kinds = [k for k in requested if (root / DATASET_FOLDERS[k]).is_dir()]
    kinds = [k for k in kinds if any(prompts_for(cache, t) for t in DATASET_TARGETS[k])]
    if not kinds:
        raise FileNotFoundError(
            f"{root}: no usable dataset folder (expected one of "
            f"{[DATASET_FOLDERS[k] for k in requested]} with targets in {cache.path})"
        )
    rng = np.random.default_rng(seed)
    splits = load_splits()
    picked: list[tuple[_Slice, str, bool]] = []
    for kind, quota in _quotas(n, kinds).items():
        targets = [t for t in DATASET_TARGETS[kind] if prompts_for(cache, t)]
        slices = _slices(kind, _train_cases(kind, root / DATASET_FOLDERS[kind], rng, quota),
                         preprocessing, res)  # fmt: skip
        picked += [(slices[i], t, p) for t, i, p in _draw(slices, kind, targets, cache, quota,
                                                          absent_fraction, rng)]  # fmt: skip
    for s, _, _ in picked:
        if not is_train_sample(s.dataset, s.case_id, s.z, splits):
            raise RuntimeError(f"calibration drew {s.case_id} slice {s.z}, not in the train split")
    prompts = [str(rng.choice(prompts_for(cache, t))) for _, t, _ in picked]
    return CalibrationSet(
        image=np.stack([s.image for s, _, _ in picked])[:, None],
        film=np.stack([film_for(cache, p) for p in prompts]),
        case_id=np.array([s.case_id for s, _, _ in picked]),
        slice_index=np.array([s.z for s, _, _ in picked], dtype=np.int64),
        dataset=np.array([s.dataset for s, _, _ in picked]),
        target=np.array([t for _, t, _ in picked]),
        prompt=np.array(prompts),
        present=np.array([p for _, _, p in picked], dtype=bool),
        seed=seed,
        meta={
            "split": "train",
            "data_root": str(root),
            "prompt_cache": str(cache.path),
            "preprocessing": preprocessing.to_dict(),
            "absent_fraction": absent_fraction,
        },
    )


# --------------------------------------------------------------------------- resolving


def _onnx_io(fp32_onnx: Path) -> tuple[int | None, int | None, Preprocessing | None]:
    """(R, P, preprocessing from metadata) of an image graph; unknown values are None."""
    import onnx

    model = onnx.load(str(fp32_onnx), load_external_data=False)
    dims: dict[str, list[int | None]] = {}
    for inp in model.graph.input:
        shape = inp.type.tensor_type.shape.dim
        dims[inp.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape]
    if set(dims) != {"image", "film"}:
        raise ValueError(f"{fp32_onnx}: inputs {sorted(dims)}, expected ['film', 'image']")
    pre = None
    meta = {p.key: p.value for p in model.metadata_props}
    if "preprocessing" in meta:
        try:
            pre = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
        except (ValueError, KeyError, TypeError):
            pre = None
    return dims["image"][-1], dims["film"][-1], pre


def resolve_calibration(
    calib_data: CalibrationSet | CalibrationReader | str | Path | None,
    fp32_onnx: str | Path,
    *,
    prompt_cache: PromptCache | str | Path | None = None,
    preprocessing: Preprocessing | dict | None = None,
    n: int = 128,
    seed: int = 0,
) -> CalibrationSet:
    """Turn ``--calib-data`` (a set, a .npz file or a dataset root) into a checked set.

    The prompt cache defaults to ``prompt_cache.safetensors`` beside ``fp32_onnx``; R and P are
    read from the graph's inputs. A loaded .npz gets its FiLM vectors re-read from that cache by
    prompt, so one saved set serves every engine of the same resolution.

    Raises:
        ValueError: Missing calibration data, or R/P disagree with the graph.
        FileNotFoundError: A path that does not exist.
    """
    fp32_onnx = Path(fp32_onnx)
    res, film_dim, meta_pre = _onnx_io(fp32_onnx)
    if isinstance(preprocessing, dict):
        preprocessing = Preprocessing.from_dict(preprocessing)
    preprocessing = preprocessing or meta_pre
    if res is not None and preprocessing is not None and preprocessing.resolution != res:
        preprocessing = Preprocessing.from_dict({**preprocessing.to_dict(), "resolution": res})
    cache_spec = prompt_cache if prompt_cache is not None else fp32_onnx.parent / PROMPT_CACHE
    if calib_data is None:
        raise ValueError(
            f"{fp32_onnx}: INT8 quantisation needs calibration data: pass a calibration .npz "
            "or the dataset root (for example --calib-data ../shared/data)"
        )
    if isinstance(calib_data, CalibrationReader):
        calib = calib_data.calib
    elif isinstance(calib_data, CalibrationSet):
        calib = calib_data
    else:
        path = Path(calib_data)
        if path.is_file():
            calib = CalibrationSet.load(path)
            cache_path = cache_spec.path if isinstance(cache_spec, PromptCache) else cache_spec
            if isinstance(cache_spec, PromptCache) or Path(cache_path).exists():
                cache = (cache_spec if isinstance(cache_spec, PromptCache)
                         else read_prompt_cache(cache_spec))  # fmt: skip
                calib = calib.with_films(cache)
        elif path.is_dir():
            calib = build_calibration_set(
                path, cache_spec, n=n, seed=seed, resolution=res, preprocessing=preprocessing
            )
        else:
            raise FileNotFoundError(
                f"{path}: calibration data not found (expected a .npz file or a dataset root)"
            )
    if res is not None and calib.resolution != res:
        raise ValueError(
            f"calibration slices are {calib.resolution}x{calib.resolution} but {fp32_onnx} "
            f"expects {res}x{res}; rebuild the set from the dataset root"
        )
    if film_dim is not None and calib.film_dim != film_dim:
        raise ValueError(
            f"calibration FiLM vectors have P={calib.film_dim} but {fp32_onnx} expects "
            f"P={film_dim}; rebuild the set with this engine's prompt cache"
        )
    return calib
