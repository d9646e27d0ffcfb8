"""``vitq.quantize``: one entry for Python and the command line (``vitq quantize`` parses its options and
calls this).

    result = vitq.quantize(model, calib_loader)                        # the mptq recipe, W8A8
    result = vitq.quantize(model, calib, QuantConfig(w_bits=4, a_bits=4))
    result = vitq.quantize(model, calib, recipe="mptq", budget=Budget(w_bits=5, a_bits=5))
    result.model, result.report
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import check_supported
from .device import model_device, resolve_device, to_device
from .finite import check_forward_finite, check_state_finite
from .methods.greedy_mp import (DEFAULT_CANDIDATES, SEARCHES, Budget, default_gptq_losses, default_probe_images,
                                greedy_mp)
from .methods.mp_budget import check_budget_reachable, check_budget_values
from .methods.mptq import MethodOptions, run_pipeline
from .methods.options import M2Q_LEVELS, ROTATION_PARTS
from .quant.config import ConfigError, QuantConfig
from .recipes import mptq_uniform_fallback, resolve

log = logging.getLogger("vitq")
COST_METRICS = {"edp": "edp", "energy": "energy_j", "latency": "latency_s"}


@dataclass
class CostBudget:
    """The m2q recipe's budget: at most ``fraction`` of the INT8 baseline's ``metric`` on ``hardware``
    (a :class:`~vitq.hardware.HardwareSpec`; None: the default accelerator)."""

    metric: str = "edp"
    fraction: float = 1.0
    hardware: object | None = None

    def __post_init__(self):
        if self.metric not in COST_METRICS:
            raise ConfigError(f"cost budget metric must be one of {', '.join(COST_METRICS)}, got {self.metric!r}")
        check_budget_values(**{self.metric: self.fraction})


@dataclass
class SearchOptions:
    """How a mixed-precision search runs. None: the recipe's default (docs/methods.md, Greedy MP)."""

    w_candidates: tuple[int, ...] | None = None  # default 4,5,6,8 (m2q: 4,8)
    a_candidates: tuple[int, ...] | None = None  # default 4,5,6,8 (m2q: 8)
    search: str | None = None  # knapsack for bit/size budgets, greedy for a BOPs budget
    probe_images: int | None = None  # 16 for the knapsack, 8 for the greedy loop and m2q
    lower_per_step: int = 4
    uniform_fallback: bool | None = None
    gptq_losses: bool | None = None
    m2q_level: str | None = None  # m2q: level 1 per output channel (default), per layer, or none (vitq.methods.m2q)


@dataclass
class QuantizeResult:
    """What :func:`quantize` returns: the quantized model (an ordinary ``nn.Module``), the config and
    options it was built with (every recipe default filled in), and its report sections (each pass's
    results, timings, the search)."""

    model: nn.Module
    config: QuantConfig
    options: MethodOptions
    search: SearchOptions
    report: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Plan:
    """What :func:`run` runs: the recipe, and the config, options, search and budget with every recipe default
    filled in and checked (:func:`plan`)."""

    recipe: str
    config: QuantConfig
    options: MethodOptions
    search: SearchOptions
    budget: Budget | CostBudget | None = None

    def describe(self) -> str:
        """The one-line summary of the methods this plan runs."""
        o, c = self.options, self.config
        return (f"methods: sq_b={bool(o.sq_b)} opt_m={bool(o.opt_m)} gptq={bool(o.gptq)} "
                f"recon={o.recon_applies(c)} mixed={isinstance(self.budget, Budget)}"
                + (f" rotate={','.join(o.rotate_parts)}" if o.rotate else "")
                + (" token_scale=True" if o.token_scale else "")
                + (" gelu_token_shift=True" if c.protocol == "full" and c.gelu_token_shift else ""))


def base_widths(budget: Budget) -> dict[str, int]:
    """The base widths a bit budget implies (rounded, 2..8): where SQ-b searches alpha and OPT-m, GPTQ and
    reconstruction decide what applies (reconstruction runs only at <= ``recon_max_bits``)."""
    out = {}
    for key, v in (("w_bits", budget.w_bits), ("a_bits", budget.a_bits)):
        if v is not None:
            out[key] = max(2, min(8, round(v)))
    return out


