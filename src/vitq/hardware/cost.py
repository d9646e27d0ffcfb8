"""Energy, latency and EDP of a model on the heterogeneous accelerator, layer by layer.

Per layer (one image), from its :class:`~vitq.hardware.workload.Workload` and the :class:`HardwareSpec`:

* Compute energy. MAC engine: ``macs x (multiply(w, a) + add(acc_bits))``, with
  ``multiply(w, a) = mult_pj_8x8 x w a / 64`` and ``add(n) = add_pj_32 x n / 32``. Shift-add engine, PoT
  weights: ``macs x (shift_vs_add x add(width) + add(acc_bits))`` with ``width = min(a + max_shift,
  acc_bits)``, where ``max_shift = 2^(w-1) - 2`` is the largest exponent gap a ``w``-bit PoT code (sign,
  zero and ``2^(w-1) - 1`` exponents) can encode; APoT weights (two terms): two shifts and the add of the
  two shifted operands, ``macs x ((2 shift_vs_add + 1) x add(width) + add(acc_bits))``, ``max_shift`` being
  the smallest term's exponent. Division (LiteMLA): one ``div_bits x div_bits`` multiply per element.
* A layer split between the engines (``mixed`` weights: some output channels APoT) runs its two parts at
  once: ``share x macs`` on the shift-add engine and the rest on the MAC engine; its compute time is the
  longer part's, its energy the sum.
* Memory traffic, with this tiling (weight-stationary, layer by layer): the weights are cut into
  ``n_tiles = ceil(weight bits / weight buffer)`` tiles (for a matmul the second operand is the
  stationary one); for each tile the whole input streams from the activation buffer. SRAM traffic =
  weights + n_tiles x inputs + outputs. DRAM traffic = the weights (fetched once per image) plus any
  activation larger than the activation buffer (inputs re-read per tile, outputs written once);
  activations that fit stay on chip. Outputs are counted at the layer's activation bits.
* Latency: roofline, ``max(compute time, DRAM time)``. Compute time = ``macs / (units x speed-up x freq)``,
  the speed-up being Bit Fusion's ``(8 / ceil2(w)) x (8 / ceil2(a))`` on a precision-scalable MAC engine
  (1 otherwise, and 1 on the shift-add engine); DRAM time = DRAM bits / bandwidth.

Whole model: energy is the sum. Latency follows ``hw.schedule``: ``pipeline`` (the MAC engine, the
shift-add engine and DRAM each work on different layers of consecutive images, so the busiest of the
three sets the time per image) or ``sequential`` (the sum of layer latencies). EDP = energy x latency.
A layer's *EDP share* is its ``energy x latency`` over the sum of all layers' ``energy x latency``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..quant.quantizers import apot_max_shift
from .spec import HardwareSpec
from .workload import Workload


@dataclass
class LayerCost:
    name: str
    op: str
    engine: str
    scheme: str
    w_bits: int
    a_bits: int
    macs: int
    compute_pj: float
    sram_pj: float
    dram_pj: float
    sram_bits: int
    dram_bits: int
    compute_s: float
    dram_s: float
    edp_share: float = 0.0
    shift_share: float = 0.0  # of the MACs, on the shift-add engine
    mac_s: float = 0.0  # compute time of each engine's part
    shift_s: float = 0.0

    @property
    def energy_j(self) -> float:
        return (self.compute_pj + self.sram_pj + self.dram_pj) * 1e-12

    @property
    def latency_s(self) -> float:
        return max(self.compute_s, self.dram_s)

    def busy_s(self, engine: str) -> float:
        """The time this layer holds ``engine`` (``mac`` or ``shift``): its part's compute time, at least the
        layer's DRAM time when it has a part there (roofline)."""
        part = self.mac_s if engine == "mac" else self.shift_s
        return max(part, self.dram_s) if part > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "energy_j": self.energy_j, "latency_s": self.latency_s}


@dataclass
class CostReport:
    """Totals and per-layer costs. ``latency_s`` follows the spec's schedule."""

    energy_j: float
    latency_s: float
    edp: float
    schedule: str
    busy_s: dict = field(default_factory=dict)  # MAC engine, shift-add engine, DRAM
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def shift_mac_share(self) -> float:
        """The fraction of the model's MACs on the shift-add engine."""
        macs = sum(c.macs for c in self.layers)
        return sum(c.macs * c.shift_share for c in self.layers) / macs if macs else 0.0

    def metric(self, name: str) -> float:
        """``edp``, ``energy`` or ``latency``."""
        return {"edp": self.edp, "energy": self.energy_j, "latency": self.latency_s}[name]

    def to_dict(self) -> dict:
        return {"energy_j": self.energy_j, "latency_s": self.latency_s, "edp": self.edp, "schedule": self.schedule,
                "busy_s": self.busy_s, "macs": sum(c.macs for c in self.layers),
                "shift_mac_share": self.shift_mac_share,
                "layers": [c.to_dict() for c in self.layers]}


METRICS = ("edp", "energy", "latency")


def add_pj(bits: float, hw: HardwareSpec) -> float:
    return hw.energy.add_pj_32 * bits / 32


def mult_pj(w_bits: int, a_bits: int, hw: HardwareSpec) -> float:
    return hw.energy.mult_pj_8x8 * w_bits * a_bits / 64


