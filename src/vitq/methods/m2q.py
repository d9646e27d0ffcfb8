"""M2Q: M2-ViT's two-level mixed quantization (Shi, Liang, Wang 2024), on the engine and the cost model.

Level 1 (scheme), at each candidate weight bit-width ``b``; only linears and 1x1 dense convs may take the
shift-add engine's grid, additive power-of-two (APoT) (:attr:`~vitq.hardware.workload.Workload.pot_eligible`);
depthwise, grouped and larger convs stay uniform:

* ``channel`` (default): an eligible layer may split its output channels between a uniform grid (MAC
  engine) and an APoT grid (shift-add engine). Whether it does, at its width, is a search item of level 2
  (kind ``S``), lowered from uniform to split like a width when the KL it costs per unit of cost saved is the
  smallest. The share on APoT, one per width, is the one that minimizes the model's cost with every layer at
  that width (:func:`model_share`: on the default accelerator's pipeline schedule, where the engines' totals
  set the time, it balances the two engines over the whole model, 0.60 at 8 x 8 bits and 0.45 at 4 x 8 bits
  on DeiT-Tiny, above the per-layer balance of :func:`balanced_share`, a half and a third); the channels
  that go are those that lose least by it (weight error, or the layer's output error when GPTQ runs).
* ``layer``: each eligible layer is uniform or APoT as a whole, whichever gives the lower *quantized layer
  output* MSE on calibration data.
* ``none``: every layer uniform (uniform mixed precision under the same cost budget: the reference).

Level 2 (precision): Greedy MP's machinery with the accelerator's cost (EDP by default) as the budget:
start at the highest candidates, lower the layer whose KL increase on calibration images per unit of
cost saved is smallest, until the cost is at most ``budget`` x the INT8 baseline's. A layer lowered to
``b`` bits takes level 1's scheme for ``b`` (``channel``: the split, if its scheme item chose it). The
search runs on the MPTQ passes that ``options`` turn on (SQ-b, OPT-m, GPTQ: GPTQ rounds onto APoT and split
grids too).

:func:`paper_config` is M2-ViT's own recipe, with no search: depthwise convolutions W4 uniform, the other
eligible layers W8 with each output channel uniform or APoT by the lower weight error, activations 8 bits.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..hardware import HardwareSpec, estimate, extract_workloads, int8_baseline
from ..hardware.cost import mac_speedup
from ..hardware.workload import Workload
from ..quant.config import ConfigError, LayerRule, QuantConfig
from ..quant.engine import all_quantizers, calibrate, prepare, weight_layers
from timm.layers.padding import pad_same

from ..quant.layers import QuantConv2d
from .greedy_mp import Budget, greedy_mp
from .mp_budget import budget_option
from .mptq import MethodOptions
from .options import M2Q_LEVELS as LEVELS


@dataclass
class SchemeChoice:
    """Level 1's decision for one layer at one weight bit-width, with the errors that decided it."""

    layer: str
    bits: int
    scheme: str
    mse_uniform: float
    mse_pot: float | None  # APoT's error; None: not eligible for the shift-add engine (held to uniform)


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
    """Level 1 at ``bits``-bit weights, per layer: uniform or APoT, by quantized-output MSE on calibration data.

    Both variants are calibrated with the same activation settings (``base.a_bits``); each eligible
    layer's float input (upstream layers in float) is fed to both quantized versions of the layer.
    """
    variants = {}
    for scheme in ("uniform", "apot"):
        cfg = replace(base, w_bits=bits, w_scheme=scheme, rules=[])
        q = prepare(fp_model, cfg)
        calibrate(q, cfg, calib, progress=False)
        variants[scheme] = q
    uni, pot = variants["uniform"], variants["apot"]
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
            out[name] = SchemeChoice(name, bits, "apot" if ep < eu else "uniform", eu, ep)
        else:
            out[name] = SchemeChoice(name, bits, "uniform", eu, None)
    return out


def balanced_share(w_bits: int, a_bits: int, hw: HardwareSpec) -> float:
    """The share of a layer's MACs on the shift-add engine at which both engines finish it together: the
    shift-add engine's products per cycle over both engines' (the MAC engine's scale with the bit-widths)."""
    mac = hw.engines.mac_units * mac_speedup(w_bits, a_bits, hw)
    return hw.engines.shift_units / (hw.engines.shift_units + mac)


def at_width(workloads: list[Workload], w_bits: int, a_bits: int, share: float) -> list[Workload]:
    """The workloads with every layer at ``w_bits`` x ``a_bits`` (matmuls: ``a_bits`` x ``a_bits``) and every
    eligible layer split between the engines at ``share`` (0: uniform)."""
    out = []
    for w in workloads:
        if w.op == "div":
            out.append(w)
        elif w.op == "matmul":
            out.append(w.with_bits(a_bits, a_bits))
        elif w.pot_eligible and share > 0:
            out.append(w.with_bits(w_bits, a_bits, "mixed", share))
        else:
            out.append(w.with_bits(w_bits, a_bits, "uniform", 0.0))
    return out


