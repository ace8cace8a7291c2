"""FP16 conversion guided by a range audit of the FP32 graph on real slices.

The audit runs the FP32 graph in ONNX Runtime with every intermediate tensor exposed as an
output and records max |activation| per node. Nodes above ``limit * margin`` stay FP32, and so
do the L2-normalisation reductions (a sum of squares overflows FP16 long before its square root
does). After conversion the FP16 graph is audited the same way; any non-finite or out-of-range
tensor fails the export.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from promptseg.export.files import ExportError

FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0**-24
DEFAULT_MARGIN = 1.0 / 8.0
_FLOAT_TYPES = (1, 10)  # onnx TensorProto.FLOAT, FLOAT16


@dataclass
class RangeAudit:
    """Result of the FP32 range audit (goes into the manifest's ``fp16_audit``)."""

    max_abs_activation: float
    max_node: str
    limit: float
    margin: float
    threshold: float
    kept_fp32: list[str]
    kept_reasons: dict[str, str]
    nodes_audited: int
    runs: int
    fp16_max_abs_activation: float = 0.0
    fp16_max_node: str = ""
    top_nodes: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def with_all_outputs(model: Any) -> tuple[Any, dict[str, str]]:
    """A copy of ``model`` whose float node outputs are all graph outputs.

    Returns:
        The copy and a map from exposed tensor name to the node that produces it.
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)
    }
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    producer: dict[str, str] = {}
    for node in exposed.graph.node:
        if node.op_type == "Constant":
            continue
        for out in node.output:
            if not out or types.get(out) not in _FLOAT_TYPES:
                continue
            producer[out] = node.name
            if out not in existing:
                exposed.graph.output.append(
                    onnx.helper.make_tensor_value_info(out, types[out], None)
                )
    return exposed, producer


def tensor_max_abs(
    model: Any, feeds: Sequence[dict[str, np.ndarray]]
) -> tuple[dict[str, float], dict[str, str], list[str], set[str]]:
    """Max |x| per float node output over all ``feeds``.

    Returns:
        Peak per tensor name, the producing node of each tensor, the nodes with non-finite
        outputs, and the names of the FP16 tensors.
    """
    from promptseg.runtime.ort_engine import env_threads, ort_session

    exposed, producer = with_all_outputs(model)
    session = ort_session(exposed.SerializeToString(), threads=env_threads(), optimize=False)
    names = [o.name for o in session.get_outputs() if o.name in producer]
    peak: dict[str, float] = {}
    nonfinite: set[str] = set()
    half: set[str] = set()
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            if np.asarray(value).dtype == np.float16:
                half.add(name)
            arr = np.asarray(value, dtype=np.float32)
            if arr.size == 0:
                continue
            if not np.all(np.isfinite(arr)):
                nonfinite.add(producer[name])
                arr = arr[np.isfinite(arr)]
                if arr.size == 0:
                    continue
            peak[name] = max(peak.get(name, 0.0), float(np.max(np.abs(arr))))
    return peak, producer, sorted(nonfinite), half


def l2_norm_nodes(model: Any) -> dict[str, str]:
    """Nodes of an L2 normalisation: ReduceL2 / ReduceSumSquare, and Pow -> ReduceSum -> Sqrt."""
    nodes = list(model.graph.node)
    by_output = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    found: dict[str, str] = {}
    for n in nodes:
        if n.op_type in ("ReduceL2", "ReduceSumSquare"):
            found[n.name] = f"L2 normalisation ({n.op_type})"
        elif n.op_type == "ReduceSum":
            src = by_output.get(n.input[0])
            if src is not None and src.op_type in ("Pow", "Mul"):
                found[src.name] = "L2 normalisation (squares)"
                found[n.name] = "L2 normalisation (sum of squares)"
                for nxt in consumers.get(n.output[0], []):
                    if nxt.op_type == "Sqrt":
                        found[nxt.name] = "L2 normalisation (sqrt)"
    return found


def audit_fp32(
    model: Any,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    limit: float = FP16_MAX,
    margin: float = DEFAULT_MARGIN,
) -> RangeAudit:
    """Range audit of the FP32 graph: which nodes must stay FP32.

    Args:
        model: FP32 ``onnx.ModelProto`` with named nodes.
        feeds: ONNX Runtime input dicts (real slices x prompts).
        limit: FP16 largest finite value.
        margin: Fraction of ``limit`` above which a node stays FP32.

    Raises:
        ExportError: The FP32 graph itself produces non-finite values.
    """
    tensors, producer, nonfinite, _ = tensor_max_abs(model, feeds)
    if nonfinite:
        raise ExportError(
            f"the FP32 graph produces non-finite activations on real slices at nodes "
            f"{nonfinite[:5]}; the model itself is broken, FP16 conversion is meaningless"
        )
    threshold = limit * margin
    peak: dict[str, float] = {}  # per node: the largest over its outputs
    for name, value in tensors.items():
        peak[producer[name]] = max(peak.get(producer[name], 0.0), value)
    kept = {n: f"max |x| {v:.4g} > {threshold:.4g}" for n, v in peak.items() if v > threshold}
    # A node reading a large tensor stays FP32 too: a Cast to FP16 on its input would overflow.
    large = {name for name, value in tensors.items() if value > threshold}
    for node in model.graph.node:
        hot = [name for name in node.input if name in large]
        if hot and node.name not in kept:
            kept[node.name] = f"reads {hot[0]} with max |x| {tensors[hot[0]]:.4g}"
    for name, why in l2_norm_nodes(model).items():
        kept.setdefault(name, why)
    max_node = max(peak, key=peak.get) if peak else ""
    top = sorted(peak.items(), key=lambda kv: -kv[1])[:10]
    return RangeAudit(
        max_abs_activation=float(peak.get(max_node, 0.0)),
        max_node=max_node,
        limit=limit,
        margin=margin,
        threshold=threshold,
        kept_fp32=sorted(kept),
        kept_reasons=dict(sorted(kept.items())),
        nodes_audited=len(peak),
        runs=len(feeds),
        top_nodes=[{"node": n, "max_abs": v} for n, v in top],
    )


def convert_fp16(model: Any, kept_fp32: Sequence[str]) -> Any:
    """FP16 graph with float32 I/O; the ``kept_fp32`` nodes stay FP32 (Casts around them).

    Constants beyond the FP16 range are clamped to +-65504, non-zero ones below the smallest
    subnormal to +-2**-24; the count goes into ``metadata_props``
    (``promptseg.fp16_constants_clamped``).
    """
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            node_block_list=list(kept_fp32),
            max_finite_val=FP16_MAX,
            min_positive_val=FP16_MIN_SUBNORMAL,
        )
    clamped = sum("truncated" in str(w.message) for w in caught)
    tidy_casts(converted)
    onnx.checker.check_model(converted)
    entry = converted.metadata_props.add()
    entry.key, entry.value = "promptseg.fp16_constants_clamped", str(clamped)
    return converted


def tidy_casts(model: Any) -> None:
    """Repair two habits of ``convert_float_to_float16`` with a node block list, in place.

    1. A graph output produced by a blocked (FP32) node is declared FLOAT16 even with
       ``keep_io_types``: it gets a final ``Cast`` to FLOAT and is declared FLOAT again.
    2. A blocked node's output always passes through FP16 (``Cast`` to FLOAT16, then ``Cast``
       back to FLOAT for the next blocked node), which overflows for exactly the tensors the
       audit kept in FP32: such FP32 -> FP16 -> FP32 round trips are removed, chains of them
       included (readers are renamed to the first FP32 tensor of the chain).
    """
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    for out in graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        inner = f"{out.name}_fp16"
        for node in graph.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if i == out.name else i for i in node.input]
        graph.node.append(
            helper.make_node(
                "Cast", [inner], [out.name], to=TensorProto.FLOAT, name=f"{out.name}_cast_fp32"
            )
        )
        out.type.tensor_type.elem_type = TensorProto.FLOAT
    del graph.value_info[:]
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (
            *onnx.shape_inference.infer_shapes(model).graph.value_info,
            *graph.input,
            *graph.output,
        )
    }
    types.update({init.name: init.data_type for init in graph.initializer})
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    alias: dict[str, str] = {}
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or cast_to(first) != TensorProto.FLOAT16:
            continue
        if types.get(first.input[0]) != TensorProto.FLOAT:
            continue
        if node.output[0] in outputs:
            node.input[0] = first.input[0]  # keep the graph output name: FLOAT -> FLOAT Cast
        else:
            alias[node.output[0]] = first.input[0]

    def resolve(name: str) -> str:
        # Chains (FP32 -> FP16 -> FP32 -> FP16 -> FP32) alias to a tensor whose own Cast goes
        # too: follow the aliases to a tensor that stays.
        seen = {name}
        while name in alias:
            name = alias[name]
            if name in seen:  # a cycle cannot come from a valid graph; stop rather than spin
                break
            seen.add(name)
        return name

    keep = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in alias)]
    for node in keep:
        node.input[:] = [resolve(i) for i in node.input]
    while True:  # drop Casts left without readers (a dropped one can orphan the one before it)
        used = {i for n in keep for i in n.input} | outputs
        tidy = [n for n in keep if n.op_type != "Cast" or n.output[0] in used]
        if len(tidy) == len(keep):
            break
        keep = tidy
    del graph.node[:]
    graph.node.extend(keep)


def audit_fp16(model16: Any, feeds: Sequence[dict[str, np.ndarray]], audit: RangeAudit) -> None:
    """Re-audit the converted graph; fill ``audit.fp16_*`` or raise on overflow.

    Raises:
        ExportError: a tensor of the FP16 graph is non-finite, or an FP16 tensor saturates at
            the FP16 limit, even with the audited nodes kept in FP32.
    """
    tensors, producer, nonfinite, half = tensor_max_abs(model16, feeds)
    over = sorted({producer[n] for n in half if tensors.get(n, 0.0) >= audit.limit})
    if nonfinite or over:
        raise ExportError(
            f"FP16 graph overflows even with {len(audit.kept_fp32)} nodes kept in FP32: "
            f"non-finite at {nonfinite[:5]}, FP16 |x| >= {audit.limit:g} at {over[:5]}; "
            f"export without --fp16 or lower the audit margin"
        )
    fp16_peaks = {n: v for n, v in tensors.items() if n in half}
    if fp16_peaks:
        name = max(fp16_peaks, key=fp16_peaks.get)
        audit.fp16_max_abs_activation = float(fp16_peaks[name])
        audit.fp16_max_node = producer[name]
