"""ONNX export that equals the scored model and runs on ONNX Runtime's integer kernels
(``vitq export DIR --format onnx``).

Every quantizer is written so that the graph computes the simulation's values (``qdq_modules``: activation
grids of 2-8 bits as clipped int8/uint8 QDQ pairs, two-region grids by the same float operations, token
shifts around the pair, weights as int8 codes where their grid fits). A grid ONNX cannot hold exactly (a
power-of-two activation grid) stops the export with an :class:`ExportError` naming the layers, unless
``allow_approx``; then those tensors stay float and the report and the file's metadata list them.

Targets: ``ort`` (default) stores weights as int8 codes and 4-bit per-group weights as ONNX Runtime's
``MatMulNBits``; ``portable`` stores weights of at most 4 bits as INT4 codes (opset 21 ``DequantizeLinear``)
and uses no ONNX Runtime operator; ``tensorrt`` writes every activation pair on signed int8 with zero point 0
(an asymmetric grid of at most 7 bits is its codes minus its zero point, exactly; an 8-bit asymmetric grid
is not, and is refused like any grid the target cannot hold) and weights per channel, symmetric, as int8
codes, the QDQ pairs on the inputs of the GEMMs and convolutions as TensorRT's explicit quantization expects.
TensorRT itself is not run here: the file is checked with the ONNX checker and ONNX Runtime.

After writing, ONNX Runtime (CPU provider, all graph optimizations) loads the file; each layer is reported as
``integer`` when an integer operator (``MatMulIntegerToFloat``, ``QLinearMatMul``, ``MatMulInteger``,
``ConvInteger``, ``QLinearConv``) of that layer is in its optimized graph, else ``float`` with the reason.
With ``check_images``, the file is run on them and its top-1 agreement with the simulation is reported and
written into the file's metadata.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..io import atomic_path
from ..quant.engine import all_quantizers
from ..quant.layers import QuantConv2d, QuantLinear, QuantMatMul, TensorQuantizer
from .check import agreement_with_simulation
from .onnx_graph import float_weights, module_path, store_int4, store_weight_codes, to_matmul_nbits
from .qdq_modules import activation_exact, activation_integer, export_copy, nbits_weight, weight_int8

TARGETS = ("ort", "portable", "tensorrt")

INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearConv",
               "DynamicQuantizeMatMul")


class ExportError(ValueError):
    """The model holds grids ONNX cannot write exactly (and approximation was not asked for)."""


@dataclass
class ExportReport:
    path: str
    opset: int
    target: str = "ort"
    layers: list[dict] = field(default_factory=list)  # layer, kind, qdq, integer, reason
    integer_ops: dict = field(default_factory=dict)
    nbits_layers: list[str] = field(default_factory=list)  # weight-only MatMulNBits (4-bit codes, float input)
    int4_layers: list[str] = field(default_factory=list)  # weights stored as INT4 codes (portable target)
    approximate: list[str] = field(default_factory=list)  # quantizers written in float (allow_approx)
    float_weight_layers: list[str] = field(default_factory=list)  # no integer kernel: weight as float values
    weight_codes: int = 0  # weight tensors stored as integer codes
    file_bytes: int = 0
    check: dict | None = None  # agreement with the simulation on check_images

    @property
    def n_integer(self) -> int:
        return sum(1 for r in self.layers if r["integer"])

    def to_dict(self) -> dict:
        return {**asdict(self), "n_integer": self.n_integer, "n_layers": len(self.layers)}


def inexact_quantizers(model: nn.Module, target: str = "ort") -> dict[str, str]:
    """Quantizer name -> why ONNX cannot write its grid exactly for ``target`` (empty when the whole model can
    be)."""
    signed = target == "tensorrt"
    return {q.name: why for q in all_quantizers(model) if not q.is_weight and (why := activation_exact(q, signed))}


def _grid(q: TensorQuantizer) -> str:
    return f"{q.spec.bits}-bit {q.spec.scheme} {q.spec.granularity}"


def _layer_status(model: nn.Module, approximate: set[str]) -> list[dict]:
    rows = []
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            a = activation_integer(m.in_quant) and m.in_quant.name not in approximate
            w = weight_int8(m) is not None
            reason = "; ".join(r for r, bad in ((f"input {_grid(m.in_quant)}", not a),
                                                (f"weight {_grid(m.w_quant)}", not w)) if bad)
            rows.append({"layer": m.layer_name, "kind": "linear" if isinstance(m, QuantLinear) else "conv",
                         "qdq": a and w, "exact": m.in_quant.name not in approximate, "reason": reason})
        elif isinstance(m, QuantMatMul):
            ok = all(activation_integer(q) and q.name not in approximate for q in (m.a_quant, m.b_quant))
            bad = [q for q in (m.a_quant, m.b_quant) if not activation_integer(q)]
            rows.append({"layer": m.layer_name, "kind": "matmul", "qdq": ok,
                         "exact": not {m.a_quant.name, m.b_quant.name} & approximate,
                         "reason": "" if ok else "; ".join(f"{q.role} {_grid(q)}" for q in bad)})
    return rows


ONNX_FORMAT = "vitq-onnx/1"


def is_vitq_onnx(path: str | Path) -> bool:
    """True for an ONNX file that vitq exported (its metadata names :data:`ONNX_FORMAT`)."""
    return onnx_metadata(path).get("vitq_format") == ONNX_FORMAT


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an ONNX file (empty for a file that is not ONNX)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all (a protobuf parse error has no public type)
        return {}
    return {p.key: p.value for p in proto.metadata_props}


def _set_metadata(proto, values: dict[str, str]) -> None:
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for key, value in keep + sorted(values.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def export_onnx(model: nn.Module, input_size: tuple[int, int, int], out: str | Path, opset: int = 17,
                provenance: dict[str, str] | None = None, target: str = "ort", allow_approx: bool = False,
                check_images: torch.Tensor | None = None) -> ExportReport:
    """Write ``model`` (calibrated) as ONNX that computes what the simulation computes, atomically, and report
    what runs as integers.

    Args:
        model: the quantized model.
        input_size: ``(C, H, W)`` of one image.
        out: the ``.onnx`` file.
        opset: the ONNX opset of the trace (the portable target raises it to 21 for INT4 weights).
        provenance: string pairs (model, checkpoint, random_init) for the file's metadata, so whoever runs the
            file can tell random-init weights from trained ones.
        target: ``ort`` or ``portable`` (module docstring).
        allow_approx: write grids ONNX cannot hold in float instead of refusing; the report lists them.
        check_images: images to run the file on; its top-1 agreement with the simulation goes into the report
            and the file's metadata.

    Raises:
        ExportError: a grid ONNX cannot hold exactly (naming the layers), without ``allow_approx``.
        ValueError: an unknown target.
        ImportError: onnx / onnxruntime are not installed.
    """
    import onnx

    if target not in TARGETS:
        raise ValueError(f"unknown ONNX target {target!r}; choose one of {', '.join(TARGETS)}")
    inexact = inexact_quantizers(model, target)
    if inexact and not allow_approx:
        names = list(inexact)
        raise ExportError(f"{len(names)} quantizer(s) have grids ONNX cannot hold exactly, e.g. {names[0]} "
                          f"({inexact[names[0]]}){'; also ' + ', '.join(names[1:4]) if len(names) > 1 else ''}"
                          f"{' ...' if len(names) > 4 else ''}: the file would not be the scored model "
                          "(--allow-approx writes them in float and lists them)")
    m = export_copy(model, set(inexact), signed=target == "tensorrt")
    dummy = torch.zeros(1, *input_size)
    report = ExportReport(str(out), opset, target, _layer_status(model, set(inexact)), approximate=list(inexact))
    with atomic_path(out) as tmp:
        with torch.inference_mode():
            torch.onnx.export(m, (dummy,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load(str(tmp))
        nbits = {q.layer_name: q for q in model.modules() if isinstance(q, QuantLinear) and nbits_weight(q.w_quant)}
        if nbits and target == "ort":
            report.nbits_layers = to_matmul_nbits(proto, nbits)
        report.weight_codes = store_weight_codes(proto)
        if target == "portable":
            narrow = {q.layer_name for q in model.modules() if isinstance(q, (QuantLinear, QuantConv2d))
                      and q.w_quant.mode == "quant" and q.w_quant.spec.bits <= 4}
            report.int4_layers = store_int4(proto, narrow)
            report.opset = max(opset, 21) if report.int4_layers else opset
        _set_metadata(proto, {"vitq_format": ONNX_FORMAT, "vitq_version": __version__, "vitq_target": target,
                              "vitq_approximate": ",".join(inexact), **(provenance or {})})
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
        int_nodes = _integer_nodes(tmp)
        if target == "ort":
            # a layer ONNX Runtime runs in float anyway is faster on a constant float weight (same values)
            slow = {r["layer"] for r in report.layers if r["kind"] != "matmul" and r["layer"] not in
                    {module_path(n.name) for n in int_nodes} and r["layer"] not in report.nbits_layers}
            report.float_weight_layers = float_weights(proto, slow)
            if report.float_weight_layers:
                onnx.save(proto, str(tmp))
                int_nodes = _integer_nodes(tmp)
        for n in int_nodes:
            report.integer_ops[n.op_type] = report.integer_ops.get(n.op_type, 0) + 1
        paths = {module_path(n.name) for n in int_nodes}
        for row in report.layers:
            row["integer"] = row["layer"] in paths
            row["matmul_nbits"] = row["layer"] in report.nbits_layers
            if row["matmul_nbits"]:
                row["reason"] = "weight-only MatMulNBits: 4-bit weights, float activations"
            elif row["qdq"] and not row["integer"]:
                row["reason"] = "QDQ written, but ONNX Runtime has no integer fusion for this pattern"
            if row["layer"] in report.float_weight_layers:
                row["reason"] += "; weight stored as float values (faster for a float kernel, same values)"
        meta = {"vitq_integer_layers": f"{report.n_integer}/{len(report.layers)}"}
        if check_images is not None:
            report.check = check_against_simulation(tmp, model, check_images)
            meta.update({"vitq_check_images": str(report.check["images"]),
                         "vitq_check_agreement": f"{report.check['agreement']:.2f}"})
        _set_metadata(proto, meta)
        onnx.save(proto, str(tmp))
        report.file_bytes = os.path.getsize(tmp)
    return report


def _integer_nodes(path) -> list:
    """The integer operators in ONNX Runtime's optimized graph of the file (CPU provider)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath).graph
    return [n for n in graph.node if n.op_type in INTEGER_OPS]


def check_against_simulation(path: str | Path, model: nn.Module, images: torch.Tensor, batch: int = 32) -> dict:
    """Run the ONNX file and the simulation on ``images``: top-1 agreement (%) and the largest logit difference."""
    from .onnx_runtime import OnnxModel

    return agreement_with_simulation(OnnxModel(path), model, images, batch)