def model_share(workloads: list[Workload], w_bits: int, a_bits: int, hw: HardwareSpec, metric: str = "edp",
                steps: int = 100) -> float:
    """The one shift-add share (in ``1/steps``) that minimizes the model's ``metric`` when every layer is at
    ``w_bits`` x ``a_bits`` and every eligible layer is split at that share.

    Under the ``pipeline`` schedule the engines' *totals* set the time, and the MAC engine alone carries the
    activation x activation matmuls and the depthwise convolutions, so the best share lies above
    :func:`balanced_share` (which balances each layer on its own, the optimum of the ``sequential``
    schedule). For the ``energy`` metric it is 0 when an APoT product costs more than a multiply.
    """
    even = balanced_share(w_bits, a_bits, hw)
    values = [(estimate(at_width(workloads, w_bits, a_bits, k / steps), hw).metric(metric), k / steps)
              for k in range(steps + 1)]
    best = min(v for v, _ in values)
    # ties (a DRAM-bound model, where the share does not change the time) go to the per-layer balance
    return min((abs(k - even), k) for v, k in values if v <= best * (1 + 1e-9))[1]


def _apply_assignment(workloads: list[Workload], assign: dict[str, dict[str, int]],
                      schemes: dict[int, dict[str, tuple[str, float]]]) -> list[Workload]:
    """The workloads at an assignment; ``schemes[bits][layer]`` is ``(scheme, shift share)``, unless the
    assignment holds the layer uniform (``"S": 1``)."""
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
            scheme, share = schemes.get(wb, {}).get(w.name, ("uniform", 0.0))
            if a.get("S") == 1:
                scheme, share = "uniform", 0.0
            out.append(w.with_bits(wb, a.get("A", w.a_bits), scheme, share))
    return out


