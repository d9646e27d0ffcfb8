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
from ..evaluation import kl_from_reference
from ..quant.config import ConfigError, LayerRule, QuantConfig
from ..quant.engine import all_quantizers, compute_layers, model_stats, weight_layers
from ..quant.layers import QuantMatMul
from .gptq import _supported as gptq_supported, apply_gptq, gptq_rounded, input_hessians
from .recon import apply_block_recon
from .rotation import apply_rotation
from .token_scale import apply_token_scale
from .mp_budget import check_budget_values
from .mp_knapsack import solve as solve_knapsack
from .mptq import MethodOptions, run_pipeline
from .options import SEARCHES as _SEARCHES
from .sqb import apply_sqb

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

_BUFFERS = ("scale", "zero_point", "range_min", "range_max", "region_m", "boundary")


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


@dataclass
class GreedyResult:
    config: QuantConfig
    layers: list[dict] = field(default_factory=list)
    steps: int = 0
    probes: int = 0
    search_s: float = 0.0
    # seconds per stage of search_s: float_methods (SQ-b, attention smoothing, rotation, token scaling on the
    # float model), banks (calibration and OPT-m at each candidate width), search (probes and the search, with
    # the GPTQ-aware losses), fallback, gptq, recon; what the 5-minute pipeline target is spent on
    timing: dict[str, float] = field(default_factory=dict)
    kl_final: float = 0.0
    history: list[dict] = field(default_factory=list)
    # cost value -> the assignment {layer: {"W": bits, "A": bits}} when the cost first fell to it or below
    snapshots: dict[float, dict] = field(default_factory=dict)
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


@dataclass
class _Item:
    kind: str  # "W" or "A"
    layer: str
    quantizers: list
    size: int  # parameters (W) or activation values per calibration pass (A)
    block: int  # trunk block index; -1 = before the blocks, n = after
    choices: tuple[int, ...]  # ascending candidate bits
    level: int  # index into choices
    sens: float = 0.0

    @property
    def bits(self) -> int:
        return self.choices[self.level]

    def can_lower(self) -> bool:
        return self.level > 0


def _harvest(model: nn.Module) -> dict[str, dict]:
    return {q.name: {"spec": copy.deepcopy(q.spec), **{k: getattr(q, k).clone() for k in _BUFFERS},
                     "token_shift": q.token_shift_or_none}
            for q in all_quantizers(model)}


def _apply(q, state: dict) -> None:
    q.spec = copy.deepcopy(state["spec"])
    for k in _BUFFERS:
        setattr(q, k, state[k].clone())
    q.set_token_shift(state["token_shift"])  # a width's grid comes with that width's token shifts (or none)


