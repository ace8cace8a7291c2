"""ONNX export of the image network: (image (N,1,R,R), film (N,P)) -> logits (N,1,R,R).

The TorchScript exporter (``dynamo=False``) gives the cleanest graph for this model: in eval mode
it folds every BatchNorm that follows a convolution into the convolution. The few that do not
follow one (the bottleneck BN after SE) are rewritten here into ``Mul`` + ``Add`` with constant
per-channel scale and shift, so the shipped graph has no ``BatchNormalization`` node at all.

Two further rewrites (:func:`rewrite_attention`) replace the CBAM spatial attention's operators
by equivalent ones that ONNX Runtime's CPU provider runs several times faster (profiled on the
default model at batch 1, one thread: the channel ``ReduceMean``/``ReduceMax`` took about a fifth
of the run, at ~3 ns per element, and the 7x7 two-channel convolution ran padded to the NCHWc
block of 8 output channels):

* channel mean and max (``ReduceMean``/``ReduceMax`` over axis 1) -> one pairwise tree of
  ``Split`` into channel halves, ``Add`` and ``Max`` shared by both, mean = sum * (1/C);
* the spatial-attention convolution (1 output channel, k x k "same", e.g. 7x7 over the
  [mean, max] maps) -> ``SpaceToDepth(4)`` -> 3x3 convolution with 16 outputs (weights
  rearranged, same taps) -> activation -> ``DepthToSpace(4)``, which ONNX Runtime runs as a
  block-aligned NCHWc convolution.

Both compute the same values up to float summation order (max |logit| change ~1e-6).
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
OUTPUT_NAMES = ("logits", "presence")
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
    rewrite_attention(model)
    pin_symbolic_dims(model, resolution)
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


# --------------------------------------------------------------------------- attention rewrites

SPACE_TO_DEPTH_BLOCK = 4


def rewrite_attention(model: Any) -> dict[str, int]:
    """Rewrite the CBAM channel reductions and convolution in place (see the module docstring).

    Nodes whose shapes are not static (apart from the batch) or do not fit are left unchanged.

    Returns:
        Number of rewritten sites per rewrite: ``channel_reductions``, ``space_to_depth_convs``.
    """
    import onnx

    shapes = _static_shapes(model)
    counts = {
        "channel_reductions": channel_reductions_to_tree(model, shapes),
        "space_to_depth_convs": single_output_conv_to_space_to_depth(model, shapes),
    }
    if any(counts.values()):
        _drop_unused(model)
        onnx.checker.check_model(model)
    return counts


def _static_shapes(model: Any) -> dict[str, list[int | str]]:
    """Tensor name -> dims (int, or the dim_param string) after ONNX shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    return {v.name: _dims(v) for v in (*graph.value_info, *graph.input, *graph.output)}


def _reduce_axes(node: Any, consts: dict[str, np.ndarray], rank: int) -> list[int] | None:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in consts:
            return None
        axes = consts[node.input[1]].reshape(-1).tolist()
    else:
        axes = attrs.get("axes")
    if axes is None or not attrs.get("keepdims", 1) or attrs.get("noop_with_empty_axes", 0):
        return None
    return sorted(int(a) % rank for a in axes)


def channel_reductions_to_tree(model: Any, shapes: dict[str, list[int | str]]) -> int:
    """Replace ``ReduceMean``/``ReduceMax`` over axis 1 (keepdims) of 4-D tensors, in place.

    All such reductions of one tensor share a tree: split the channels into halves (an odd
    channel is set aside and joins at the end), ``Max`` and ``Add`` the halves, repeat until one
    channel is left; the mean is the sum times 1/C. Same values as the reductions up to float
    summation order. Returns the number of tensors rewritten.
    """
    graph = model.graph
    consts = _constants(model)
    old_nodes = list(graph.node)  # one wrapper per node: id() below stays valid
    sites: dict[str, dict[str, Any]] = {}
    for node in old_nodes:
        if node.op_type not in ("ReduceMean", "ReduceMax") or not node.input:
            continue
        dims = shapes.get(node.input[0], [])
        if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
            continue
        if dims[1] > 1 and _reduce_axes(node, consts, 4) == [1]:
            sites.setdefault(node.input[0], {}).setdefault(node.op_type, node)
    replaced = {id(n) for site in sites.values() for n in site.values()}
    count = len(sites)
    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    for node in old_nodes:
        if id(node) not in replaced:
            new_nodes.append(node)
        elif node.input[0] in sites:  # emit the tree at the first reduction of the tensor
            site = sites.pop(node.input[0])
            nodes, inits = _reduction_tree(
                node.input[0],
                int(shapes[node.input[0]][1]),
                site.get("ReduceMax"),
                site.get("ReduceMean"),
                f"{node.name or node.output[0]}_tree",
            )
            new_nodes += nodes
            new_inits += inits
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    drop_identities(model)
    return count


