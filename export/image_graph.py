"""ONNX export of the image network: (image (N,1,R,R), film (N,P)) -> logits (N,1,R,R).

The TorchScript exporter (``dynamo=False``) gives the cleanest graph for this model: in eval mode
it folds every BatchNorm that follows a convolution into the convolution. The few that do not
follow one (the bottleneck BN after SE) are rewritten here into ``Mul`` + ``Add`` with constant
per-channel scale and shift, so the shipped graph has no ``BatchNormalization`` node at all.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from typing import Any

import numpy as np

from promptseg.export.files import ExportError

INPUT_NAMES = ("image", "film")
OUTPUT_NAMES = ("logits",)
BATCH_AXIS = "batch"


def export_unet(unet: Any, *, resolution: int, film_dim: int, opset: int) -> tuple[Any, str]:
    """Export ``unet`` (eval mode) to an ``onnx.ModelProto`` with a dynamic ``batch`` axis.

    Args:
        unet: A ``promptseg.model.unet.UNet``; it is put into eval mode.
        resolution: R, the square input size.
        film_dim: P, the packed FiLM vector length.
        opset: ONNX opset version.

    Returns:
        The model (BatchNorm folded, every node named) and the exporter used
        (``"torchscript"`` or ``"dynamo"``).
    """
    import onnx
    import torch

    unet.eval()
    image = torch.zeros(2, unet.config.in_channels, resolution, resolution)
    image[:, :, resolution // 4 : 3 * resolution // 4] = 0.5
    film = torch.ones(2, film_dim)
    dynamic = {name: {0: BATCH_AXIS} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    buffer = io.BytesIO()
    exporter = "torchscript"
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                unet,
                (image, film),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
            )
        model = onnx.load_from_string(buffer.getvalue())
    except Exception as torchscript_exc:  # noqa: BLE001 - fall back to the dynamo exporter
        exporter = "dynamo"
        try:
            model = _export_dynamo(unet, image, film, opset)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(
                f"ONNX export of the UNet failed with both exporters: torchscript: "
                f"{_first_line(torchscript_exc)}; dynamo: {_first_line(exc)}"
            ) from exc
    name_nodes(model)
    drop_identities(model)
    model = fold_batchnorm(model)
    assert_no_batchnorm(model)
    check_io(model, resolution, film_dim)
    return model, exporter


def _export_dynamo(unet: Any, image: Any, film: Any, opset: int) -> Any:
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            unet,
            (image, film),
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch}, {0: batch}),
            optimize=True,
        )
    model = program.model_proto
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_AXIS
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def name_nodes(model: Any) -> None:
    """Give every unnamed node a unique name (the FP16 block list refers to node names)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"/{node.op_type}_{i}"
        seen.add(node.name)