class _GPTQLosses:
    """The knapsack's isolated W losses with the weights GPTQ would give, not round-to-nearest.

    The final model gets GPTQ on its <= ``max_bits`` layers (``MethodOptions.gptq``), which makes narrow
    weights much cheaper than round-to-nearest suggests (DeiT-Tiny W4A8: drop 4.75 -> 1.96, docs/lab/results-log.md).
    In an isolated probe every other tensor is float, so the layer's GPTQ Hessian is that of its float
    inputs, taken once on the calibration images; each (layer, width) is then rounded as apply_gptq would
    (same clip search, same bias fitting on LayerNorm-fed Linears, same rows-per-input floor) for the
    probe, and the float weight is put back after it.
    """

    def __init__(self, model: nn.Module, calib: torch.Tensor, max_bits: int, min_rows_per_input: float = 4.0,
                 damp: float = 0.01):
        self.model, self.calib, self.max_bits, self.min_rows = model, calib, max_bits, min_rows_per_input
        self.damp = damp  # as the final GPTQ's (apply_gptq's default)
        self.owner = {id(m.w_quant): m for m in weight_layers(model)}
        self.fit_bias = {id(lin) for _, lin in adapter_for(model).norm_linear_pairs(model)}
        self.hess: dict | None = None

    def capture(self) -> None:
        """Take the Hessians; call with every quantizer off (float inputs)."""
        with torch.inference_mode():
            self.hess = input_hessians(self.model, self.calib, list(self.owner.values()), self.fit_bias)

    def layer(self, item: _Item) -> nn.Module | None:
        """The layer to re-round for ``item`` at its current width, or None (round-to-nearest stays)."""
        if item.kind != "W" or item.bits > self.max_bits:
            return None
        m = self.owner[id(item.quantizers[0])]
        if not gptq_supported(m, self.max_bits) or id(m) not in self.hess:
            return None
        h, n = self.hess[id(m)]
        return m if n >= self.min_rows * m.weight[0].numel() else None  # the classifier keeps RTN

    @torch.no_grad()
    def probe(self, m: nn.Module, measure: Callable[[], float]) -> float:
        """``measure()`` with ``m``'s weight (and fitted bias) rounded by GPTQ; restores them after."""
        fit = id(m) in self.fit_bias and m.bias is not None
        weight, bias = m.weight.detach().clone(), (m.bias.detach().clone() if m.bias is not None else None)
        qw, qb = gptq_rounded(m, self.hess[id(m)][0] if fit else self.hess[id(m)][0][: weight[0].numel(),
                                                                                   : weight[0].numel()], fit,
                             damp=self.damp)
        try:
            m.weight.copy_(qw)
            if qb is not None:
                m.bias.copy_(qb)
            m.refresh()
            return measure()
        finally:
            m.weight.copy_(weight)
            if bias is not None:
                m.bias.copy_(bias)
            m.refresh()


class _Prober:
    """Runs the model on the probe images, re-running only what a change can affect."""

    def __init__(self, model: nn.Module, images: torch.Tensor, ref: torch.Tensor):
        self.model, self.images, self.ref = model, images, ref
        self.trunk = adapter_for(model).trunk(model)
        self.cache: list[torch.Tensor] = []
        self.count = 0

    @torch.inference_mode()
    def refresh(self, start: int = -1) -> None:
        if self.trunk is None:
            return
        stem, blocks, _ = self.trunk
        if start < 0 or not self.cache:
            x, start = stem(self.images), 0
            self.cache = [None] * (len(blocks) + 1)
        else:
            start = min(start, len(blocks))
            x = self.cache[start]
        for k in range(start, len(blocks)):
            self.cache[k] = x
            x = blocks[k](x)
        self.cache[len(blocks)] = x

    @torch.inference_mode()
    def kl(self, start: int = -1) -> float:
        self.count += 1
        if self.trunk is None:
            out = self.model(self.images)
        else:
            stem, blocks, head = self.trunk
            if start < 0:
                x, start = stem(self.images), 0
            else:
                start = min(start, len(blocks))
                x = self.cache[start]
            for k in range(start, len(blocks)):
                x = blocks[k](x)
            out = head(x)
        self.out = out  # the logits of the last probe (the knapsack superposes their errors)
        return kl_from_reference(self.ref, out).mean().item()


