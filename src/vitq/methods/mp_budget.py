"""Mixed-precision budgets checked before any work: a budget the candidates cannot reach is refused at once,
naming the smallest one they can."""
from __future__ import annotations

import math

from torch import nn

from ..quant.config import ConfigError, QuantConfig
from ..quant.engine import prepare, weight_layers


def check_budget_values(**values: float | None) -> None:
    """Each given budget must be a positive finite number.

    Raises:
        ConfigError: naming the option.
    """
    for name, v in values.items():
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"--budget-{name.replace('_', '-')} must be a positive finite number, got {v}")


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
