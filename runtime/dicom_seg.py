"""DICOM Segmentation output: a label map on a DICOM series' grid as a binary SEG (highdicom).

One segment per prompt (segment number = label 1..K), coded with SNOMED CT concepts from
pydicom's code dictionary (:data:`TARGET_CODES`), the algorithm identified as promptseg and its
version, one frame per source slice that holds a segment, each frame referencing its source
instance (SOPInstanceUID) in the source geometry. Needs ``pip install 'promptseg[dicom]'``.

The label map comes from :func:`promptseg.data.readers.read_dicom_series`'s grid: ``labels[i, j,
k]`` is column i, row j of the k-th slice of ``meta["files"]`` (sorted along the slice normal),
so frame k is ``labels[:, :, k].T`` (rows, columns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.data.readers import InputError, PathLike, Volume, _atomic_write, _import_optional

OUTPUT_FORMATS = ("auto", "nifti", "dicom-seg")
SEG_SUFFIX = ".dcm"
SEG_SERIES_NUMBER = 900
SEG_CONTENT_LABEL = "PROMPTSEG"


@dataclass(frozen=True)
class TargetCodes:
    """SNOMED CT coding of one target (names of ``pydicom.sr.codedict.codes.SCT`` attributes).

    Attributes:
        category: Segmented property category.
        type: Segmented property type.
        modifier: Segmented property type modifier (laterality), or None.
        region: Anatomic region holding the structure (for lesions), or None.
    """

    category: str
    type: str
    modifier: str | None = None
    region: str | None = None


TARGET_CODES: dict[str, TargetCodes] = {
    "liver": TargetCodes("AnatomicalStructure", "Liver"),
    "spleen": TargetCodes("AnatomicalStructure", "Spleen"),
    "left kidney": TargetCodes("AnatomicalStructure", "Kidney", modifier="Left"),
    "right kidney": TargetCodes("AnatomicalStructure", "Kidney", modifier="Right"),
    "liver tumour": TargetCodes("MorphologicallyAbnormalStructure", "Neoplasm", region="Liver"),
    "glioma": TargetCodes("MorphologicallyAbnormalStructure", "Neoplasm", region="Brain"),
    "meningioma": TargetCodes("MorphologicallyAbnormalStructure", "Neoplasm", region="Meninges"),
    "pituitary tumour": TargetCodes(
        "MorphologicallyAbnormalStructure", "Neoplasm", region="Pituitary"
    ),
}
# A target the table does not know (an engine trained on other targets): generic tissue.
OTHER_TARGET = TargetCodes("Tissue", "Tissue")
# Type 2 patient/study attributes a SEG copies from its source (empty when the source omits them).
_COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def wants_dicom_seg(output_format: str, output: PathLike | None, n_inputs: int) -> bool:
    """Whether a run writes DICOM SEG: ``dicom-seg``, or ``auto`` with one ``-o *.dcm`` output.

    Raises:
        InputError: An unknown output format.
    """
    if output_format not in OUTPUT_FORMATS:
        raise InputError(
            "--output-format",
            f"unknown format {output_format!r}; valid: {', '.join(OUTPUT_FORMATS)}",
        )
    if output_format != "auto":
        return output_format == "dicom-seg"
    return n_inputs == 1 and output is not None and str(output).lower().endswith(SEG_SUFFIX)


def check_seg_inputs(paths: Sequence[Path], kinds: Sequence[str]) -> None:
    """A DICOM SEG references source instances: every input must be a DICOM series.

    Raises:
        InputError: Naming the first input that is not DICOM.
    """
    for path, kind in zip(paths, kinds):
        if kind != "dicom":
            raise InputError(
                path,
                f"is a {kind} input; DICOM SEG output (-o *.dcm, --output-format dicom-seg) needs "
                "a DICOM series to reference; write a NIfTI mask (.nii.gz) instead",
            )
    try:
        _import_optional("highdicom")
    except ImportError as exc:
        raise InputError("--output-format dicom-seg", str(exc)) from exc


def seg_output_name(mask_path: Path) -> Path:
    """``<stem>_mask.nii.gz`` (the default NIfTI name) -> ``<stem>_seg.dcm`` in the same folder."""
    name = mask_path.name
    stem = name[: -len("_mask.nii.gz")] if name.endswith("_mask.nii.gz") else mask_path.stem
    return mask_path.with_name(f"{stem}_seg{SEG_SUFFIX}")


def plan_seg_outputs(
    paths: Sequence[Path], output: PathLike | None, kinds: Sequence[str]
) -> list[Path]:
    """Output paths of a DICOM SEG run, checked before any inference.

    One input: ``output`` (default ``<series>_seg.dcm`` beside the series folder). Several
    inputs: ``<series>_seg.dcm`` in the ``output`` folder. Inputs must be DICOM series.

    Raises:
        InputError: A non-DICOM input, a suffix other than .dcm, or a bad output path.
    """
    from promptseg.runtime.io import check_output, plan_outputs

    check_seg_inputs(paths, kinds)
    inputs = list(paths)
    if len(inputs) == 1 and output is not None:
        outs = [Path(output)]
    else:
        outs = [seg_output_name(p) for p in plan_outputs(inputs, output, list(kinds))]
    for out in outs:
        if not out.name.lower().endswith(SEG_SUFFIX):
            raise InputError(out, f"unsupported output suffix; a DICOM SEG is a {SEG_SUFFIX} file")
        if out.parent.exists():
            check_output(out, inputs, False, what="DICOM SEG")
    return outs


def segments_of(stats: Sequence[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """(label, target, prompt) per prompt from a result's per-prompt stats."""
    return [(int(s["label"]), str(s["target"]), str(s["prompt"])) for s in stats]


