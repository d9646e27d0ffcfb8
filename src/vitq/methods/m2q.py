"""M2Q: M2-ViT's two-level mixed quantization (Shi, Liang, Wang 2024), on the engine and the cost model.

Level 1 (scheme, per layer and per candidate weight bit-width): quantize the weights of every layer
once uniformly and once as powers of two (activations uniform in both), and keep the scheme whose
*quantized layer output* has the lower MSE on calibration data. Only linears and 1x1 dense convs may
become PoT (:attr:`~vitq.hardware.workload.Workload.pot_eligible`); depthwise, grouped and larger
convs stay uniform.

Level 2 (precision): Greedy MP's machinery with the accelerator's cost (EDP by default) as the budget:
start at the highest candidates, lower the layer whose KL increase on calibration images per unit of
cost saved is smallest, until the cost is at most ``budget`` x the INT8 baseline's. A layer lowered to
``b`` bits takes the scheme level 1 chose for ``b``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..hardware import HardwareSpec, estimate, extract_workloads, int8_baseline
from ..hardware.workload import Workload
from ..quant.config import ConfigError, LayerRule, QuantConfig
from ..quant.engine import all_quantizers, calibrate, prepare, weight_layers
from timm.layers.padding import pad_same

from ..quant.layers import QuantConv2d
from .greedy_mp import Budget, greedy_mp
from .mp_budget import budget_option
from .mptq import MethodOptions


@dataclass
class SchemeChoice:
    """Level 1's decision for one layer at one weight bit-width, with the errors that decided it."""

    layer: str
    bits: int
    scheme: str
    mse_uniform: float
    mse_pot: float | None  # None: not eligible for PoT (held to uniform)


@dataclass
class M2QResult:
    config: QuantConfig
    schemes: dict[int, dict[str, SchemeChoice]]
    layers: list[dict] = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)
    search_s: float = 0.0
    steps: int = 0
    kl_final: float = 0.0
    curve: dict[float, QuantConfig] = field(default_factory=dict)  # budget fraction -> config


def _quantized_output(m: nn.Module, x: torch.Tensor, in_q, w_q) -> torch.Tensor:
    """The layer's output with input quantizer ``in_q`` and weight quantizer ``w_q`` (modes ignored)."""
    xq = in_q.fake_quant(x)
    wq = w_q.fake_quant(m.weight)
    if isinstance(m, QuantConv2d):
        if m.same_padding:
            xq = pad_same(xq, m.weight.shape[-2:], m.stride, m.dilation)
        return m._conv_forward(xq, wq, m.bias)
    return F.linear(xq, wq, m.bias)


@torch.inference_mode()
def choose_schemes(fp_model: nn.Module, calib: torch.Tensor, base: QuantConfig, bits: int,
                   input_size: tuple[int, int, int], n_images: int = 8) -> dict[str, SchemeChoice]:
    """Level 1 at ``bits``-bit weights: uniform or PoT per layer, by quantized-output MSE on calibration data.

    Both variants are calibrated with the same activation settings (``base.a_bits``); each eligible
    layer's float input (upstream layers in float) is fed to both quantized versions of the layer.
    """
    variants = {}
    for scheme in ("uniform", "pot"):
        cfg = replace(base, w_bits=bits, w_scheme=scheme, rules=[])
        q = prepare(fp_model, cfg)
        calibrate(q, cfg, calib, progress=False)
        variants[scheme] = q
    uni, pot = variants["uniform"], variants["pot"]
    eligible = {w.name for w in extract_workloads(uni, input_size) if w.pot_eligible}
    pot_layers = {m.layer_name: m for m in weight_layers(pot)}
    errors: dict[str, list[float]] = {m.layer_name: [0.0, 0.0] for m in weight_layers(uni)}
    hooks = []

    def hook(m, args, out):
        x = args[0]
        ref = out.float()
        e = errors[m.layer_name]
        e[0] += (_quantized_output(m, x, m.in_quant, m.w_quant) - ref).pow(2).mean().item()
        if m.layer_name in eligible:
            p = pot_layers[m.layer_name]
            e[1] += (_quantized_output(m, x, m.in_quant, p.w_quant) - ref).pow(2).mean().item()

    # Run the uniform model in float (quantizers off), so each layer sees its float input.
    modes = [(q, q.mode) for q in all_quantizers(uni)]
    for q, _ in modes:
        q.mode = "off"
    for m in weight_layers(uni):
        hooks.append(m.register_forward_hook(hook))
    try:
        uni(calib[:n_images])
    finally:
        for h in hooks:
            h.remove()
        for q, mode in modes:
            q.mode = mode
    out = {}
    for name, (eu, ep) in errors.items():
        if name in eligible:
            out[name] = SchemeChoice(name, bits, "pot" if ep < eu else "uniform", eu, ep)
        else:
            out[name] = SchemeChoice(name, bits, "uniform", eu, None)
    return out


def _apply_assignment(workloads: list[Workload], assign: dict[str, dict[str, int]],
                      schemes: dict[int, dict[str, SchemeChoice]]) -> list[Workload]:
    out = []
    for w in workloads:
        a = assign.get(w.name, {})
        if w.op == "div":
            out.append(w)
        elif w.op == "matmul":
            bits = a.get("A", w.a_bits)
            out.append(w.with_bits(bits, bits))
        else:
            wb = a.get("W", w.w_bits)
            choice = schemes.get(wb, {}).get(w.name)
            out.append(w.with_bits(wb, a.get("A", w.a_bits), choice.scheme if choice else "uniform"))
    return out


