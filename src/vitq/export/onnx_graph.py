"""Rewrites of the traced ONNX graph: weights stored as integer codes (int8, or int4 for the portable target),
and ONNX Runtime's weight-only ``MatMulNBits`` for 4-bit per-group weights."""
from __future__ import annotations

import numpy as np
import torch


def module_path(node_name: str) -> str:
    """Module path of an exported node from its scope name, e.g. ``/blocks/blocks.0/attn/qkv/MatMul``
    -> ``blocks.0.attn.qkv`` (the exporter names a container's children by their qualified name)."""
    path: list[str] = []
    for c in node_name.split("/")[1:-1]:
        if path and c.startswith(path[-1] + "."):
            path = path[:-1] + c.split(".")
        else:
            path.append(c)
    return ".".join(path)


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _along_axis(node, scale: np.ndarray, zero_point, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """A (De)QuantizeLinear's scale and zero point (float), shaped to broadcast along its ``axis`` when per axis."""
    zp = zero_point.astype(np.float32) if zero_point is not None else np.float32(0)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * ndim
        shape[next((a.i for a in node.attribute if a.name == "axis"), 1) % ndim] = -1
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if np.ndim(zp) == 1 else zp
    return scale, zp


def drop_unused(graph) -> None:
    """Remove initializers and Constant nodes nothing reads any more."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    for node in [n for n in graph.node if n.op_type == "Constant" and not set(n.output) & used]:
        graph.node.remove(node)


def store_weight_codes(proto) -> int:
    """Replace every ``QuantizeLinear`` of a constant (a weight) by its integer codes as an initializer, so
    the file holds one byte per weight instead of four. The codes are what ONNX Runtime would compute
    (round half to even, saturate), so the graph's values do not change. Returns how many were replaced."""
    from onnx import numpy_helper

    graph = proto.graph
    consts = _constants(graph)
    done = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in consts:
            continue
        w, scale = consts[node.input[0]].astype(np.float32), consts[node.input[1]].astype(np.float32)
        zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        scale, zpf = _along_axis(node, scale, zp, w.ndim)
        info = np.iinfo(zp.dtype)
        codes = np.clip(np.rint(w / scale) + zpf, info.min, info.max).astype(zp.dtype)
        name = node.output[0]
        graph.initializer.append(numpy_helper.from_array(codes, name))
        graph.node.remove(node)
        done += 1
    drop_unused(graph)
    return done


def float_weights(proto, layers: set[str]) -> list[str]:
    """Replace the ``DequantizeLinear`` of each weight of ``layers`` by the float values it computes (``(code -
    zero point) * scale`` in float32, the same rounding): ONNX Runtime runs a layer it has no integer kernel for
    faster on a constant weight (it prepacks it, and lays convolutions out for its NCHWc kernels), and the
    graph's values do not change. Returns the layers rewritten."""
    from onnx import numpy_helper

    graph = proto.graph
    consts = _constants(graph)
    done = []
    for node in list(graph.node):
        if (node.op_type != "DequantizeLinear" or node.input[0] not in consts or module_path(node.name) not in layers
                or node.input[1] not in consts):
            continue
        codes, scale = consts[node.input[0]], consts[node.input[1]].astype(np.float32)
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        scale, zpf = _along_axis(node, scale, zp, codes.ndim)
        values = codes.astype(np.float32) - zpf
        graph.initializer.append(numpy_helper.from_array((values * scale).astype(np.float32), node.output[0]))
        graph.node.remove(node)
        done.append(module_path(node.name))
    drop_unused(graph)
    return done


def store_int4(proto, layers: set[str]) -> list[str]:
    """Portable target: the int8 weight codes of ``layers`` (whose codes lie in [-8, 7]) as INT4 initializers
    (ONNX opset 21 ``DequantizeLinear``). Returns the layers rewritten."""
    import ml_dtypes  # onnx's own dependency for its 4-bit types
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    done = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        layer = module_path(node.name)
        init = inits[node.input[0]]
        codes = numpy_helper.to_array(init)
        if layer not in layers or codes.dtype != np.int8 or codes.min() < -8 or codes.max() > 7:
            continue
        new = numpy_helper.from_array(codes.astype(ml_dtypes.int4), init.name)  # two codes per byte
        graph.initializer.remove(init)
        graph.initializer.append(new)
        if len(node.input) > 2:  # the int8 zero point is 0: without one, DequantizeLinear takes 0 of x's type
            del node.input[2]
        done.append(layer)
    if done:
        for op in proto.opset_import:
            if op.domain in ("", "ai.onnx") and op.version < 21:
                op.version = 21
        drop_unused(graph)
    return done


def to_matmul_nbits(model_proto, layers: dict) -> list[str]:
    """Replace the ``MatMul`` of each layer in ``layers`` (name -> QuantLinear) by ``MatMulNBits`` whose
    4-bit blocks are vitq's own codes and scales (code + 8, so the default zero point 8 decodes them)."""
    from onnx import helper, numpy_helper

    from ..quant import quantizers as Q
    from .packed import pack_bits

    graph = model_proto.graph
    done = []
    for idx, node in enumerate(list(graph.node)):
        if node.op_type != "MatMul" or module_path(node.name) not in layers:
            continue
        m = layers[module_path(node.name)]
        q = m.w_quant
        n_out, k = m.weight.shape
        g = q.spec.group_size
        v = Q.to_groups(m.weight.detach().cpu(), g)
        codes = Q.quantize_uniform(v, q.scale.cpu().reshape(-1, 1), q.zero_point.cpu().reshape(-1, 1), *q._qrange())
        codes = (codes.to(torch.int64) + 8).reshape(n_out, k)  # symmetric codes in [-7, 7] -> [1, 15]
        blob = pack_bits(codes, 4).numpy().reshape(n_out, k // g, g // 2)
        b_name, s_name = f"{m.layer_name}.nbits_B", f"{m.layer_name}.nbits_scales"
        graph.initializer.extend([numpy_helper.from_array(blob.astype(np.uint8), b_name),
                                  numpy_helper.from_array(q.scale.cpu().reshape(-1).numpy().astype(np.float32), s_name)])
        new = helper.make_node("MatMulNBits", [node.input[0], b_name, s_name], list(node.output),
                               name=node.name + "NBits", domain="com.microsoft", K=k, N=n_out, bits=4, block_size=g)
        graph.node.remove(node)
        graph.node.insert(idx, new)
        done.append(m.layer_name)
    drop_unused(graph)
    if done and not any(o.domain == "com.microsoft" for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done
