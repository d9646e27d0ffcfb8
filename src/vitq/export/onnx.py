"""ONNX export that ONNX Runtime runs with integer kernels (``vitq export DIR --format onnx``).

What becomes what:

* A Linear whose input quantizer is uniform 8-bit per tensor and whose weight quantizer is uniform
  symmetric with at most 8 bits (per channel or per tensor; a narrower grid such as 4 or 7 bits is a
  subset of int8, so the pair holds it exactly) is written as ``QuantizeLinear/DequantizeLinear`` pairs
  carrying vitq's own scales and zero points, around ``MatMul`` with the weight stored transposed
  (``x @ W^T``): ONNX Runtime's QDQ optimizer then fuses it into ``MatMulIntegerToFloat`` (int8 x uint8
  products, int32 accumulation), without re-calibrating anything.
* Convolutions and activation x activation matmuls with 8-bit operands get the same QDQ pairs; whether
  ONNX Runtime runs them as integers depends on its fusions (reported per layer, see below).
* A Linear with uniform symmetric weights of at most 4 bits, per group along the input with a
  power-of-two group size >= 16, becomes ONNX Runtime's weight-only ``MatMulNBits`` (4-bit blocks =
  vitq's codes + 8, vitq's group scales; its input stays float, after its own QDQ pair if 8-bit).
* Every other quantizer (other widths, PoT, two-region, PTF, grids with token shifts) is left out: those tensors stay in float.
  Weights of such layers are the simulation's quantized values, in float.
* SQ-b is already folded into the weights.

After writing, the file is loaded by ONNX Runtime (CPU provider, all graph optimizations) and each layer
is reported as ``integer`` when an integer operator (``MatMulIntegerToFloat``, ``QLinearMatMul``,
``MatMulInteger``, ``ConvInteger``, ``QLinearConv``) of that layer is in the optimized graph, else
``float`` with the reason.
"""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..io import atomic_path
from ..quant.layers import QuantConv2d, QuantLinear, QuantMatMul, TensorQuantizer

INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearConv",
               "DynamicQuantizeMatMul")


def qdq_activation(q: TensorQuantizer) -> bool:
    """Whether an activation quantizer can be written as one per-tensor uint8 QDQ pair."""
    s = q.spec
    return (q.mode == "quant" and s.scheme == "uniform" and s.bits == 8 and not s.symmetric
            and s.granularity == "per_tensor" and q.scale.numel() == 1
            and q.token_shift_or_none is None)  # per-position factors (gelu_token_shift): not one pair


def qdq_weight(q: TensorQuantizer) -> bool:
    """Whether a weight quantizer can be written as an int8 QDQ pair (per channel or per tensor).

    Any symmetric uniform grid of at most 8 bits fits: its codes lie in [-127, 127]. 7-bit weights are
    what ONNX Runtime itself recommends (``reduce_range``) on x86 CPUs without VNNI, where the uint8 x int8
    kernels add pairs of products in saturating 16-bit arithmetic (docs/results.md, ONNX agreement)."""
    s = q.spec
    return (q.mode == "quant" and s.scheme == "uniform" and s.bits <= 8 and s.symmetric
            and s.granularity in ("per_channel", "per_tensor") and bool((q.zero_point == 0).all()))


def nbits_weight(q: TensorQuantizer) -> bool:
    """Whether a weight fits ONNX Runtime's weight-only ``MatMulNBits`` (4-bit codes, zero point 8):
    uniform symmetric, at most 4 bits, per group along the input with a power-of-two group >= 16."""
    s = q.spec
    g = s.group_size
    return (q.mode == "quant" and s.scheme == "uniform" and s.symmetric and s.bits <= 4
            and s.granularity == "per_group" and g >= 16 and g & (g - 1) == 0 and bool((q.zero_point == 0).all()))


class _ExportQuantizer(TensorQuantizer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not qdq_activation(self):
            return x  # stays float
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point), 0, 255)


def _qdq_weight_t(m) -> torch.Tensor:
    """The simulated quantized weight, transposed to ``[in, out]``, under an int8 per-channel QDQ pair.

    The values are already on the grid (multiples of the scale within [-127, 127]), so the pair
    reproduces them exactly; the int8 range -128..127 is what ONNX allows."""
    wq = m.quantized_weight().t().contiguous()
    scale = m.w_quant.scale.reshape(-1).float()
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(wq, float(scale), 0, -128, 127)
    return torch.fake_quantize_per_channel_affine(wq, scale, torch.zeros_like(scale, dtype=torch.int32), 1, -128, 127)