def calibration_tensor(calibration, input_fn=None) -> torch.Tensor:
    """The calibration images as one tensor, from a tensor, a DataLoader of ``vitq.data.Batch``, any iterable
    of image tensors or of ``(images, labels)`` pairs, or any batches with ``input_fn(batch)`` -> images."""
    if isinstance(calibration, torch.Tensor):
        return calibration
    parts = []
    for b in calibration:
        images = input_fn(b) if input_fn is not None else getattr(b, "images", None)
        if images is None:
            if isinstance(b, dict):
                raise TypeError(f"calibration batches are dicts (keys {', '.join(map(str, list(b)[:4]))}): pass "
                                "input_fn, a function that returns a batch's image tensor, e.g. "
                                "input_fn=lambda b: b['pixel_values']")
            images = b[0] if isinstance(b, (tuple, list)) else b
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"calibration batches must hold image tensors, got {type(images).__name__}")
        if images.numel():
            parts.append(images)
    if not parts:
        raise ValueError("the calibration data holds no images")
    return torch.cat(parts)


def plan(config: QuantConfig | None = None, recipe: str = "mptq", budget: Budget | CostBudget | None = None,
         options: MethodOptions | None = None, search: SearchOptions | None = None,
         model: nn.Module | None = None) -> Plan:
    """What :func:`quantize` will run: every recipe default filled in, every option checked, before any work.

    Args:
        config, recipe, budget, options, search: as for :func:`quantize`.
        model: when given, a bit or size budget is also checked against it (the smallest size its
            candidates reach); without it, only what needs no model is checked.

    Raises:
        ConfigError: naming the option.
    """
    options = options or MethodOptions()
    search = search or SearchOptions()
    if recipe == "m2q" and budget is None:
        budget = CostBudget()  # no budget: the scheme choice alone, at the highest candidates
    if recipe == "m2q-paper" and budget is not None:
        raise ConfigError("the m2q-paper recipe is M2-ViT's fixed recipe: it takes no budget (--method m2q searches "
                          "under one)")
    if isinstance(budget, CostBudget):
        if recipe != "m2q":
            raise ConfigError(f"a cost budget ({budget.metric}) needs the m2q recipe")
    elif isinstance(budget, Budget):
        if recipe == "m2q":
            raise ConfigError("the m2q recipe takes a cost budget (--budget-edp, budget.energy or budget.latency), not a bit budget")
    elif budget is not None:
        raise ConfigError(f"budget must be a Budget or a CostBudget, got {type(budget).__name__}")
    if config is None:
        config = QuantConfig(**(base_widths(budget) if isinstance(budget, Budget) else {}))
    mixed = isinstance(budget, Budget) or bool(config.rules)
    config, options = resolve(recipe, config, options, mixed)
    _check_options(options)
    m2 = recipe == "m2q"
    w_c = search.w_candidates or ((4, 8) if m2 else DEFAULT_CANDIDATES)
    a_c = search.a_candidates or ((8,) if m2 else DEFAULT_CANDIDATES)
    for b in w_c + a_c:
        if not 2 <= b <= 8:
            raise ConfigError(f"candidate bit-width {b} out of range 2..8 (search.w_candidates/search.a_candidates)")
    bit_budget = budget if isinstance(budget, Budget) else None
    if search.search is not None and m2:
        raise ConfigError(f"search.search={search.search} is for Greedy MP's average-bit/size budgets, not the m2q recipe")
    if search.m2q_level is not None and not m2:
        raise ConfigError(f"search.m2q_level={search.m2q_level} is for the m2q recipe")
    if search.m2q_level is not None and search.m2q_level not in M2Q_LEVELS:
        raise ConfigError(f"search.m2q_level must be one of {', '.join(M2Q_LEVELS)}, got {search.m2q_level!r}")
    if search.search is not None and bit_budget is None:
        raise ConfigError(f"search.search={search.search} searches a mixed-precision assignment: give a budget "
                          "(--budget-w, --budget-a, --budget-mb or --budget-gbops)")
    if search.search is not None and search.search not in SEARCHES:
        raise ConfigError(f"unknown mixed-precision search {search.search!r}; choose one of {', '.join(SEARCHES)}")
    name = search.search or ("greedy" if bit_budget is not None and bit_budget.gbops is not None else "knapsack")
    fallback = search.uniform_fallback
    if fallback is None:
        fallback = recipe != "mptq" or mptq_uniform_fallback(config)
    gptq_losses = search.gptq_losses
    if gptq_losses is None:  # rule R17: on wherever it applies
        gptq_losses = bit_budget is not None and default_gptq_losses(name, options)
    probe = search.probe_images
    if probe is None:  # m2q runs the greedy loop
        probe = default_probe_images(name if bit_budget is not None else "greedy")
    search = dataclasses.replace(search, w_candidates=tuple(w_c), a_candidates=tuple(a_c),
                                 m2q_level=(search.m2q_level or "channel") if m2 else None,
                                 search=name if bit_budget is not None else None,
                                 uniform_fallback=fallback, gptq_losses=gptq_losses, probe_images=probe)
    if model is not None:
        check_supported(model)  # an architecture no adapter covers is refused before any work
    if model is not None and bit_budget is not None:
        check_budget_reachable(model, config, search.w_candidates, search.a_candidates, w_bits=bit_budget.w_bits,
                               a_bits=bit_budget.a_bits, size_mb=bit_budget.size_mb)
    return Plan(recipe, config, options, search, budget)