def _reduction_tree(
    x: str, channels: int, max_node: Any | None, mean_node: Any | None, prefix: str
) -> tuple[list[Any], list[Any]]:
    """Nodes and initializers computing ``max_node``'s and ``mean_node``'s outputs from ``x``.

    ``Split`` takes its sizes as an input (opset >= 13, the export's minimum).
    """
    from onnx import helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []

    def split(source: str, tag: str, sizes: list[int], level: int) -> list[str]:
        parts = [f"{prefix}_{tag}{level}_{i}" for i in range(len(sizes))]
        name = f"{prefix}_{tag}{level}_split"
        sizes_name = f"{prefix}_sizes{level}"
        if not any(i.name == sizes_name for i in inits):
            inits.append(numpy_helper.from_array(np.array(sizes, np.int64), sizes_name))
        nodes.append(helper.make_node("Split", [source, sizes_name], parts, name=name, axis=1))
        return parts

    max_src = sum_src = x
    max_rest: list[str] = []
    sum_rest: list[str] = []
    width, level = channels, 0
    while width > 1:
        sizes = [width // 2, width // 2] + [1] * (width % 2)
        if level == 0:  # both trees start from the same halves of x
            max_parts = sum_parts = split(x, "x", sizes, level)
        else:
            max_parts = split(max_src, "max", sizes, level) if max_node is not None else []
            sum_parts = split(sum_src, "sum", sizes, level) if mean_node is not None else []
        if max_node is not None:
            max_src = f"{prefix}_max{level}"
            nodes.append(helper.make_node("Max", max_parts[:2], [max_src], name=max_src))
            max_rest += max_parts[2:]
        if mean_node is not None:
            sum_src = f"{prefix}_add{level}"
            nodes.append(helper.make_node("Add", sum_parts[:2], [sum_src], name=sum_src))
            sum_rest += sum_parts[2:]
        width, level = width // 2, level + 1
    if max_node is not None:
        op = "Max" if max_rest else "Identity"
        nodes.append(
            helper.make_node(op, [max_src, *max_rest], [max_node.output[0]], name=f"{prefix}_max")
        )
    if mean_node is not None:
        if sum_rest:
            total = f"{prefix}_sum"
            nodes.append(helper.make_node("Sum", [sum_src, *sum_rest], [total], name=total))
            sum_src = total
        inv = f"{prefix}_inv_channels"
        inits.append(numpy_helper.from_array(np.array(1.0 / channels, np.float32), inv))
        nodes.append(
            helper.make_node("Mul", [sum_src, inv], [mean_node.output[0]], name=f"{prefix}_mean")
        )
    return nodes, inits


def space_to_depth_weights(weight: np.ndarray, block: int) -> tuple[np.ndarray, int] | None:
    """Weights of the convolution on ``SpaceToDepth(block)`` input equal to a "same" conv.

    Args:
        weight: (1, C, k, k) weights of a stride-1 convolution with padding k // 2 (k odd).
        block: The SpaceToDepth block size b.

    Returns:
        (b*b, C*b*b, K, K) weights (padding (K-1)/2 on the b-times smaller maps; output channel
        oy*b+ox is output pixel (b*i+oy, b*j+ox), as DepthToSpace in DCR mode expects) and K,
        or None if the kernel does not map onto a centred K x K kernel.
    """
    out_ch, in_ch, k, k2 = weight.shape
    r = k // 2
    lo, hi = -r // block, (block - 1 + r) // block
    if out_ch != 1 or k != k2 or k % 2 != 1 or hi != -lo:
        return None
    size = hi - lo + 1
    new = np.zeros((block * block, in_ch * block * block, size, size), np.float64)
    w = weight.astype(np.float64)
    for oy in range(block):
        for ox in range(block):
            for ky in range(k):
                qy, iy = divmod(oy + ky - r, block)
                for kx in range(k):
                    qx, ix = divmod(ox + kx - r, block)
                    chans = (iy * block + ix) * in_ch + np.arange(in_ch)
                    new[oy * block + ox, chans, qy - lo, qx - lo] = w[0, :, ky, kx]
    return new.astype(np.float32), size


def single_output_conv_to_space_to_depth(
    model: Any, shapes: dict[str, list[int | str]], block: int = SPACE_TO_DEPTH_BLOCK
) -> int:
    """Run single-output-channel k x k "same" convolutions (k >= 5) on space-to-depth maps.

    ``Conv`` (1 output channel, few inputs) becomes ``SpaceToDepth(block)`` -> ``Conv`` with
    block**2 outputs -> ``DepthToSpace(block)``; a ``Sigmoid`` that is the convolution's only
    consumer moves before the ``DepthToSpace`` so ONNX Runtime fuses it into the convolution.
    Only for static H and W divisible by ``block``. Returns the number of convolutions rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = _constants(model)
    old_nodes = list(graph.node)  # one wrapper per node: id() below stays valid
    consumers: dict[str, list[Any]] = {}
    for node in old_nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    moved: set[int] = set()
    count = 0
    for node in old_nodes:
        if id(node) in moved:
            continue
        rewritten = _space_to_depth_conv(node, consts, shapes, block)
        if rewritten is None:
            new_nodes.append(node)
            continue
        weight, size, bias = rewritten
        base = node.name or node.output[0]
        w_name, b_name = f"{base}_s2d_weight", f"{base}_s2d_bias"
        new_inits.append(numpy_helper.from_array(weight, w_name))
        new_inits.append(numpy_helper.from_array(np.repeat(bias, block * block), b_name))
        s2d, conv_out = f"{base}_s2d_input", f"{base}_s2d_output"
        out = node.output[0]
        after = consumers.get(out, [])
        act = None
        if len(after) == 1 and after[0].op_type == "Sigmoid" and out not in graph_outputs:
            act = after[0]
        new_nodes.append(
            helper.make_node(
                "SpaceToDepth", [node.input[0]], [s2d], name=f"{base}_s2d", blocksize=block
            )
        )
        pad = (size - 1) // 2
        new_nodes.append(
            helper.make_node(
                "Conv",
                [s2d, w_name, b_name],
                [conv_out],
                name=f"{base}_s2d_conv",
                kernel_shape=[size, size],
                pads=[pad] * 4,
            )
        )
        if act is not None:
            activated = f"{base}_s2d_sigmoid"
            new_nodes.append(
                helper.make_node("Sigmoid", [conv_out], [activated], name=act.name or f"{base}_sig")
            )
            conv_out, out = activated, act.output[0]
            moved.add(id(act))
        new_nodes.append(
            helper.make_node(
                "DepthToSpace", [conv_out], [out], name=f"{base}_d2s", blocksize=block, mode="DCR"
            )
        )
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    return count


def _space_to_depth_conv(
    node: Any, consts: dict[str, np.ndarray], shapes: dict[str, list[int | str]], block: int
) -> tuple[np.ndarray, int, np.ndarray] | None:
    """(weights, kernel size, bias) of the rewrite of ``node``, or None where it does not apply."""
    from onnx import helper

    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in consts:
        return None
    weight = consts[node.input[1]]
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if weight.ndim != 4 or weight.shape[0] != 1 or weight.shape[1] > 4 or weight.shape[2] < 5:
        return None
    if bias_name is not None and bias_name not in consts:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k = weight.shape[2]
    if (
        attrs.get("group", 1) != 1
        or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        or list(attrs.get("pads", [0] * 4)) != [k // 2] * 4
        or list(attrs.get("strides", [1, 1])) != [1, 1]
        or list(attrs.get("dilations", [1, 1])) != [1, 1]
    ):
        return None
    dims = shapes.get(node.input[0], [])
    if len(dims) != 4 or not all(isinstance(d, int) and d > 0 and d % block == 0 for d in dims[2:]):
        return None
    mapped = space_to_depth_weights(weight, block)
    if mapped is None:
        return None
    bias = (consts[bias_name] if bias_name else np.zeros(1)).astype(np.float32).reshape(1)
    return mapped[0], mapped[1], bias


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


def pin_symbolic_dims(model: Any, resolution: int) -> None:
    """Declare the contract's fixed output sizes where the exporter left a symbolic dimension.

    A UNet without a presence head fills its presence output with a constant of shape
    (N, 1) built from the batch size at run time; the TorchScript exporter declares that
    output as ``[batch, <symbol>]``. Only symbolic dimensions are replaced: a fixed size that
    disagrees with the contract stays and :func:`check_io` reports it.
    """
    fixed = {"logits": [None, 1, resolution, resolution], "presence": [None, 1]}
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        want = fixed.get(value.name)
        if want is None or len(dims) != len(want):
            continue
        for dim, size in zip(dims, want):
            if size is not None and dim.dim_param and dim.dim_param != BATCH_AXIS:
                dim.dim_value = size  # setting the value clears the dim_param (a oneof)


def check_io(model: Any, resolution: int, film_dim: int) -> None:
    """Raise :class:`ExportError` unless I/O names, shapes and dtypes match the contract."""
    inputs, outputs = io_signature(model)
    expected_in = [
        {"name": "image", "shape": ["N", 1, resolution, resolution], "dtype": "float32"},
        {"name": "film", "shape": ["N", film_dim], "dtype": "float32"},
    ]
    expected_out = [
        {"name": "logits", "shape": ["N", 1, resolution, resolution], "dtype": "float32"},
        {"name": "presence", "shape": ["N", 1], "dtype": "float32"},
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