def greedy_mp(fp_model: nn.Module, calib: torch.Tensor, base: QuantConfig, options: MethodOptions, budget: Budget,
              w_candidates=DEFAULT_CANDIDATES, a_candidates=DEFAULT_CANDIDATES, n_probe: int = 8,
              lower_per_step: int = 4, progress: bool = True,
              bank_config: Callable[[int], QuantConfig] | None = None,
              cost: Callable[[dict[str, dict[str, int]]], float] | None = None,
              snapshots: tuple[float, ...] = (), best_effort: bool = False,
              uniform_fallback: bool = True, search: str = "greedy",
              gptq_losses: bool = False) -> tuple[nn.Module, GreedyResult]:
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
        raise ConfigError("GPTQ-aware losses (--mp-gptq-losses) need the knapsack search and GPTQ "
                          f"(--gptq or --method mptq); got search {search!r}, gptq {options.gptq}")
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
        apply_sqb(float_model, calib, QuantConfig(w_bits=base.w_bits, a_bits=base.a_bits), progress=progress,
                  unnormed=options.sq_b_unnormed)
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
    stage = MethodOptions(sq_b=False, opt_m=options.opt_m, m_max=options.m_max,
                          optm_ptf=options.optm_ptf, optm_ptf_objective=options.optm_ptf_objective)
    banks: dict[int, dict] = {}
    model = None
    for b in tqdm(sorted(set(w_c + a_c), reverse=True), desc="calibrate candidates", disable=None if progress else True, leave=False):
        cfg = bank_config(b) if bank_config else replace(base, w_bits=b, a_bits=b, rules=[])
        res = run_pipeline(float_model, calib, cfg, stage)
        banks[b] = _harvest(res.model)
        if model is None:
            model = res.model  # the highest bit-width model is the starting point
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
            return -1 if trunk is None or not _after_blocks(model, qs, trunk) else n_blocks
        return min(ks)

    items: list[_Item] = []
    for m in weight_layers(model):
        items.append(_Item("W", m.layer_name, [m.w_quant], m.weight.numel(), where([m.w_quant]), w_c, len(w_c) - 1))
    groups: dict[str, list] = {}
    for q in all_quantizers(model):
        if not q.is_weight and not (q.layer in first and q.role == "input"):
            groups.setdefault(q.layer, []).append(q)
    for layer, qs in groups.items():
        items.append(_Item("A", layer, qs, sum(q.elements for q in qs), where(qs), a_c, len(a_c) - 1))
    owners = {id(m.w_quant): m for m in weight_layers(model)}

    def set_level(item: _Item, level: int) -> None:
        item.level = level
        for q in item.quantizers:
            _apply(q, banks[item.bits][q.name])
            if id(q) in owners:
                owners[id(q)].refresh()

    w_total = sum(i.size for i in items if i.kind == "W")
    # The A budget averages over the searchable activations: the image input of the first layer is
    # fixed at 8 bits and not counted (otherwise a 4-bit budget could never be met; the report's
    # avg_a_bits does count it, so a 4-bit search reports e.g. 4.05 there, like uniform W4A4).
    a_total = sum(i.size for i in items if i.kind == "A")
    stats0 = model_stats(model)
    size_const_bits = stats0["size_bytes"] * 8 - sum(i.size * i.bits for i in items if i.kind == "W")

    def avg_w() -> float:
        return sum(i.size * i.bits for i in items if i.kind == "W") / max(1, w_total)

    def avg_a() -> float:
        return sum(i.size * i.bits for i in items if i.kind == "A") / max(1, a_total)

    def size_mb() -> float:
        return (size_const_bits + sum(i.size * i.bits for i in items if i.kind == "W")) / 8 / 1e6

    # BOPs per image: each compute layer's MACs times its two operands' bits. ``partner`` maps an
    # operand quantizer to (MACs, the other operand's quantizer) so an item's saving is exact.
    n_img = max(1, getattr(model, "vitq_calib_images", 1))
    operands = []
    for m in compute_layers(model):
        pair = (m.a_quant, m.b_quant) if isinstance(m, QuantMatMul) else (m.w_quant, m.in_quant)
        operands.append((m.macs / n_img, *pair))
    partner: dict[int, list] = {}
    for macs, qa, qb in operands:
        partner.setdefault(id(qa), []).append((macs, qb))
        partner.setdefault(id(qb), []).append((macs, qa))
    bops_max = sum(macs * qa.spec.bits * qb.spec.bits for macs, qa, qb in operands)

    def gbops() -> float:
        return sum(macs * qa.spec.bits * qb.spec.bits for macs, qa, qb in operands) / 1e9

    def bits_need(kind: str) -> bool:
        if kind == "W":
            return (budget.w_bits is not None and avg_w() > budget.w_bits + 1e-9) or (
                budget.size_mb is not None and size_mb() > budget.size_mb + 1e-12)
        return budget.a_bits is not None and avg_a() > budget.a_bits + 1e-9

    def assignment(lowered: _Item | None = None) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for i in items:
            out.setdefault(i.layer, {})[i.kind] = i.choices[i.level - 1] if i is lowered else i.bits
        return out

    def current_cost() -> float | None:
        return cost(assignment()) if cost is not None else None

    def cost_binds(now: float | None) -> bool:
        """Whether the cost budget is unmet; ``now`` is the current cost (None without a cost function)."""
        return now is not None and budget.cost is not None and now > budget.cost * (1 + 1e-12)

    def need(kind: str, now: float | None) -> bool:
        return bits_need(kind) or (budget.gbops is not None and gbops() > budget.gbops + 1e-12) or cost_binds(now)

    def saved(item: _Item, now: float | None) -> float:
        """What one step down saves of the binding budget: average bits, else cost, else BOPs."""
        drop = item.bits - item.choices[item.level - 1]
        if bits_need(item.kind) or (budget.gbops is None and not cost_binds(now)):
            return drop * item.size / (w_total if item.kind == "W" else a_total)
        if cost_binds(now):
            return now - cost(assignment(item))
        bops = sum(macs * drop * other.spec.bits for q in item.quantizers for macs, other in partner.get(id(q), []))
        return bops / max(1.0, bops_max)

    probe_imgs = calib[:n_probe]
    with torch.inference_mode():
        ref = fp_model(probe_imgs)
    prober = _Prober(model, probe_imgs, ref)
    prober.refresh()
    current = prober.kl()

    def measure(item: _Item) -> None:
        if not item.can_lower():
            return
        level = item.level
        set_level(item, level - 1)
        item.sens = prober.kl(item.block) - current
        set_level(item, level)

    result = GreedyResult(config=base, rotation=rotation, token_scale=token_scale)
    if search != "greedy":
        w_losses = (_GPTQLosses(model, calib, options.gptq_max_bits)
                    if gptq_losses and options.gptq else None)
        current = _knapsack_search(model, items, set_level, prober, budget, w_total, a_total, size_const_bits,
                                   best_effort, result, progress, gptq_losses=w_losses)
    else:
        for item in tqdm(items, desc="sensitivity", disable=None if progress else True, leave=False):
            measure(item)
        now = current_cost()  # the cost of the current assignment, recomputed only when it changes

        def snapshot() -> None:
            for c in snapshots:
                if c not in result.snapshots and now is not None and now <= c * (1 + 1e-12):
                    result.snapshots[c] = assignment()

        snapshot()
        bar = tqdm(desc="greedy MP", disable=None if progress else True, leave=False)
        while need("W", now) or need("A", now):
            # Lower up to ``lower_per_step`` items (each one step, cheapest first, only while the budget
            # still needs it), then run the model once and re-measure only the items that moved.
            lowered: list[_Item] = []
            for _ in range(lower_per_step):
                needs = {k: need(k, now) for k in ("W", "A")}
                scored = []
                for idx, i in enumerate(items):
                    if i.can_lower() and needs[i.kind] and i not in lowered:
                        s = saved(i, now)
                        if s > 0:
                            scored.append((max(i.sens, 1e-12) / s, idx))
                if not scored:
                    break
                best = items[min(scored)[1]]
                set_level(best, best.level - 1)
                lowered.append(best)
                now = current_cost()
                snapshot()
            if not lowered:
                if best_effort:
                    break
                raise ConfigError(f"budget {budget} is unreachable with candidates W{w_c} A{a_c}")
            prober.refresh(min(i.block for i in lowered))
            current = prober.kl()
            result.steps += 1
            result.history.append({"step": result.steps, "items": [f"{i.kind}:{i.layer}:{i.bits}" for i in lowered],
                                   "kl": current, "avg_w": avg_w(), "avg_a": avg_a()})
            for i in lowered:
                measure(i)
            bar.update(1)
        bar.close()

    result.kl_greedy = current
    done("search")
    if uniform_fallback:
        # Every single-width assignment that meets the budget is also in the search space. Greedy
        # lowering ranks items by one-step sensitivities measured around the current state, which add
        # up poorly when many tensors move (docs/methods.md); so compare the result with those uniform
        # assignments on the same probe KL and keep the best. The greedy result wins ties.
        chosen = (current, [i.level for i in items], None)
        scores = result.fallback_scores = {"searched": chosen[0], "uniform": {}}
        for b in sorted(set(w_c) & set(a_c), reverse=True):
            for i in items:
                set_level(i, i.choices.index(b))
            now = current_cost()
            if need("W", now) or need("A", now):
                continue
            prober.refresh()  # runs the blocks once and caches their output ...
            kl_b = prober.kl(n_blocks)  # ... so only the head runs again here
            scores["uniform"][b] = kl_b
            if kl_b < chosen[0]:
                chosen = (kl_b, [i.level for i in items], b)
        for i, level in zip(items, chosen[1]):
            set_level(i, level)
        current, result.uniform_fallback = chosen[0], chosen[2]

        done("fallback")
    w_bits = {i.layer: i.bits for i in items if i.kind == "W"}
    a_bits = {i.layer: i.bits for i in items if i.kind == "A"}
    layers = sorted(set(w_bits) | set(a_bits), key=list(dict.fromkeys([i.layer for i in items])).index)
    rules = [LayerRule(layer, w_bits=w_bits.get(layer), a_bits=a_bits.get(layer)) for layer in layers]
    result.config = replace(base, rules=rules)
    model.vitq_config = result.config
    result.layers = [{"layer": row, "w_bits": w_bits.get(row), "a_bits": a_bits.get(row)} for row in layers]
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