def _check_options(o: MethodOptions) -> None:
    if o.recon_iters < 1:
        raise ConfigError(f"recon.iters must be at least 1, got {o.recon_iters}")
    if not 0.0 <= o.recon_drop < 1.0:
        raise ConfigError(f"recon.drop is a probability in [0, 1), got {o.recon_drop}")
    if not 2 <= o.recon_max_bits <= 8:
        raise ConfigError(f"recon.max_bits must be from 2 to 8, got {o.recon_max_bits}")
    if not 2 <= o.gptq_max_bits <= 8:
        raise ConfigError(f"gptq.max_bits must be from 2 to 8, got {o.gptq_max_bits}")
    bad = [p for p in o.rotate_parts if p not in ROTATION_PARTS]
    if bad or not o.rotate_parts:
        raise ConfigError(f"rotation.parts takes a list of {', '.join(ROTATION_PARTS)}; got {list(o.rotate_parts)}")
    if o.m_max is not None and not 0 <= o.m_max <= 7:
        raise ConfigError(f"optm.m_max must be from 0 to 7 (or null: per tensor), got {o.m_max}")



def quantize(model: nn.Module, calibration, config: QuantConfig | None = None, recipe: str = "mptq",
             budget: Budget | CostBudget | None = None, options: MethodOptions | None = None,
             search: SearchOptions | None = None, progress: bool = True, input_fn=None,
             device: str | torch.device | None = None) -> QuantizeResult:
    """Quantize a float timm model with a recipe.

    Args:
        model: the float model (left unchanged; the result is a new module).
        calibration: a tensor of images, a DataLoader, or any iterable of image tensors or
            ``(images, labels)`` batches; other batch types (e.g. dicts) with ``input_fn``.
        config: bit-widths, protocol, observer and per-layer rules (default W8A8, standard protocol; with a
            bit budget and no config, the base widths come from the budget).
        recipe: ``minmax``, ``mptq`` (default), ``m2q`` or ``m2q-paper`` (vitq.recipes).
        budget: a :class:`~vitq.methods.greedy_mp.Budget` (average bits, MB, GBOPs: Greedy MP) or a
            :class:`CostBudget` (m2q).
        options: method settings; fields left None are the recipe's defaults (vitq.recipes.DEFAULTS).
        search: mixed-precision search settings.
        progress: progress bars (on a terminal only).
        input_fn: turns one calibration batch into the model's input tensor (for batch types vitq does not
            know, e.g. ``lambda b: b["pixel_values"]``).
        device: where every pass runs: ``"auto"``, ``"cpu"``, ``"cuda[:N]"`` or a ``torch.device``; None: the
            model's own device. The quantized model is on that device; ``model`` stays where it was.

    Returns:
        A :class:`QuantizeResult`.

    Raises:
        ConfigError: a bad option, or a budget the candidates cannot reach (before any calibration).
        NonFiniteError: the float or the quantized model produces NaN or infinity, naming the layer.
    """
    return run(model, calibration, plan(config, recipe, budget, options, search, model=model), progress, input_fn,
               device)