def _code(name: str) -> Any:
    from pydicom.sr.codedict import codes

    return getattr(codes.SCT, name)


def segment_description(number: int, target: str, prompt: str, version: str, engine_id: str) -> Any:
    """highdicom SegmentDescription of one prompt's segment (label = ``number``)."""
    hd = _import_optional("highdicom")
    from pydicom.sr.codedict import codes

    coding = TARGET_CODES.get(target, OTHER_TARGET)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="promptseg",
        family=codes.cid7162.ArtificialIntelligence,
        version=version,
        parameters={"prompt": prompt[:64], "engine": engine_id[:64]},
    )
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=target[:64],
        segmented_property_category=_code(coding.category),
        segmented_property_type=_code(coding.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[_code(coding.region)] if coding.region else None,
    )
    if coding.modifier is not None:
        item = desc.SegmentedPropertyTypeCodeSequence[0]
        item.SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(_code(coding.modifier))
        ]
    return desc


def source_datasets(image: Volume) -> list[Any]:
    """The series' headers (no pixel data) in the volume's slice order."""
    pydicom = _import_optional("pydicom")
    files = image.meta.get("files")
    if image.kind != "dicom" or not files:
        raise InputError(image.source, "DICOM SEG output needs a DICOM series input")
    if len(files) != image.data.shape[2]:
        raise InputError(
            image.source, f"{len(files)} source files for {image.data.shape[2]} slices"
        )
    headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    for ds in headers:  # in memory only: the source files are never changed
        for keyword in _COPIED_TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return headers


def build_seg(
    image: Volume,
    labels: np.ndarray,
    segments: Sequence[tuple[int, str, str]],
    *,
    version: str,
    engine_id: str,
) -> Any:
    """A binary highdicom Segmentation of ``labels`` on ``image``'s DICOM series.

    Args:
        image: The DICOM series as read (``meta["files"]`` in slice order).
        labels: uint8 (X, Y, Z) label map on the series' grid, 0 background.
        segments: (label, target, prompt) per segment, labels 1..K.
        version: promptseg version for the algorithm identification.
        engine_id: Identifies the engine (its manifest hash) in the algorithm parameters.

    Returns:
        The ``highdicom.seg.Segmentation`` (frames of empty slices omitted).
    """
    hd = _import_optional("highdicom")
    pydicom = _import_optional("pydicom")
    if labels.shape != image.data.shape:
        raise ValueError(f"labels {labels.shape} do not match the series grid {image.data.shape}")
    sources = source_datasets(image)
    frames = np.ascontiguousarray(np.asarray(labels, dtype=np.uint8).transpose(2, 1, 0))
    empty = not frames.any()  # highdicom keeps every frame of an empty SEG: say so up front
    descriptions = [
        segment_description(number, target, prompt, version, engine_id)
        for number, target, prompt in segments
    ]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,  # (Z, rows, columns) segment numbers: a label map
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
        manufacturer="promptseg",
        manufacturer_model_name="promptseg-run",
        software_versions=version,
        device_serial_number=engine_id[:16] or "unknown",
        content_label=SEG_CONTENT_LABEL,
        content_description="text-prompted segmentation (promptseg-run)",
        omit_empty_frames=not empty,
    )


def write_dicom_seg(
    image: Volume,
    labels: np.ndarray,
    segments: Sequence[tuple[int, str, str]],
    out: PathLike,
    *,
    version: str,
    engine_id: str,
) -> Path:
    """Build the SEG (:func:`build_seg`) and write it atomically to ``out``."""
    seg = build_seg(image, labels, segments, version=version, engine_id=engine_id)
    return _atomic_write(out, lambda tmp: seg.save_as(str(tmp)))


def read_seg_labels(seg_path: PathLike, source_files: Sequence[PathLike]) -> np.ndarray:
    """A SEG's segments as a uint8 (X, Y, Z) label map on the source files' grid.

    Args:
        seg_path: The DICOM SEG file.
        source_files: The source series' files in slice order (``Volume.meta["files"]``).

    Returns:
        uint8 (columns, rows, slices): segment number per voxel, 0 where no segment.
    """
    hd = _import_optional("highdicom")
    pydicom = _import_optional("pydicom")
    seg = hd.seg.segread(str(seg_path))
    uids = [
        str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in source_files
    ]
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    first = pydicom.dcmread(str(source_files[0]), stop_before_pixels=True)
    planes = np.zeros((len(uids), int(first.Rows), int(first.Columns)), dtype=np.uint8)
    present = [k for k, uid in enumerate(uids) if uid in referenced]
    if present:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uids[k] for k in present],
            combine_segments=True,
            ignore_spatial_locations=False,
        )
        planes[present] = pixels.astype(np.uint8)
    return planes.transpose(2, 1, 0)
