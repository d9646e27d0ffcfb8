"""Probing for the mixed-precision search: the items it assigns bits to, the banks of calibrated grids
it switches them between, and the probe that measures the KL from FP of an assignment on a few
calibration images, re-running only the blocks a change can affect."""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import adapter_for
from ..distributed import split_map, world_size
from ..evaluation import kl_from_reference
from ..quant.engine import all_quantizers, weight_layers
from .gptq import _supported as gptq_supported, gptq_rounded, input_hessians

BUFFERS = ("scale", "zero_point", "range_min", "range_max", "region_m", "boundary")


@dataclass
class Item:
    """One thing the search assigns a level to: a layer's weight width, its activation width, or its weight
    scheme (M2Q's searched split)."""

    kind: str  # "W", "A", or "S": the layer's weight scheme, 0 = split between the engines, 1 = uniform
    layer: str
    quantizers: list
    size: int  # parameters (W and S) or activation values per calibration pass (A)
    block: int  # trunk block index; -1 = before the blocks, n = after
    choices: tuple[int, ...]  # ascending candidate bits (S: (0, 1))
    level: int  # index into choices
    sens: float = 0.0

    @property
    def bits(self) -> int:
        return self.choices[self.level]

    def can_lower(self) -> bool:
        return self.level > 0


def harvest(model: nn.Module) -> dict[str, dict]:
    return {q.name: {"spec": copy.deepcopy(q.spec), **{k: getattr(q, k).clone() for k in BUFFERS},
                     "token_shift": q.token_shift_or_none, "apot_channels": q.apot_mask}
            for q in all_quantizers(model)}


def apply_state(q, state: dict) -> None:
    q.spec = copy.deepcopy(state["spec"])
    for k in BUFFERS:
        setattr(q, k, state[k].clone())
    q.set_token_shift(state["token_shift"])  # a width's grid comes with that width's token shifts (or none)
    q.set_apot_channels(state.get("apot_channels"))  # and a mixed grid with that width's APoT channels


class GPTQLosses:
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

    def layer(self, item: Item) -> nn.Module | None:
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


class Prober:
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


def split_probes(prober: Prober, fn: Callable[[Item], object], items: list[Item]) -> list:
    """``[fn(i) for i in items]``, each ``fn`` a few probes from the same state, split between processes under
    torchrun (:func:`vitq.distributed.split_map`); ``prober.count`` counts every process's probes."""
    if world_size() == 1:
        return [fn(i) for i in items]

    def counted(item):
        before = prober.count
        return fn(item), prober.count - before

    before = prober.count
    out = split_map(counted, items)
    prober.count = before + sum(n for _, n in out)
    return [v for v, _ in out]


def after_blocks(model: nn.Module, qs, trunk) -> bool:
    """Whether quantizers outside the trunk's blocks belong to the head (run after the blocks)."""
    _, blocks, _ = trunk
    order = {id(q): i for i, q in enumerate(all_quantizers(model))}
    last_block_q = max((order[id(q)] for blk in blocks for q in all_quantizers(blk)), default=-1)
    return all(order[id(q)] > last_block_q for q in qs)