def run(model: nn.Module, calibration, p: Plan, progress: bool = True, input_fn=None,
        device: str | torch.device | None = None) -> QuantizeResult:
    """Run a :class:`Plan` (from :func:`plan`, given the model) on ``model``: what :func:`quantize` does after
    planning. The command line plans first, says what will run, then loads the images and runs.

    Raises:
        NonFiniteError: the float or the quantized model produces NaN or infinity, naming the layer.
    """
    config, options, search, budget = p.config, p.options, p.search, p.budget
    dev = model_device(model) if device is None else resolve_device(device)
    calib = calibration_tensor(calibration, input_fn).to(dev)
    model = to_device(model, dev)
    t0 = time.perf_counter()
    check_forward_finite(model, calib[:8], "the float model")
    report: dict = {"recipe": p.recipe, "methods": {k: v for k, v in vars(options).items()}}
    if isinstance(budget, CostBudget):
        qmodel, config = _m2q(model, calib, config, options, budget, search, progress, report)
    elif isinstance(budget, Budget):
        qmodel, config = _greedy(model, calib, config, options, budget, search, progress, report)
    else:
        if p.recipe == "m2q-paper":
            from .methods.m2q import paper_config

            config = paper_config(model, config, tuple(calib.shape[1:]))
        res = run_pipeline(model, calib, config, options, progress=progress)
        qmodel = res.model
        report.update({k: v for k, v in (("sqb", res.sqb), ("rotation", res.rotation), ("token_scale", res.token_scale),
                                         ("optm", res.optm), ("gptq", res.gptq), ("recon", res.recon))
                       if v is not None})
        report["method_timing"] = res.timing
    qmodel.vitq_calib_images = len(calib)
    check_state_finite(qmodel, "calibration")
    check_forward_finite(qmodel, calib[:8], "the quantized model")
    return QuantizeResult(qmodel, config, options, search, report, time.perf_counter() - t0)


def _m2q(model, calib, config, options, budget: CostBudget, search: SearchOptions, progress: bool, report: dict):
    from .hardware import load_hardware
    from .methods.m2q import m2q

    hw = budget.hardware if budget.hardware is not None else load_hardware(None)
    qmodel, m2 = m2q(model, calib, config, hw, budget.fraction, tuple(calib.shape[1:]), budget.metric,
                     search.w_candidates, search.a_candidates, n_probe=search.probe_images,
                     lower_per_step=search.lower_per_step, progress=progress, level=search.m2q_level,
                     options=options)
    key = COST_METRICS[budget.metric]
    report["m2q"] = {"metric": budget.metric, "budget": budget.fraction, "search_s": m2.search_s, "steps": m2.steps,
                     "kl_calib": m2.kl_final, "hardware": hw.to_dict(),
                     "cost": {k: v for k, v in m2.cost.items() if k != "layers"},
                     "baseline": {k: v for k, v in m2.baseline.items() if k != "layers"},
                     "edp_saving": 1 - m2.cost["edp"] / m2.baseline["edp"], "shift_mac_share": m2.cost["shift_mac_share"],
                     "layers": m2.layers}
    log.info("M2Q: %s %.3f x INT8 baseline (budget %s); EDP saving %.3f; %.1f %% of the MACs on the shift-add engine",
             budget.metric, m2.cost[key] / m2.baseline[key], budget.fraction, report["m2q"]["edp_saving"],
             100 * report["m2q"]["shift_mac_share"])
    return qmodel, m2.config


def _greedy(model, calib, config, options, budget: Budget, search: SearchOptions, progress: bool, report: dict):
    from .report import by_sensitivity

    qmodel, res = greedy_mp(model, calib, config, options, budget, search.w_candidates, search.a_candidates,
                            n_probe=search.probe_images,
                            lower_per_step=search.lower_per_step, uniform_fallback=search.uniform_fallback,
                            search=search.search, gptq_losses=search.gptq_losses, progress=progress)
    mixed = {"budget": vars(budget), "search": search.search, "gptq_losses": search.gptq_losses,
             "probe_images": min(search.probe_images, len(calib)), "search_s": res.search_s, "timing": res.timing,
             "steps": res.steps, "probes": res.probes, "kl_calib": res.kl_final,
             "uniform_fallback": res.uniform_fallback, "fallback_scores": res.fallback_scores, "layers": res.layers}
    if res.sensitivity:
        mixed["sensitivity"] = res.sensitivity
        top = by_sensitivity(res.sensitivity)[:5]
        log.info("most sensitive (probe KL alone at the lowest candidate): %s",
                 ", ".join(f"{r['kind']}:{r['layer']} {r['kl'][min(r['kl'], key=int)]:.4f}" for r in top))
    report["mixed"] = mixed
    for key in ("rotation", "token_scale", "gptq", "recon"):
        if getattr(res, key) is not None:
            report[key] = getattr(res, key)
    if res.uniform_fallback is not None:
        log.info("Greedy MP: uniform %d-bit has a lower calibration KL than the %s assignment and meets the "
                 "budget; using it (--set search.uniform_fallback=false keeps the searched one)", res.uniform_fallback,
                 search.search)
    return qmodel, res.config
