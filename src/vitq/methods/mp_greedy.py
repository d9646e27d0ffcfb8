"""The paper's greedy loop for mixed precision, and the uniform fallback that any search's result is compared
with. Both work on the items' levels through ``set_level`` and measure on a :class:`~.mp_probe.Prober`."""
from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm

from ..quant.config import ConfigError
from .mp_budget import Accounts
from .mp_probe import Item, Prober, split_probes


def greedy_search(items: list[Item], set_level: Callable[[Item, int], None], accounts: Accounts, prober: Prober,
                  current: float, lower_per_step: int, snapshots: tuple[float, ...], best_effort: bool,
                  progress: bool, candidates: str) -> tuple[float, int, list[dict], dict[float, dict]]:
    """Lower items from the highest candidate until the budget holds (MPTQ-ViT's Greedy MP).

    Each item's sensitivity is the probe KL increase when it alone goes one step down. Each step lowers up to
    ``lower_per_step`` items with the least KL per unit of the binding budget saved, runs the model once,
    and re-measures only the items that moved.

    Args:
        current: the probe KL of the starting assignment.
        snapshots: cost values at which to record the assignment (``accounts.cost``'s units).
        candidates: the candidate widths, for the error message.

    Returns:
        The probe KL at the end, the number of steps, their history, and ``{cost value: assignment}``.

    Raises:
        ConfigError: the budget cannot be met (unless ``best_effort``).
    """
    state = {"current": current}

    def one(item: Item) -> float:
        level = item.level
        set_level(item, level - 1)
        try:
            return prober.kl(item.block) - state["current"]
        finally:
            set_level(item, level)

    def measure(batch: list[Item], bar=None) -> None:
        """Each item's sensitivity, the probes split between processes under torchrun (vitq.distributed)."""
        todo = [i for i in batch if i.can_lower()]

        def shown(item: Item) -> float:
            out = one(item)
            if bar is not None:
                bar.update(1)
            return out

        for item, sens in zip(todo, split_probes(prober, shown, todo)):
            item.sens = sens

    with tqdm(desc="sensitivity", disable=None if progress else True, leave=False) as bar:
        measure(items, bar)
    now = accounts.current_cost()  # the cost of the current assignment, recomputed only when it changes
    taken: dict[float, dict] = {}
    history: list[dict] = []

    def snapshot() -> None:
        for c in snapshots:
            if c not in taken and now is not None and now <= c * (1 + 1e-12):
                taken[c] = accounts.assignment()

    snapshot()
    steps = 0
    bar = tqdm(desc="greedy MP", disable=None if progress else True, leave=False)
    while accounts.need("W", now) or accounts.need("A", now):
        # Lower up to ``lower_per_step`` items (each one step, cheapest first, only while the budget
        # still needs it), then run the model once and re-measure only the items that moved.
        lowered: list[Item] = []
        for _ in range(lower_per_step):
            needs = {k: accounts.need(k, now) for k in ("W", "A", "S")}
            scored = []
            for idx, i in enumerate(items):
                if i.can_lower() and needs[i.kind] and i not in lowered:
                    s = accounts.saved(i, now)
                    if s > 0:
                        scored.append((max(i.sens, 1e-12) / s, idx))
            if not scored:
                break
            best = items[min(scored)[1]]
            set_level(best, best.level - 1)
            lowered.append(best)
            now = accounts.current_cost()
            snapshot()
        if not lowered:
            if best_effort:
                break
            raise ConfigError(f"budget {accounts.budget} is unreachable with candidates {candidates}")
        prober.refresh(min(i.block for i in lowered))
        state["current"] = prober.kl()
        steps += 1
        history.append({"step": steps, "items": [f"{i.kind}:{i.layer}:{i.bits}" for i in lowered],
                        "kl": state["current"], "avg_w": accounts.avg_w(), "avg_a": accounts.avg_a()})
        # a layer's W width and weight scheme share its quantizer: re-measure both when either moved
        moved = {id(q) for i in lowered for q in i.quantizers}
        measure([i for i in items if any(id(q) in moved for q in i.quantizers)])
        bar.update(1)
    bar.close()
    return state["current"], steps, history, taken


def uniform_fallback(items: list[Item], set_level: Callable[[Item, int], None], accounts: Accounts,
                     prober: Prober, current: float, widths: list[int], n_blocks: int) -> tuple[float, int | None, dict]:
    """Compare the searched assignment with every single width that meets the budget, on the same probe KL,
    and keep the best (the searched one wins ties).

    Every single-width assignment that meets the budget is also in the search space; greedy lowering ranks
    items by one-step sensitivities measured around the current state, which add up poorly when many
    tensors move (docs/methods.md).

    Returns:
        The probe KL of the kept assignment, its width if a uniform one won (else None), and the scores.
    """
    chosen = (current, [i.level for i in items], None)
    scores = {"searched": chosen[0], "uniform": {}}
    for b in sorted(widths, reverse=True):
        for i in items:
            set_level(i, i.choices.index(b))
        now = accounts.current_cost()
        if accounts.need("W", now) or accounts.need("A", now):
            continue
        prober.refresh()  # runs the blocks once and caches their output ...
        kl_b = prober.kl(n_blocks)  # ... so only the head runs again here
        scores["uniform"][b] = kl_b
        if kl_b < chosen[0]:
            chosen = (kl_b, [i.level for i in items], b)
    for i, level in zip(items, chosen[1]):
        set_level(i, level)
    return chosen[0], chosen[2], scores