class _ExportLinear(QuantLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_quant(x)
        if qdq_weight(self.w_quant):
            y = torch.matmul(x, _qdq_weight_t(self))
            return y + self.bias if self.bias is not None else y
        if nbits_weight(self.w_quant):  # a MatMul on the float weight; replaced by MatMulNBits afterwards
            y = torch.matmul(x, self.quantized_weight().t().contiguous())
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.quantized_weight(), self.bias)


class _ExportConv(QuantConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_quant(x)
        if self.same_padding:
            from timm.layers.padding import pad_same

            x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        w = self.quantized_weight()
        if qdq_weight(self.w_quant):
            scale = self.w_quant.scale.reshape(-1).float()
            w = (torch.fake_quantize_per_tensor_affine(w, float(scale), 0, -128, 127) if scale.numel() == 1 else
                 torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0,
                                                        -128, 127))
        return self._conv_forward(x, w, self.bias)


@dataclass
class ExportReport:
    path: str
    opset: int
    layers: list[dict] = field(default_factory=list)  # layer, kind, qdq, integer, reason
    integer_ops: dict = field(default_factory=dict)
    nbits_layers: list[str] = field(default_factory=list)  # weight-only MatMulNBits (4-bit codes, float input)

    @property
    def n_integer(self) -> int:
        return sum(1 for r in self.layers if r["integer"])

    def to_dict(self) -> dict:
        return {**asdict(self), "n_integer": self.n_integer, "n_layers": len(self.layers)}


def _export_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (QuantLinear, QuantConv2d)) and mod.w_quant.mode == "quant":
                # Computed now, so the exporter sees constants, not the fake-quant arithmetic.
                mod._wq = mod.w_quant.fake_quant(mod.weight).detach()
    for mod in m.modules():
        if type(mod) is TensorQuantizer:
            mod.__class__ = _ExportQuantizer
        elif type(mod) is QuantLinear:
            mod.__class__ = _ExportLinear
        elif type(mod) is QuantConv2d:
            mod.__class__ = _ExportConv
    return m


def _layer_status(model: nn.Module) -> list[dict]:
    rows = []
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            a, w = qdq_activation(m.in_quant), qdq_weight(m.w_quant)
            reason = "" if a and w else "; ".join(
                r for r, bad in ((f"input {m.in_quant.spec.bits}-bit {m.in_quant.spec.scheme} "
                                  f"{m.in_quant.spec.granularity}", not a),
                                 (f"weight {m.w_quant.spec.bits}-bit {m.w_quant.spec.scheme} "
                                  f"{m.w_quant.spec.granularity}", not w)) if bad)
            rows.append({"layer": m.layer_name, "kind": "linear" if isinstance(m, QuantLinear) else "conv",
                         "qdq": a and w, "reason": reason})
        elif isinstance(m, QuantMatMul):
            ok = qdq_activation(m.a_quant) and qdq_activation(m.b_quant)
            rows.append({"layer": m.layer_name, "kind": "matmul", "qdq": ok,
                         "reason": "" if ok else "an operand is not 8-bit uniform per tensor"})
    return rows