def m2q(fp_model: nn.Module, calib: torch.Tensor, base: QuantConfig, hw: HardwareSpec, budget: float,
        input_size: tuple[int, int, int], metric: str = "edp", w_candidates=(4, 8), a_candidates=(8,),
        n_probe: int = 8, lower_per_step: int = 4, progress: bool = True, level: str = "channel",
        options: MethodOptions | None = None, curve: tuple[float, ...] = (),
        best_effort: bool = False) -> tuple[nn.Module, M2QResult]:
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
        level: level 1's granularity, ``channel``, ``layer`` or ``none`` (module docstring; ``none`` is
            uniform mixed precision under the same cost budget, the reference M2Q is compared with).
        options: the MPTQ passes the search runs on (SQ-b, OPT-m, GPTQ; default: none).
        curve: larger budget fractions whose configs the same search also returns (``result.curve``).
        best_effort: return the cheapest reachable assignment instead of raising if ``budget`` is unreachable.

    Raises:
        ConfigError: a bad metric, level or budget, or a budget the candidates cannot reach.
    """
    import time

    if metric not in ("edp", "energy", "latency"):
        raise ConfigError(f"cost metric must be edp, energy or latency, got {metric!r}")
    if not 0 < budget <= 1:
        raise ConfigError(f"{budget_option(metric)} is a fraction of the INT8 baseline in (0, 1], got {budget}")
    if level not in LEVELS:
        raise ConfigError(f"M2Q level must be one of {', '.join(LEVELS)}, got {level!r}")
    t0 = time.perf_counter()
    w_c = tuple(sorted(set(w_candidates)))
    structure = prepare(fp_model, replace(base, w_bits=8, a_bits=8, rules=[]))
    workloads = extract_workloads(structure, input_size)
    baseline = estimate(int8_baseline(workloads), hw)
    outs = {m.layer_name: m.weight.shape[0] for m in weight_layers(structure)}
    eligible = [w.name for w in workloads if w.pot_eligible]
    # bits -> layer -> (scheme, share of the MACs on the shift-add engine)
    schemes: dict[int, dict[str, tuple[str, float]]] = {}
    choices: dict[int, dict[str, SchemeChoice]] = {}
    if level == "layer":
        choices = {b: choose_schemes(fp_model, calib, base, b, input_size)
                   for b in tqdm(w_c, desc="M2Q level 1 (schemes)", disable=None if progress else True, leave=False)}
        schemes = {b: {n: ("apot", 1.0) for n, c in ch.items() if c.scheme == "apot"} for b, ch in choices.items()}
    shares: dict[int, float] = {}  # channel: each width's APoT share (config_of reads it for mixed layers only)
    if level == "channel":  # the share each grid will have: a whole number of output channels
        shares = {b: model_share(workloads, b, max(a_candidates), hw, metric) for b in w_c}
        # a width whose best share is 0 (an energy budget, where APoT does not pay) stays uniform
        schemes = {b: {n: ("mixed", round(shares[b] * outs[n]) / outs[n]) for n in eligible if shares[b] > 0}
                   for b in w_c}

    def split_rules(b: int) -> list[LayerRule]:
        return [LayerRule(n, w_scheme="mixed", w_granularity="per_channel", w_apot_share=shares[b])
                for n in schemes[b]]

    def rules_for(b: int) -> list[LayerRule]:
        if level == "channel":  # the banks are uniform; the split grids are the scheme items' banks
            return []
        return [LayerRule(n, w_scheme=sch) for n, (sch, _) in schemes.get(b, {}).items()]

    def bank_config(b: int) -> QuantConfig:
        return replace(base, w_bits=b, a_bits=b, rules=rules_for(b))

    searched = level == "channel" and any(schemes.values())

    def cost(assign: dict[str, dict[str, int]]) -> float:
        return estimate(_apply_assignment(workloads, assign, schemes), hw).metric(metric)

    limit = budget * baseline.metric(metric)
    model, res = greedy_mp(fp_model, calib, base, options or MethodOptions(), Budget(cost=limit), w_c, a_candidates,
                           n_probe=n_probe, lower_per_step=lower_per_step, progress=progress,
                           bank_config=bank_config, cost=cost,
                           snapshots=tuple(f * baseline.metric(metric) for f in curve), best_effort=best_effort,
                           uniform_fallback=False,  # keep the final point on the same search path as the curve
                           split_config=(lambda b: replace(base, w_bits=b, a_bits=b, rules=split_rules(b)))
                           if searched else None,
                           split_layers=tuple(sorted({n for ch in schemes.values() for n in ch})))

    def config_of(assign: dict[str, dict[str, int]]) -> QuantConfig:
        # bits from Greedy MP plus each layer's scheme at its bits
        rules = []
        for layer, kinds in assign.items():
            wb = kinds.get("W")
            scheme = None if kinds.get("S") == 1 else schemes.get(wb, {}).get(layer, (None, 0.0))[0]
            rules.append(LayerRule(layer, w_bits=wb, a_bits=kinds.get("A"), w_scheme=scheme,
                                   w_granularity="per_channel" if scheme == "mixed" else None,
                                   w_apot_share=shares[wb] if scheme == "mixed" else None))
        return replace(base, rules=rules)

    config = config_of(res.assignment)
    model.vitq_config = config
    final_w = extract_workloads(model, input_size)
    report = estimate(final_w, hw)
    by_layer = {c.name: c for c in report.layers}
    layers = []
    for w in final_w:
        c = by_layer[w.name]
        choice = choices.get(w.w_bits, {}).get(w.name)
        layers.append({"layer": w.name, "op": w.op, "scheme": w.scheme, "w_bits": w.w_bits if w.op not in ("matmul", "div") else None,
                       "a_bits": w.a_bits if w.op != "div" else None, "engine": c.engine, "macs": w.macs,
                       "shift_share": c.shift_share,
                       "energy_j": c.energy_j, "latency_s": c.latency_s, "edp_share": c.edp_share,
                       "mse_uniform": choice.mse_uniform if choice else None,
                       "mse_pot": choice.mse_pot if choice else None})
    result = M2QResult(config, choices, layers, report.to_dict(), baseline.to_dict(),
                       time.perf_counter() - t0, res.steps, res.kl_final)
    result.curve = {f: config_of(res.snapshots[f * baseline.metric(metric)]) for f in curve
                    if f * baseline.metric(metric) in res.snapshots}
    return model, result


def fixed_scheme_config(fp_model: nn.Module, base: QuantConfig, input_size: tuple[int, int, int],
                        pot_bits: int = 4) -> QuantConfig:
    """The "shift engine only" reference: every eligible layer at ``pot_bits``-bit APoT weights, the others at
    ``base.w_bits`` uniform, activations at ``base.a_bits``."""
    structure = prepare(fp_model, replace(base, rules=[]))
    names = [w.name for w in extract_workloads(structure, input_size) if w.pot_eligible]
    return replace(base, rules=[LayerRule(n, w_bits=pot_bits, w_scheme="apot") for n in names])


def paper_config(fp_model: nn.Module, base: QuantConfig, input_size: tuple[int, int, int]) -> QuantConfig:
    """M2-ViT's own recipe (module docstring): depthwise convolutions at 4-bit uniform weights; linears and
    1x1 convolutions at 8 bits, each output channel uniform or APoT by the lower weight error; every other
    layer 8-bit uniform; activations 8 bits."""
    structure = prepare(fp_model, replace(base, w_bits=8, a_bits=8, rules=[]))
    rules = []
    for w in extract_workloads(structure, input_size):
        if w.op == "dwconv":
            rules.append(LayerRule(w.name, w_bits=4, w_scheme="uniform"))
        elif w.pot_eligible:
            rules.append(LayerRule(w.name, w_scheme="mixed", w_granularity="per_channel"))
    return replace(base, w_bits=8, a_bits=8, w_scheme="uniform", rules=rules)