def m2q(fp_model: nn.Module, calib: torch.Tensor, base: QuantConfig, hw: HardwareSpec, budget: float,
        input_size: tuple[int, int, int], metric: str = "edp", w_candidates=(4, 8), a_candidates=(8,),
        n_probe: int = 8, lower_per_step: int = 4, progress: bool = True, allow_pot: bool = True,
        curve: tuple[float, ...] = (), best_effort: bool = False) -> tuple[nn.Module, M2QResult]:
    """Two-level mixed quantization under ``budget`` x the INT8 baseline's ``metric``.

    Args:
        fp_model: the float model.
        calib: calibration images (the search never sees evaluation images).
        base: protocol, observer and the rest; its bits are replaced by the candidates.
        hw: the accelerator.
        budget: fraction of the INT8 baseline's metric, in (0, 1].
        input_size: (C, H, W) of one image, for the cost model's shapes.
        metric: ``edp``, ``energy`` or ``latency``.
        w_candidates / a_candidates: candidate bit-widths (default W {4, 8}, A {8}).
        allow_pot: False skips level 1 (every layer uniform): uniform mixed precision under the same
            cost budget, the reference M2Q is compared with.
        curve: larger budget fractions whose configs the same search also returns (``result.curve``).
        best_effort: return the cheapest reachable assignment instead of raising if ``budget`` is unreachable.

    Raises:
        ConfigError: a bad metric or budget, or a budget the candidates cannot reach.
    """
    import time

    if metric not in ("edp", "energy", "latency"):
        raise ConfigError(f"cost metric must be edp, energy or latency, got {metric!r}")
    if not 0 < budget <= 1:
        raise ConfigError(f"{budget_option(metric)} is a fraction of the INT8 baseline in (0, 1], got {budget}")
    t0 = time.perf_counter()
    w_c = tuple(sorted(set(w_candidates)))
    schemes = {b: choose_schemes(fp_model, calib, base, b, input_size)
               for b in tqdm(w_c, desc="M2Q level 1 (schemes)", disable=None if progress else True, leave=False)} if allow_pot else {}
    structure = prepare(fp_model, replace(base, w_bits=8, a_bits=8, rules=[]))
    workloads = extract_workloads(structure, input_size)
    baseline = estimate(int8_baseline(workloads), hw)

    def rules_for(b: int) -> list[LayerRule]:
        return [LayerRule(name, w_scheme="pot") for name, c in schemes.get(b, {}).items() if c.scheme == "pot"]

    def bank_config(b: int) -> QuantConfig:
        return replace(base, w_bits=b, a_bits=b, rules=rules_for(b))

    def cost(assign: dict[str, dict[str, int]]) -> float:
        return estimate(_apply_assignment(workloads, assign, schemes), hw).metric(metric)

    limit = budget * baseline.metric(metric)
    model, res = greedy_mp(fp_model, calib, base, MethodOptions(), Budget(cost=limit), w_c, a_candidates,
                           n_probe=n_probe, lower_per_step=lower_per_step, progress=progress,
                           bank_config=bank_config, cost=cost,
                           snapshots=tuple(f * baseline.metric(metric) for f in curve), best_effort=best_effort,
                           uniform_fallback=False)  # keep the final point on the same search path as the curve

    def config_of(assign: dict[str, dict[str, int]]) -> QuantConfig:
        # bits from Greedy MP plus each layer's scheme at its bits
        rules = []
        for layer, kinds in assign.items():
            choice = schemes.get(kinds.get("W"), {}).get(layer)
            rules.append(LayerRule(layer, w_bits=kinds.get("W"), a_bits=kinds.get("A"),
                                   w_scheme=choice.scheme if choice else None))
        return replace(base, rules=rules)

    final = {r["layer"]: {k: v for k, v in (("W", r["w_bits"]), ("A", r["a_bits"])) if v is not None}
             for r in res.layers}
    config = config_of(final)
    model.vitq_config = config
    final_w = extract_workloads(model, input_size)
    report = estimate(final_w, hw)
    by_layer = {c.name: c for c in report.layers}
    layers = []
    for w in final_w:
        c = by_layer[w.name]
        choice = schemes.get(w.w_bits, {}).get(w.name)
        layers.append({"layer": w.name, "op": w.op, "scheme": w.scheme, "w_bits": w.w_bits if w.op not in ("matmul", "div") else None,
                       "a_bits": w.a_bits if w.op != "div" else None, "engine": c.engine, "macs": w.macs,
                       "energy_j": c.energy_j, "latency_s": c.latency_s, "edp_share": c.edp_share,
                       "mse_uniform": choice.mse_uniform if choice else None,
                       "mse_pot": choice.mse_pot if choice else None})
    result = M2QResult(config, schemes, layers, report.to_dict(), baseline.to_dict(),
                       time.perf_counter() - t0, res.steps, res.kl_final)
    result.curve = {f: config_of(res.snapshots[f * baseline.metric(metric)]) for f in curve
                    if f * baseline.metric(metric) in res.snapshots}
    return model, result


def fixed_scheme_config(fp_model: nn.Module, base: QuantConfig, input_size: tuple[int, int, int],
                        pot_bits: int = 4) -> QuantConfig:
    """The "PoT only" reference: every PoT-eligible layer at ``pot_bits``-bit PoT weights, the others at
    ``base.w_bits`` uniform, activations at ``base.a_bits``."""
    structure = prepare(fp_model, replace(base, rules=[]))
    names = [w.name for w in extract_workloads(structure, input_size) if w.pot_eligible]
    return replace(base, rules=[LayerRule(n, w_bits=pot_bits, w_scheme="pot") for n in names])