def _knapsack_search(model: nn.Module, items: list[_Item], set_level, prober: _Prober, budget: Budget,
                     w_total: int, a_total: int, size_const_bits: float, best_effort: bool, result: GreedyResult,
                     progress: bool, gptq_losses: _GPTQLosses | None = None) -> float:
    """``search="knapsack"``: set every item's level by a multiple-choice knapsack; returns the probe KL.


    An item's loss at a width is the probe KL of the model with *only that item* quantized, at that width,
    and every other tensor in float. Errors of different tensors are then roughly independent, and for
    small errors KL is about half the expected squared logit error, so these losses add up; losses
    measured around a quantized operating point do not (each one includes the cross term with the error
    already there: session 13 measured a predicted KL of -2.98 for an assignment whose true KL was 0.22).
    A kind without a budget stays at its highest candidate, as in the greedy loop. With ``gptq_losses``
    a W item at a GPTQ width is probed with the weights GPTQ would give it (:class:`_GPTQLosses`).
    """
    caps: dict[str, float | None] = {"W": None, "A": None}
    if budget.w_bits is not None:
        caps["W"] = budget.w_bits * w_total
    if budget.size_mb is not None:
        size_cap = budget.size_mb * 8e6 - size_const_bits
        caps["W"] = size_cap if caps["W"] is None else min(caps["W"], size_cap)
    if budget.a_bits is not None:
        caps["A"] = budget.a_bits * a_total
    chosen = [i for i in items if caps[i.kind] is not None]
    initial = {id(i): i.level for i in items}
    quantizers = all_quantizers(model)
    modes = {id(q): q.mode for q in quantizers}
    loss: dict[int, list[float]] = {}
    logit_drift: dict[int, list[torch.Tensor]] = {}  # per item and level: its logits minus the float logits
    try:
        for q in quantizers:
            q.mode = "off"
        prober.refresh()  # float block inputs: each probe then runs from the item's block only
        if gptq_losses is not None:
            gptq_losses.capture()
        base_kl = prober.kl()  # about 0 (SQ-b's folding is exact in float up to rounding)
        base_out = prober.out
        for i in tqdm(chosen, desc="knapsack losses", disable=None if progress else True, leave=False):
            level = i.level
            for q in i.quantizers:
                q.mode = modes[id(q)]
            row, drift = [], []
            for j in range(len(i.choices)):
                set_level(i, j)
                layer = gptq_losses.layer(i) if gptq_losses is not None else None
                if layer is None:
                    row.append(prober.kl(i.block) - base_kl)
                else:
                    row.append(gptq_losses.probe(layer, lambda: prober.kl(i.block)) - base_kl)
                drift.append(prober.out - base_out)
            set_level(i, level)
            for q in i.quantizers:
                q.mode = "off"
            loss[id(i)], logit_drift[id(i)] = row, drift
            result.sensitivity.append({"layer": i.layer, "kind": i.kind, "elements": i.size,
                                       "kl": {str(b): v for b, v in zip(i.choices, row)}})
    finally:
        for q in quantizers:
            q.mode = modes[id(q)]
    predicted = 0.0
    for kind in ("W", "A"):
        group = [i for i in chosen if i.kind == kind]
        if not group:
            continue
        levels = solve_knapsack([loss[id(i)] for i in group], [[i.size * b for b in i.choices] for i in group],
                                caps[kind])
        if levels is None:
            if not best_effort:
                raise ConfigError(f"budget {budget} is unreachable with candidates "
                                  f"{kind}{tuple(sorted({b for i in group for b in i.choices}))}")
            levels = [0] * len(group)  # the cheapest state reachable
        predicted += sum(loss[id(i)][j] for i, j in zip(group, levels))
        for i, j in zip(group, levels):
            if j != i.level:
                set_level(i, j)
    # Diagnostic: the KL of the float logits plus every chosen item's isolated logit error. It keeps the
    # cross terms between the items' errors (the summed isolated KLs drop them) but not their nonlinear
    # interaction through the network, so comparing both with the true KL says which one is missing.
    superposed = base_out + sum(logit_drift[id(i)][i.level] for i in chosen) if chosen else base_out
    kl_superposed = kl_from_reference(prober.ref, superposed).mean().item()
    prober.refresh()
    current = prober.kl()
    # kl_predicted: the sum of the chosen items' isolated losses (the additive model's estimate of kl for
    # the searched tensors; tensors outside the search add to the true kl)
    entry = {"step": 1, "search": "knapsack", "kl_predicted": predicted, "kl_superposed": kl_superposed}
    w_sum = sum(i.size * i.bits for i in items if i.kind == "W")
    a_sum = sum(i.size * i.bits for i in items if i.kind == "A")
    result.steps = 1
    entry.update({"items": [f"{i.kind}:{i.layer}:{i.bits}" for i in items if i.level != initial[id(i)]],
                  "kl": current, "avg_w": w_sum / max(1, w_total), "avg_a": a_sum / max(1, a_total)})
    result.history.append(entry)
    return current


def _after_blocks(model: nn.Module, qs, trunk) -> bool:
    """Whether quantizers outside the trunk's blocks belong to the head (run after the blocks)."""
    _, blocks, _ = trunk
    order = {id(q): i for i, q in enumerate(all_quantizers(model))}
    last_block_q = max((order[id(q)] for blk in blocks for q in all_quantizers(blk)), default=-1)
    return all(order[id(q)] > last_block_q for q in qs)


def plot_bits(layers: list[dict], path, title: str = "") -> None:
    """Bar plot of W and A bits per layer, written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    names = [row["layer"] for row in layers]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.18), 4))
    ax.bar([i - 0.2 for i in x], [row["w_bits"] or 0 for row in layers], width=0.4, label="W bits")
    ax.bar([i + 0.2 for i in x], [row["a_bits"] or 0 for row in layers], width=0.4, label="A bits")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=5)
    ax.set_ylabel("bits")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
