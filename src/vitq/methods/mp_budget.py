"""Mixed-precision budgets: the targets, checked before any work (a budget the candidates cannot reach is
refused at once, naming the smallest one they can), and the accounting the search does against them."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..quant.config import ConfigError, QuantConfig
from ..quant.engine import compute_layers, model_stats, prepare, weight_layers
from ..quant.layers import QuantMatMul
from .mp_probe import Item


@dataclass
class Budget:
    """Targets: average weight bits, average activation bits, model size in MB, and/or GBOPs per image.

    BOPs are counted as in :func:`vitq.quant.engine.model_stats`: MACs x weight bits x activation bits
    (the two operands' bits for activation matmuls), per image.
    """

    w_bits: float | None = None
    a_bits: float | None = None
    size_mb: float | None = None
    gbops: float | None = None
    cost: float | None = None  # the largest value of the ``cost`` function passed to greedy_mp (e.g. EDP)

    def __post_init__(self):
        if all(v is None for v in (self.w_bits, self.a_bits, self.size_mb, self.gbops, self.cost)):
            raise ConfigError("a mixed-precision budget needs --budget-w, --budget-a, --budget-mb or --budget-gbops")
        check_budget_values(w=self.w_bits, a=self.a_bits, mb=self.size_mb, gbops=self.gbops)


def check_budget_values(**values: float | None) -> None:
    """Each given budget must be a positive finite number.

    Raises:
        ConfigError: naming the option.
    """
    for name, v in values.items():
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{budget_option(name)} must be a positive finite number, got {v}")


def budget_option(name: str) -> str:
    """How a user gives the budget ``name``: its command-line option, or its settings key."""
    return f"budget.{name}" if name in ("energy", "latency") else f"--budget-{name.replace('_', '-')}"


def smallest_size_mb(model: nn.Module, config: QuantConfig, w_bits: int) -> float:
    """The model size (as ``engine.model_stats`` counts it, in MB) with every weight at ``w_bits``: quantized
    weights, one fp32 scale per channel or group, and every other parameter in fp32."""
    prepared = prepare(model, config)
    quantized = {id(m.weight) for m in weight_layers(prepared)}
    bits = 0
    for m in weight_layers(prepared):
        n = m.weight.numel()
        gran = config.layer_settings(m.layer_name)["w_granularity"]
        scales = {"per_tensor": 1, "per_channel": m.weight.shape[0]}.get(gran, math.ceil(n / config.group_size))
        bits += n * w_bits + scales * 32
    bits += sum(p.numel() * 32 for p in prepared.parameters() if id(p) not in quantized)
    return bits / 8 / 1e6


def check_budget_reachable(model: nn.Module, config: QuantConfig, w_candidates, a_candidates, *,
                           w_bits: float | None = None, a_bits: float | None = None,
                           size_mb: float | None = None) -> None:
    """Refuse a bit or size budget below what the lowest candidates give, before any calibration.

    The averages exclude the first layer's 8-bit image input, as the search does, so the lowest candidate
    is the floor of each.

    Raises:
        ConfigError: naming the budget and the smallest value the candidates reach.
    """
    w_min, a_min = min(w_candidates), min(a_candidates)
    if w_bits is not None and w_bits < w_min:
        raise ConfigError(f"--budget-w {w_bits} is unreachable: the weight candidates {tuple(w_candidates)} average "
                          f"at least {w_min} bits")
    if a_bits is not None and a_bits < a_min:
        raise ConfigError(f"--budget-a {a_bits} is unreachable: the activation candidates {tuple(a_candidates)} "
                          f"average at least {a_min} bits")
    if size_mb is not None:
        floor = smallest_size_mb(model, config, w_min)
        if size_mb < floor:
            raise ConfigError(f"--budget-mb {size_mb} is unreachable: with every weight at {w_min} bits the model "
                              f"takes {floor:.3f} MB")


class Accounts:
    """What an assignment of the items' current widths costs against a :class:`Budget`: average bits,
    size, BOPs and an optional cost function (e.g. the accelerator's EDP), and what lowering one item saves."""

    def __init__(self, model: nn.Module, items: list[Item], budget: Budget,
                 cost: Callable[[dict[str, dict[str, int]]], float] | None = None):
        self.items, self.budget, self.cost = items, budget, cost
        self.w_total = sum(i.size for i in items if i.kind == "W")
        # The A budget averages over the searchable activations: the image input of the first layer is
        # fixed at 8 bits and not counted (otherwise a 4-bit budget could never be met; the report's
        # avg_a_bits does count it, so a 4-bit search reports e.g. 4.05 there, like uniform W4A4).
        self.a_total = sum(i.size for i in items if i.kind == "A")
        self.size_const_bits = model_stats(model)["size_bytes"] * 8 - sum(i.size * i.bits for i in items
                                                                           if i.kind == "W")
        # BOPs per image: each compute layer's MACs times its two operands' bits. ``partner`` maps an
        # operand quantizer to (MACs, the other operand's quantizer) so an item's saving is exact.
        n_img = max(1, getattr(model, "vitq_calib_images", 1))
        self.operands = []
        for m in compute_layers(model):
            pair = (m.a_quant, m.b_quant) if isinstance(m, QuantMatMul) else (m.w_quant, m.in_quant)
            self.operands.append((m.macs / n_img, *pair))
        self.partner: dict[int, list] = {}
        for macs, qa, qb in self.operands:
            self.partner.setdefault(id(qa), []).append((macs, qb))
            self.partner.setdefault(id(qb), []).append((macs, qa))
        self.bops_max = sum(macs * qa.spec.bits * qb.spec.bits for macs, qa, qb in self.operands)

    def avg_w(self) -> float:
        return sum(i.size * i.bits for i in self.items if i.kind == "W") / max(1, self.w_total)

    def avg_a(self) -> float:
        return sum(i.size * i.bits for i in self.items if i.kind == "A") / max(1, self.a_total)

    def size_mb(self) -> float:
        return (self.size_const_bits + sum(i.size * i.bits for i in self.items if i.kind == "W")) / 8 / 1e6

    def gbops(self) -> float:
        return sum(macs * qa.spec.bits * qb.spec.bits for macs, qa, qb in self.operands) / 1e9

    def bits_need(self, kind: str) -> bool:
        """Whether the average-bit or size budget of ``kind`` ("W" or "A"; never "S") is unmet."""
        b = self.budget
        if kind == "S":  # a weight scheme changes neither bits nor size
            return False
        if kind == "W":
            return (b.w_bits is not None and self.avg_w() > b.w_bits + 1e-9) or (
                b.size_mb is not None and self.size_mb() > b.size_mb + 1e-12)
        return b.a_bits is not None and self.avg_a() > b.a_bits + 1e-9

    def assignment(self, lowered: Item | None = None) -> dict[str, dict[str, int]]:
        """``{layer: {"W": bits, "A": bits}}`` now, or with ``lowered`` one step down."""
        out: dict[str, dict[str, int]] = {}
        for i in self.items:
            out.setdefault(i.layer, {})[i.kind] = i.choices[i.level - 1] if i is lowered else i.bits
        return out

    def current_cost(self) -> float | None:
        return self.cost(self.assignment()) if self.cost is not None else None

    def cost_binds(self, now: float | None) -> bool:
        """Whether the cost budget is unmet; ``now`` is the current cost (None without a cost function)."""
        return now is not None and self.budget.cost is not None and now > self.budget.cost * (1 + 1e-12)

    def need(self, kind: str, now: float | None) -> bool:
        """Whether any budget still asks ``kind`` to come down (a scheme: only the cost budget)."""
        if kind == "S":
            return self.cost_binds(now)
        return self.bits_need(kind) or (self.budget.gbops is not None and self.gbops() > self.budget.gbops + 1e-12) \
            or self.cost_binds(now)

    def saved(self, item: Item, now: float | None) -> float:
        """What one step down saves of the binding budget: average bits, else cost, else BOPs."""
        drop = item.bits - item.choices[item.level - 1]
        if self.bits_need(item.kind) or (self.budget.gbops is None and not self.cost_binds(now)):
            return drop * item.size / (self.w_total if item.kind == "W" else self.a_total)
        if self.cost_binds(now):
            return now - self.cost(self.assignment(item))
        bops = sum(macs * drop * other.spec.bits for q in item.quantizers
                   for macs, other in self.partner.get(id(q), []))
        return bops / max(1.0, self.bops_max)
