"""What vitq quantizes in a model: its family, the tensors quantized in each protocol, the attention matmuls,
and what stays in float and why (``vitq models --coverage``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters import UnsupportedModel, check_supported
from .adapters.base import attention_ops
from .quant.config import QuantConfig
from .quant.engine import all_quantizers, prepare, weight_layers
from .quant.layers import QuantMatMul
from .zoo import ZOO, create_model, get_entry

# Beyond the zoo: timm models users ask about (random weights: structure only).
EXTRA = ("deit3_small_patch16_224", "resnet18", "convnext_atto", "levit_128s", "mobilevit_xxs", "mobilevitv2_050",
         "efficientformerv2_s0", "eva02_tiny_patch14_224")
BY_DESIGN = "norms, softmax, GELU and residual additions stay float in the standard protocol (the full one quantizes their inputs)"
FAMILY_NOTES = {
    "cnn": "BatchNorm folded into the convolutions; activations and residual additions stay float in the standard "
           "protocol",
    "mobilevit": "BatchNorm folded; norms, softmax and residual additions stay float in both protocols (the "
                 "full one adds the activations' inputs)",
    "efficientformerv2": "BatchNorm folded; softmax, the attention biases and talking heads, layer scales and "
                         "residual additions stay float in both protocols (the full one adds the GELU inputs)",
    "levit": "BatchNorm folded; softmax, the attention biases and residual additions stay float in both protocols "
             "(the full one adds the activations' inputs)",
}


@dataclass
class Coverage:
    """One model's row of the coverage table."""

    model: str
    family: str
    weights: int = 0  # Linear and Conv2d layers with quantized weights
    matmuls: int = 0  # activation x activation matmuls with both operands quantized (runs on one image)
    float_ops: dict[str, int] = field(default_factory=dict)  # attention ops left in float (standard protocol)
    tensors: dict[str, int] = field(default_factory=dict)  # protocol -> quantized tensors (weights + activations run)
    unused: list[str] = field(default_factory=list)  # activation quantizers placed but never run
    refused: str = ""  # why no adapter takes it

    def float_note(self) -> str:
        if self.refused:
            return self.refused
        notes = [FAMILY_NOTES.get(self.family, BY_DESIGN)]
        ops = {k: v for k, v in self.float_ops.items() if k != "softmax"}
        if ops:
            notes.append("activation matmuls left in float: " + ", ".join(f"{k} x{v}" for k, v in ops.items()))
        if self.unused:
            notes.append(f"{len(self.unused)} activation quantizer(s) never run, e.g. {self.unused[0]}")
        return "; ".join(notes)


def coverage(name: str) -> Coverage:
    """Build ``name`` with random weights and count what each protocol quantizes on one random image."""
    entry = get_entry(name)
    torch.manual_seed(0)
    model = create_model(entry).eval()
    size = entry.transform.input_size
    try:
        family = check_supported(model, "", size).family
    except UnsupportedModel as exc:
        why = str(exc).split("; supported")[0]
        return Coverage(entry.timm_name, "none", refused=f"refused: {why}")
    row = Coverage(entry.timm_name, family)
    x = torch.randn(1, *size)
    for protocol in ("standard", "full"):
        q = prepare(model, QuantConfig(protocol=protocol))
        acts = [t for t in all_quantizers(q) if not t.is_weight]
        for t in acts:
            t.calls = 0
        with torch.inference_mode():
            q(x)
        n_weights = len(weight_layers(q))
        row.tensors[protocol] = n_weights + sum(t.calls > 0 for t in acts)
        if protocol == "standard":
            row.weights = n_weights
            row.matmuls = sum(isinstance(m, QuantMatMul) and m.a_quant.calls > 0 for m in q.modules())
            row.unused = [t.name for t in acts if t.calls == 0]
            row.float_ops = attention_ops(q, size, skip=(QuantMatMul,))
    return row


def coverage_table(names: list[str] | None = None) -> str:
    """The coverage of the zoo and :data:`EXTRA` (or ``names``) as a Markdown table."""
    names = names or [*ZOO, *EXTRA]
    rows = ["| model | family | weight layers | attention matmuls quantized | tensors quantized (standard / full) "
            "| left in float, and why |", "|---|---|---|---|---|---|"]
    for n in names:
        c = coverage(n)
        tensors = " / ".join(str(c.tensors[p]) for p in ("standard", "full")) if c.tensors else "-"
        rows.append(f"| {c.model} | {c.family} | {c.weights or '-'} | {c.matmuls if not c.refused else '-'} | "
                    f"{tensors} | {c.float_note()} |")
    return "\n".join(rows)