def _to_matmul_nbits(model_proto, layers: dict) -> list[str]:
    """Replace the ``MatMul`` of each layer in ``layers`` (name -> QuantLinear) by ``MatMulNBits`` whose
    4-bit blocks are vitq's own codes and scales (code + 8, so the default zero point 8 decodes them)."""
    import numpy as np
    from onnx import helper, numpy_helper

    from ..quant import quantizers as Q
    from .packed import pack_bits

    graph = model_proto.graph
    inits = {i.name: i for i in graph.initializer}
    done = []
    for idx, node in enumerate(list(graph.node)):
        if node.op_type != "MatMul" or _module_path(node.name) not in layers:
            continue
        m = layers[_module_path(node.name)]
        q = m.w_quant
        n_out, k = m.weight.shape
        g = q.spec.group_size
        v = Q.to_groups(m.weight.detach(), g)
        codes = Q.quantize_uniform(v, q.scale.reshape(-1, 1), q.zero_point.reshape(-1, 1), *q._qrange())
        codes = (codes.to(torch.int64) + 8).reshape(n_out, k)  # symmetric codes in [-7, 7] -> [1, 15]
        blob = pack_bits(codes, 4).numpy().reshape(n_out, k // g, g // 2)
        b_name, s_name = f"{m.layer_name}.nbits_B", f"{m.layer_name}.nbits_scales"
        graph.initializer.extend([numpy_helper.from_array(blob.astype(np.uint8), b_name),
                                  numpy_helper.from_array(q.scale.reshape(-1).numpy().astype(np.float32), s_name)])
        new = helper.make_node("MatMulNBits", [node.input[0], b_name, s_name], list(node.output),
                               name=node.name + "NBits", domain="com.microsoft", K=k, N=n_out, bits=4, block_size=g)
        graph.node.remove(node)
        graph.node.insert(idx, new)
        done.append(m.layer_name)
    # Drop the float weights the replaced MatMuls read (initializers or Constant nodes).
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for name, init in inits.items():
        if name not in used:
            graph.initializer.remove(init)
    for node in [n for n in graph.node if n.op_type == "Constant" and not set(n.output) & used]:
        graph.node.remove(node)
    if done and not any(o.domain == "com.microsoft" for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _module_path(node_name: str) -> str:
    """Module path of an exported node from its scope name, e.g. ``/blocks/blocks.0/attn/qkv/MatMul``
    -> ``blocks.0.attn.qkv`` (the exporter names a container's children by their qualified name)."""
    path: list[str] = []
    for c in node_name.split("/")[1:-1]:
        if path and c.startswith(path[-1] + "."):
            path = path[:-1] + c.split(".")
        else:
            path.append(c)
    return ".".join(path)


ONNX_FORMAT = "vitq-onnx/1"


def is_vitq_onnx(path: str | Path) -> bool:
    """True for an ONNX file that vitq exported (its metadata names :data:`ONNX_FORMAT`)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all (a protobuf parse error has no public type)
        return False
    return any(p.key == "vitq_format" and p.value == ONNX_FORMAT for p in proto.metadata_props)


def export_onnx(model: nn.Module, input_size: tuple[int, int, int], out: str | Path, opset: int = 17,
                provenance: dict[str, str] | None = None) -> ExportReport:
    """Write ``model`` (calibrated) as ONNX with QDQ pairs, atomically, and report what runs as integers.

    ``provenance`` (string pairs: model, checkpoint, random_init) goes into the file's metadata beside
    ``vitq_format``, so whoever runs the file can tell random-init weights from trained ones.

    Raises:
        ImportError: onnx / onnxruntime are not installed.
    """
    import onnx
    import onnxruntime as ort

    m = _export_copy(model)
    dummy = torch.zeros(1, *input_size)
    report = ExportReport(str(out), opset, _layer_status(model))
    with atomic_path(out) as tmp:
        with torch.inference_mode():
            torch.onnx.export(m, (dummy,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        nbits = {m.layer_name: m for m in model.modules() if isinstance(m, QuantLinear) and nbits_weight(m.w_quant)}
        proto = onnx.load(str(tmp))
        if nbits:
            report.nbits_layers = _to_matmul_nbits(proto, nbits)
        for key, value in {"vitq_format": ONNX_FORMAT, "vitq_version": __version__, **(provenance or {})}.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
        # Which layers did ONNX Runtime turn into integer kernels? Inspect its optimized graph.
        with tempfile.TemporaryDirectory() as d:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.optimized_model_filepath = os.path.join(d, "opt.onnx")
            so.log_severity_level = 3
            ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
            graph = onnx.load(so.optimized_model_filepath).graph
    int_nodes = [n for n in graph.node if n.op_type in INTEGER_OPS]
    for n in int_nodes:
        report.integer_ops[n.op_type] = report.integer_ops.get(n.op_type, 0) + 1
    paths = {_module_path(n.name) for n in int_nodes}
    for row in report.layers:
        row["integer"] = row["layer"] in paths
        row["matmul_nbits"] = row["layer"] in report.nbits_layers
        if row["matmul_nbits"]:
            row["reason"] = "weight-only MatMulNBits: 4-bit weights, float activations"
        elif row["qdq"] and not row["integer"]:
            row["reason"] = "QDQ written, but ONNX Runtime has no integer fusion for this pattern"
    return report
