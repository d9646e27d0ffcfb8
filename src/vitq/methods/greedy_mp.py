"""Greedy MP: layer-wise mixed precision for weights and activations under a budget (MPTQ-ViT).

1. Every candidate bit-width ``b`` gets its own fully calibrated model (with SQ-b/OPT-m when asked).
   Each tensor's parameters at ``b`` are harvested into a bank, so switching a layer to ``b`` later
   is a copy, not a recalibration. (Activation statistics are observed in float, so a tensor's
   parameters at ``b`` do not depend on the other layers' bits; reusing the saved config therefore
   reproduces the searched model exactly.)
2. Start with the highest candidate everywhere. The sensitivity of each item (a layer's weights, or a
   layer's activations) is the increase of the KL divergence of the final logits from FP, on
   calibration images only, when that item is lowered one step.
3. Repeatedly lower the items with the smallest loss per average bit saved (``lower_per_step`` of
   them per step), re-measure their next step, until the budget holds.

Speed: for families whose adapter exposes a sequential trunk (ViT/DeiT, Swin, EfficientViT), the input of every block
under the current assignment is cached; probing a layer of block ``k`` runs only blocks ``k..end``.

This module runs the search; its parts are their own modules: the budget and its accounting
(``mp_budget``), the items, banks and probe (``mp_probe``), the knapsack (``mp_knapsack``), and the greedy
loop and uniform fallback (``mp_greedy``).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm import tqdm

from ..adapters import adapter_for
from ..quant.config import ConfigError, LayerRule, QuantConfig
from ..quant.engine import all_quantizers, weight_layers
from .gptq import apply_gptq
from .mp_budget import Accounts, Budget
from .mp_greedy import greedy_search, uniform_fallback as fallback_search
from .mp_knapsack import knapsack_search
from .mp_probe import GPTQLosses, Item, Prober, after_blocks, apply_state, harvest
from .mptq import MethodOptions, run_pipeline
from .options import SEARCHES as _SEARCHES
from .recon import apply_block_recon
from .rotation import apply_rotation
from .sqb import apply_sqb
from .token_scale import apply_token_scale

# How the assignment is searched (docs/methods.md "Greedy MP"). "greedy": the paper's loop, lowering from
# the highest candidate. "knapsack": vitq's addition, every item's loss measured at each candidate with only
# that item quantized (everything else in float), then a multiple-choice knapsack on those losses.
SEARCHES = _SEARCHES
DEFAULT_CANDIDATES = (4, 5, 6, 8)  # candidate bit-widths for weights and for activations


def default_probe_images(search: str) -> int:
    """Probe images a search measures on unless told: 16 for the knapsack's one pass of isolated losses
    (rule R13, docs/methods.md), 8 for the greedy loop, whose cost grows with every re-run."""
    return 8 if search == "greedy" else 16


def default_gptq_losses(search: str, options: MethodOptions) -> bool:
    """Whether the CLI and the benchmarks measure GPTQ-aware W losses unless told: wherever they apply (the
    knapsack search, with GPTQ on), since rule R17 (docs/methods.md). The Python entry
    ``greedy_mp(gptq_losses=False)`` keeps round-to-nearest losses as its default."""
    return search != "greedy" and options.gptq


@dataclass
class GreedyResult:
    config: QuantConfig
    layers: list[dict] = field(default_factory=list)
    steps: int = 0
    probes: int = 0
    search_s: float = 0.0
    # seconds per stage of search_s: float_methods (SQ-b, rotation, token scaling on the
    # float model), banks (calibration and OPT-m at each candidate width), search (probes and the search, with
    # the GPTQ-aware losses), fallback, gptq, recon; what the 5-minute pipeline target is spent on
    timing: dict[str, float] = field(default_factory=dict)
    kl_final: float = 0.0
    history: list[dict] = field(default_factory=list)
    # cost value -> the assignment {layer: {"W": bits, "A": bits}} when the cost first fell to it or below
    snapshots: dict[float, dict] = field(default_factory=dict)
    # the final assignment, in the snapshots' form (with "S": 0 split / 1 uniform where a scheme was searched)
    assignment: dict[str, dict[str, int]] = field(default_factory=dict)
    uniform_fallback: int | None = None  # the single width returned instead of the greedy result
    kl_greedy: float = 0.0  # probe KL of the greedy assignment, round-to-nearest weights
    # uniform_fallback: the probe KLs it compared, {"after_gptq": bool, "searched": kl, "uniform": {bits: kl}};
    # after_gptq (rule R25) scores each candidate after GPTQ, else on round-to-nearest weights
    fallback_scores: dict | None = None
    # GPTQ on the final assignment (options.gptq); kl_final is measured before it, unless the fallback
    # scored after GPTQ (fallback_scores["after_gptq"]), where kl_final is the winner's score
    gptq: dict | None = None
    recon: dict | None = None  # block reconstruction on the final assignment, after GPTQ (options.recon)
    rotation: list | None = None  # options.rotate: each layer's choice, made once on the float model
    token_scale: list | None = None  # options.token_scale: likewise
    # search="knapsack": each searched tensor's isolated loss, {"layer", "kind", "elements", "kl": {bits: KL}},
    # the probe KL with only that tensor quantized at those bits: a per-layer sensitivity report
    sensitivity: list[dict] = field(default_factory=list)



def greedy_mp(fp_model: nn.Module, calib: torch.Tensor, base: QuantConfig, options: MethodOptions, budget: Budget,
              w_candidates=DEFAULT_CANDIDATES, a_candidates=DEFAULT_CANDIDATES, n_probe: int = 8,
              lower_per_step: int = 4, progress: bool = True,
              bank_config: Callable[[int], QuantConfig] | None = None,
              cost: Callable[[dict[str, dict[str, int]]], float] | None = None,
              snapshots: tuple[float, ...] = (), best_effort: bool = False,
              uniform_fallback: bool = True, search: str = "greedy",
              gptq_losses: bool = False, split_config: Callable[[int], QuantConfig] | None = None,
              split_layers: tuple[str, ...] = ()) -> tuple[nn.Module, GreedyResult]:
    """Search per-layer W/A bit-widths under ``budget``; returns the mixed model and the search result.

    Args:
        fp_model: the float model.
        calib: calibration images (the first ``n_probe`` are used to measure sensitivities).
        base: the base config (protocol, observer, default bits at which SQ-b searches alpha).
        options: SQ-b / OPT-m switches.
        budget: the targets.
        w_candidates / a_candidates: candidate bit-widths.
        n_probe: calibration images on which sensitivities are measured (the first ``n_probe``).
        lower_per_step: items lowered per greedy step before the model is re-run (1 = the classic
            one-at-a-time greedy; 4 cuts the number of full re-runs by 4 at a small loss in
            precision of the ranking, see docs/methods.md).
        bank_config: the config calibrated for candidate bit-width ``b`` (default: ``base`` at ``b`` bits
            everywhere, no rules). M2Q passes one that keeps each layer's chosen weight scheme.
        cost: a cost of an assignment ``{layer: {"W": bits, "A": bits}}`` (e.g. the accelerator's EDP),
            bounded by ``budget.cost``; when it binds, an item's saving is the cost it removes.
        snapshots: cost values above ``budget.cost``. The search for a smaller budget passes through
            the same states as the search for a larger one until that one is met, so a single search
            records the assignment each larger budget would have returned (accuracy-vs-cost curves).
        best_effort: stop at the cheapest reachable state instead of raising when the budget cannot be met.
        uniform_fallback: after the greedy loop, also score every single candidate width (all W and A
            items at ``b``) that meets the budget on the same probe KL, and return it when it is lower.
            ``GreedyResult.uniform_fallback`` then holds ``b`` (else None).
        search: one of :data:`SEARCHES`. ``"knapsack"`` measures each item's probe KL with only that item
            quantized, at each candidate, and solves a multiple-choice knapsack per kind on those losses
            (:func:`vitq.methods.mp_knapsack.solve`); it takes average-bit and size budgets only.
        gptq_losses: (knapsack, with ``options.gptq``) measure a W item's loss at a GPTQ
            width with the weights GPTQ would give it on float inputs, not round-to-nearest; rule R16,
            docs/methods.md.
        split_config: (greedy, with ``cost``) the config whose weight grids at ``b`` bits are split between
            the accelerator's engines (M2Q). Each layer of ``split_layers`` then also gets a scheme item
            (kind ``S``), which the search lowers from uniform to split like a width, when the KL it costs
            per unit of cost saved is the smallest; ``GreedyResult.assignment`` holds each one's level.
        split_layers: the layers that may take the split grid.

    Note:
        ``lower_per_step``, ``cost`` and ``snapshots`` are greedy-only.

    Raises:
        ConfigError: bad candidates or an unreachable budget.
    """
    t0 = time.perf_counter()
    w_c, a_c = tuple(sorted(set(w_candidates))), tuple(sorted(set(a_candidates)))
    for b in w_c + a_c:
        if not 2 <= b <= 8:
            raise ConfigError(f"candidate bit-width {b} out of range 2..8")
    if n_probe < 1 or lower_per_step < 1:
        raise ConfigError(f"n_probe ({n_probe}) and lower_per_step ({lower_per_step}) must be at least 1")
    if search not in SEARCHES:
        raise ConfigError(f"unknown mixed-precision search {search!r}; choose one of {list(SEARCHES)}")
    if gptq_losses and (search == "greedy" or not options.gptq):
        raise ConfigError("GPTQ-aware losses (search.gptq_losses) need the knapsack search and GPTQ "
                          f"(gptq.enabled or the mptq recipe); got search {search!r}, gptq {options.gptq}")
    if split_config is not None and (search != "greedy" or cost is None or uniform_fallback):
        raise ConfigError("a searched weight scheme (split_config) needs the greedy search, a cost function "
                          "and no uniform fallback")
    if search != "greedy" and (budget.gbops is not None or budget.cost is not None or cost is not None):
        raise ConfigError(f"the {search} search takes average-bit and size budgets only "
                          "(--budget-w, --budget-a, --budget-mb), not --budget-gbops or a cost budget")
    timing: dict[str, float] = {}
    lap = [time.perf_counter()]

    def done(stage: str) -> None:
        now = time.perf_counter()
        timing[stage] = now - lap[0]
        lap[0] = now

    float_model = copy.deepcopy(fp_model)
    if options.sq_b:  # once, at the base bits: every bank shares the same smoothed float model
        apply_sqb(float_model, calib, QuantConfig(w_bits=base.w_bits, a_bits=base.a_bits), progress=progress)
    rotation = None
    if options.rotate:  # likewise once, at the base bits
        rotation = apply_rotation(float_model, calib, QuantConfig(w_bits=base.w_bits, a_bits=base.a_bits),
                                  seed=base.seed, progress=progress, parts=options.rotate_parts).to_dict()
    token_scale = None
    if options.token_scale:  # likewise once, at the base bits
        token_scale = apply_token_scale(float_model, calib, QuantConfig(w_bits=base.w_bits, a_bits=base.a_bits),
                                        progress=progress).to_dict()
    done("float_methods")
    # GPTQ runs once on the final assignment (below), not per bank: its weights depend on the upstream
    # layers' widths, and a bank must not.
    stage = MethodOptions(sq_b=False, opt_m=options.opt_m, m_max=options.m_max)
    banks: dict[int, dict] = {}
    model = None
    for b in tqdm(sorted(set(w_c + a_c), reverse=True), desc="calibrate candidates", disable=None if progress else True, leave=False):
        cfg = bank_config(b) if bank_config else replace(base, w_bits=b, a_bits=b, rules=[])
        res = run_pipeline(float_model, calib, cfg, stage)
        banks[b] = harvest(res.model)
        if model is None:
            model = res.model  # the highest bit-width model is the starting point
    split_banks: dict[int, dict] = {}
    if split_config is not None:
        for b in tqdm(sorted(w_c, reverse=True), desc="calibrate split grids", disable=None if progress else True,
                      leave=False):
            split_banks[b] = harvest(run_pipeline(float_model, calib, split_config(b), stage).model)
    done("banks")
    first = set(model.vitq_first_layers)
    trunk = adapter_for(model).trunk(model)
    block_of: dict[int, int] = {}
    if trunk is not None:
        stem, blocks, _ = trunk
        for k, blk in enumerate(blocks):
            for q in all_quantizers(blk):
                block_of[id(q)] = k
        n_blocks = len(blocks)
    else:
        n_blocks = 0

    def where(qs) -> int:
        ks = [block_of.get(id(q)) for q in qs]
        if any(k is None for k in ks):
            # outside the blocks: in the stem (-1) unless the quantizer runs after them (head)
            return -1 if trunk is None or not after_blocks(model, qs, trunk) else n_blocks
        return min(ks)

    items: list[Item] = []
    for m in weight_layers(model):
        items.append(Item("W", m.layer_name, [m.w_quant], m.weight.numel(), where([m.w_quant]), w_c, len(w_c) - 1))
    groups: dict[str, list] = {}
    for q in all_quantizers(model):
        if not q.is_weight and not (q.layer in first and q.role == "input"):
            groups.setdefault(q.layer, []).append(q)
    for layer, qs in groups.items():
        items.append(Item("A", layer, qs, sum(q.elements for q in qs), where(qs), a_c, len(a_c) - 1))
    w_item = {i.layer: i for i in items if i.kind == "W"}
    scheme_item: dict[str, Item] = {}
    for layer in split_layers if split_config is not None else ():
        if layer not in w_item:
            raise ConfigError(f"split layer {layer!r} is not a quantized weight layer")
        w = w_item[layer]
        scheme_item[layer] = Item("S", layer, w.quantizers, w.size, w.block, (0, 1), 1)  # starts uniform
    items += scheme_item.values()
    owners = {id(m.w_quant): m for m in weight_layers(model)}

    def set_level(item: Item, level: int) -> None:
        item.level = level
        target = w_item[item.layer] if item.kind == "S" else item
        split = item.kind != "A" and target.layer in scheme_item and scheme_item[target.layer].level == 0
        bank = (split_banks if split else banks)[target.bits]
        for q in target.quantizers:
            apply_state(q, bank[q.name])
            if id(q) in owners:
                owners[id(q)].refresh()

    accounts = Accounts(model, items, budget, cost)
    probe_imgs = calib[:n_probe]
    with torch.inference_mode():
        ref = fp_model(probe_imgs)
    prober = Prober(model, probe_imgs, ref)
    prober.refresh()
    current = prober.kl()

    result = GreedyResult(config=base, rotation=rotation, token_scale=token_scale)
    if search != "greedy":
        w_losses = GPTQLosses(model, calib, options.gptq_max_bits) if gptq_losses and options.gptq else None
        current, result.sensitivity, entry = knapsack_search(model, items, set_level, prober, accounts, best_effort,
                                                             progress, gptq_losses=w_losses)
        result.steps, result.history = 1, [entry]
    else:
        current, result.steps, result.history, result.snapshots = greedy_search(
            items, set_level, accounts, prober, current, lower_per_step, snapshots, best_effort, progress,
            f"W{w_c} A{a_c}")
    result.kl_greedy = current
    done("search")
    if uniform_fallback:
        current, result.uniform_fallback, result.fallback_scores = fallback_search(
            items, set_level, accounts, prober, current, sorted(set(w_c) & set(a_c)), n_blocks)
        done("fallback")
    w_bits = {i.layer: i.bits for i in items if i.kind == "W"}
    a_bits = {i.layer: i.bits for i in items if i.kind == "A"}
    layers = sorted(set(w_bits) | set(a_bits), key=list(dict.fromkeys([i.layer for i in items])).index)
    rules = [LayerRule(layer, w_bits=w_bits.get(layer), a_bits=a_bits.get(layer)) for layer in layers]
    result.config = replace(base, rules=rules)
    model.vitq_config = result.config
    result.layers = [{"layer": row, "w_bits": w_bits.get(row), "a_bits": a_bits.get(row)} for row in layers]
    result.assignment = accounts.assignment()
    result.probes = prober.count
    result.kl_final = current
    for m in weight_layers(model):
        # Probing ran in inference mode, so cached quantized weights are inference tensors, which autograd
        # (block reconstruction below, or a user's fine-tuning) cannot save; drop them.
        m.refresh()
    if options.gptq and result.gptq is None:
        result.gptq = apply_gptq(model, calib, max_bits=options.gptq_max_bits, progress=progress).to_dict()
        done("gptq")
    if options.recon_applies(base):
        result.recon = apply_block_recon(model, fp_model, calib, progress=progress, seed=base.seed,
                                         **options.recon_kwargs()).to_dict()
        done("recon")
    result.search_s = time.perf_counter() - t0
    result.timing = timing
    return model, result
