"""A multiple-choice knapsack solver for mixed precision (Greedy MP's ``search="knapsack"``).

Each item (a layer's weights, or its activations) takes one of a few levels (bit-widths); level ``l`` of
item ``i`` costs ``cost[i][l]`` (bits x elements) and adds ``loss[i][l]`` to the objective (the probe KL
increase measured with only that item quantized, at that width). Under the additive model the
best assignment within a total cost is a multiple-choice knapsack. :func:`solve` uses its Lagrangian
relaxation (each item independently minimises ``loss + lam * cost``; ``lam`` is bisected to the smallest
value that meets the budget), then spends what budget is left on the best remaining single-item changes.
Pure Python on a few hundred items: milliseconds.
"""
from __future__ import annotations


def _pick(loss: list[list[float]], cost: list[list[float]], lam: float) -> list[int]:
    """Each item's level minimising ``loss + lam * cost`` (ties: the cheaper level, then the lower index)."""
    return [min(range(len(ls)), key=lambda j, ls=ls, cs=cs: (ls[j] + lam * cs[j], cs[j], j))
            for ls, cs in zip(loss, cost)]


def solve(loss: list[list[float]], cost: list[list[float]], capacity: float) -> list[int] | None:
    """Choose one level per item, minimising the summed loss with the summed cost at most ``capacity``.

    Args:
        loss: ``loss[i][l]``, the loss of item ``i`` at level ``l`` (may be negative).
        cost: ``cost[i][l]``, its cost (non-negative).
        capacity: the largest total cost allowed.

    Returns:
        The level of each item, or None when even the cheapest level of every item exceeds ``capacity``.
        Deterministic: the same inputs give the same levels.
    """
    if len(loss) != len(cost) or any(len(a) != len(b) or not a for a, b in zip(loss, cost)):
        raise ValueError("loss and cost need one non-empty row per item, of equal lengths")
    tol = 1e-9 * max(1.0, abs(capacity))
    cheapest = [min(range(len(cs)), key=lambda j, cs=cs: (cs[j], j)) for cs in cost]
    if sum(cost[i][j] for i, j in enumerate(cheapest)) > capacity + tol:
        return None

    def total(levels):
        return sum(cost[i][j] for i, j in enumerate(levels))

    levels = _pick(loss, cost, 0.0)
    if total(levels) > capacity + tol:
        # The spread of loss over cost bounds the multiplier at which every item takes its cheapest level.
        span = max(abs(v) for row in loss for v in row) or 1.0
        dc = min((abs(a - b) for row in cost for a in row for b in row if a != b), default=1.0)
        lo, hi = 0.0, 4 * span / dc + 1.0
        while total(_pick(loss, cost, hi)) > capacity + tol:  # cannot happen with the bound above; be safe
            hi *= 2
        for _ in range(100):
            mid = (lo + hi) / 2
            if total(_pick(loss, cost, mid)) > capacity + tol:
                lo = mid
            else:
                hi = mid
        levels = _pick(loss, cost, hi)
    # Local search: apply the best improving move of one item, or of two items together (one can pay for
    # the other), that keeps the total within capacity, until none lowers the loss. This closes most of the
    # relaxation's integer gap (tests/methods/test_mp_knapsack.py compares with brute force).
    spent = total(levels)
    for _ in range(10 * len(loss) + 100):
        moves = [(ls[j] - ls[levels[i]], cs[j] - cs[levels[i]], i, j)
                 for i, (ls, cs) in enumerate(zip(loss, cost)) for j in range(len(ls)) if j != levels[i]]
        slack = capacity + tol - spent
        best = None  # (loss change, cost change, moves)
        for m in moves:
            if m[1] <= slack and m[0] < 0 and (best is None or m[0] < best[0]):
                best = (m[0], m[1], (m,))
        for x, m1 in enumerate(moves):
            for m2 in moves[x + 1:]:
                if m1[2] == m2[2]:
                    continue
                d = m1[0] + m2[0]
                if d < 0 and m1[1] + m2[1] <= slack and (best is None or d < best[0] - 1e-15):
                    best = (d, m1[1] + m2[1], (m1, m2))
        if best is None:
            break
        for _, _, i, j in best[2]:
            levels[i] = j
        spent += best[1]
    return levels