def drop_identities(model: Any) -> None:
    """Remove ``Identity`` nodes (the exporter's aliases of shared weights) by renaming."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
        else:
            keep.append(node)
    if not alias:
        return
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def _constants(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def fold_batchnorm(model: Any) -> Any:
    """Remove every inference-mode ``BatchNormalization`` node.

    A BN whose input is a ``Conv`` output used only by that BN is folded into the convolution's
    weights and bias; any other BN becomes ``Mul(x, scale) -> Add(shift)`` with (C, 1, 1)
    constants. Raises :class:`ExportError` for a training-mode BN (more than one output).
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = _constants(model)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: Counter[str] = Counter(name for node in graph.node for name in node.input)
    graph_outputs = {o.name for o in graph.output}
    new_inits: list[Any] = []
    new_nodes: list[Any] = []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        outputs = [o for o in node.output if o]
        if len(outputs) != 1 or attrs.get("training_mode", 0):
            raise ExportError(
                f"BatchNormalization node {node.name!r} is in training mode "
                f"({len(outputs)} outputs); export needs the model in eval mode"
            )
        try:
            gamma, beta, mean, var = (consts[name].astype(np.float64) for name in node.input[1:5])
        except KeyError as exc:
            raise ExportError(
                f"BatchNormalization node {node.name!r} has non-constant statistics ({exc})"
            ) from exc
        eps = float(attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        x = node.input[0]
        conv = producers.get(x)
        if (
            conv is not None
            and conv.op_type == "Conv"
            and consumers[x] == 1
            and x not in graph_outputs
            and conv.input[1] in consts
            and (len(conv.input) < 3 or not conv.input[2] or conv.input[2] in consts)
        ):
            weight = consts[conv.input[1]].astype(np.float64)
            bias = (
                consts[conv.input[2]].astype(np.float64)
                if len(conv.input) > 2 and conv.input[2]
                else np.zeros(weight.shape[0])
            )
            w_name, b_name = f"{conv.name}.weight_bnfold", f"{conv.name}.bias_bnfold"
            shape = (-1,) + (1,) * (weight.ndim - 1)
            new_inits.append(
                numpy_helper.from_array((weight * scale.reshape(shape)).astype(np.float32), w_name)
            )
            new_inits.append(
                numpy_helper.from_array((bias * scale + shift).astype(np.float32), b_name)
            )
            data_input = conv.input[0]
            del conv.input[:]
            conv.input.extend([data_input, w_name, b_name])
            conv.output[0] = outputs[0]
            continue
        s_name, t_name = f"{node.name}.scale_folded", f"{node.name}.shift_folded"
        new_inits.append(
            numpy_helper.from_array(scale.astype(np.float32).reshape(-1, 1, 1), s_name)
        )
        new_inits.append(
            numpy_helper.from_array(shift.astype(np.float32).reshape(-1, 1, 1), t_name)
        )
        mul_out = f"{node.name}_mul_output"
        new_nodes.append(helper.make_node("Mul", [x, s_name], [mul_out], name=f"{node.name}_Mul"))
        new_nodes.append(
            helper.make_node("Add", [mul_out, t_name], [outputs[0]], name=f"{node.name}_Add")
        )
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _drop_unused(model)
    onnx.checker.check_model(model)
    return model


def _drop_unused(model: Any) -> None:
    """Remove initializers and Constant nodes no node reads any more."""
    graph = model.graph
    while True:
        used = {name for node in graph.node for name in node.input}
        used |= {o.name for o in graph.output}
        dead = [
            n
            for n in graph.node
            if n.op_type == "Constant" and not any(o in used for o in n.output)
        ]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    used = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def assert_no_batchnorm(model: Any) -> None:
    """Raise :class:`ExportError` if any ``BatchNormalization`` node is left in the graph."""
    left = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    if left:
        raise ExportError(f"BatchNormalization nodes left after folding: {left}")


def _dims(value: Any) -> list[int | str]:
    return [
        d.dim_param if d.dim_param else int(d.dim_value) for d in value.type.tensor_type.shape.dim
    ]


def io_signature(model: Any) -> tuple[list[dict], list[dict]]:
    """The manifest's ``inputs`` and ``outputs``: name, shape (``"N"`` for batch), dtype."""
    from onnx import helper

    def describe(values: Any) -> list[dict]:
        out = []
        for v in values:
            dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            shape = ["N" if d == BATCH_AXIS else d for d in _dims(v)]
            out.append({"name": v.name, "shape": shape, "dtype": str(np.dtype(dtype))})
        return out

    return describe(model.graph.input), describe(model.graph.output)


def check_io(model: Any, resolution: int, film_dim: int) -> None:
    """Raise :class:`ExportError` unless I/O names, shapes and dtypes match the contract."""
    inputs, outputs = io_signature(model)
    expected_in = [
        {"name": "image", "shape": ["N", 1, resolution, resolution], "dtype": "float32"},
        {"name": "film", "shape": ["N", film_dim], "dtype": "float32"},
    ]
    expected_out = [
        {"name": "logits", "shape": ["N", 1, resolution, resolution], "dtype": "float32"}
    ]
    if inputs != expected_in or outputs != expected_out:
        raise ExportError(
            f"exported graph I/O is inputs={inputs} outputs={outputs}; "
            f"expected inputs={expected_in} outputs={expected_out}"
        )


def set_metadata(model: Any, metadata: dict[str, Any]) -> None:
    """Replace ``metadata_props`` with ``metadata`` (non-string values JSON-encoded)."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def op_counts(model: Any) -> dict[str, int]:
    """Node count per op type."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))