def _ceil2(bits: int) -> int:
    for c in (2, 4, 8):
        if bits <= c:
            return c
    return bits


def mac_speedup(w_bits: int, a_bits: int, hw: HardwareSpec) -> float:
    """Products per cycle per MAC unit, relative to 8x8 bits (Bit Fusion composition)."""
    if not hw.engines.mac_precision_scalable:
        return 1.0 if max(w_bits, a_bits) <= 8 else 64 / (w_bits * a_bits)
    return 64 / (_ceil2(w_bits) * _ceil2(a_bits))


def layer_cost(w: Workload, hw: HardwareSpec) -> LayerCost:
    """The cost of one layer for one image (see the module docstring for the model)."""
    e, eng, mem = hw.energy, hw.engines, hw.memory
    acc = add_pj(e.acc_bits, hw)
    engine, share = w.engine, w.share
    if w.op == "div":
        wb = ab = e.div_bits
        compute_pj = w.macs * mult_pj(wb, ab, hw)
        mac_s = w.macs / (eng.mac_units * mac_speedup(wb, ab, hw) * eng.freq_hz)
        shift_s = 0.0
    else:
        wb, ab = w.w_bits, w.a_bits
        shift_macs = w.macs * share
        mac_macs = w.macs - shift_macs
        mac_s = mac_macs / (eng.mac_units * mac_speedup(wb, ab, hw) * eng.freq_hz)
        shift_s = shift_macs / (eng.shift_units * eng.freq_hz)
        compute_pj = mac_macs * (mult_pj(wb, ab, hw) + acc) + (shift_macs * shift_op_pj(w, hw) if shift_macs else 0.0)
    compute_s = max(mac_s, shift_s)

    act_buf = mem.act_buffer_kib * 1024 * 8
    if w.op == "matmul":
        in_bits = w.in_elems[0] * w.a_bits
        stationary = w.in_elems[1] * w.w_bits
        dram_weights = 0
        in_bits_total = in_bits + stationary
    elif w.op == "div":
        in_bits = in_bits_total = w.in_elems[0] * e.div_bits
        stationary = dram_weights = 0
    else:
        in_bits = in_bits_total = w.in_elems[0] * w.a_bits
        stationary = dram_weights = w.weight_elems * w.w_bits
    out_bits = w.out_elems * (e.div_bits if w.op == "div" else w.a_bits)
    n_tiles = max(1, math.ceil(stationary / (mem.weight_buffer_kib * 1024 * 8)))
    sram_bits = stationary + n_tiles * in_bits + (in_bits_total - in_bits) + out_bits
    dram_bits = dram_weights
    if in_bits_total > act_buf:
        dram_bits += n_tiles * in_bits + (in_bits_total - in_bits)
    if out_bits > act_buf:
        dram_bits += out_bits
    return LayerCost(
        name=w.name, op=w.op, engine=engine, scheme=w.scheme, w_bits=w.w_bits, a_bits=w.a_bits, macs=w.macs,
        compute_pj=compute_pj, sram_pj=sram_bits * e.sram_pj_per_64b / 64, dram_pj=dram_bits * e.dram_pj_per_64b / 64,
        sram_bits=int(sram_bits), dram_bits=int(dram_bits), compute_s=compute_s,
        dram_s=dram_bits / 8 / (mem.dram_gb_per_s * 1e9), shift_share=share, mac_s=mac_s, shift_s=shift_s)


def shift_op_pj(w: Workload, hw: HardwareSpec) -> float:
    """Energy of one product and accumulation on the shift-add engine for ``w``'s weights: PoT (one shift) or
    APoT / the APoT channels of a mixed grid (two shifts and an add), module docstring."""
    e = hw.energy
    if w.scheme == "pot":
        width = min(w.a_bits + 2 ** (w.w_bits - 1) - 2, e.acc_bits)
        return e.shift_vs_add * add_pj(width, hw) + add_pj(e.acc_bits, hw)
    width = min(w.a_bits + apot_max_shift(w.w_bits), e.acc_bits)
    return (2 * e.shift_vs_add + 1) * add_pj(width, hw) + add_pj(e.acc_bits, hw)


def estimate(workloads: list[Workload], hw: HardwareSpec) -> CostReport:
    """Energy, latency and EDP of the whole model (one image) on ``hw``."""
    layers = [layer_cost(w, hw) for w in workloads]
    energy = sum(c.energy_j for c in layers)
    busy = {"mac": sum(c.busy_s("mac") for c in layers), "shift": sum(c.busy_s("shift") for c in layers),
            "dram": sum(c.dram_s for c in layers)}
    latency = max(busy.values()) if hw.schedule == "pipeline" else sum(c.latency_s for c in layers)
    total_ed = sum(c.energy_j * c.latency_s for c in layers) or 1.0
    for c in layers:
        c.edp_share = c.energy_j * c.latency_s / total_ed
    return CostReport(energy, latency, energy * latency, hw.schedule, busy, layers)


def int8_baseline(workloads: list[Workload]) -> list[Workload]:
    """The same layers at uniform INT8 weights and activations, all on the MAC engine (Trio-ViT-style)."""
    return [w if w.op == "div" else w.with_bits(8, 8, "uniform") for w in workloads]
