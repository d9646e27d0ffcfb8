import random

import pytest
import torch

from vitq.methods.mp_superpose import refine, superposed_kl


def _instance(seed, n=8, levels=3, images=4, classes=10):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(images, classes, generator=g) * 3
    # higher levels (more bits) have smaller logit errors; level costs grow with the level
    drift = [[torch.randn(images, classes, generator=g) * (0.6 / (1 + 2 * lvl)) for lvl in range(levels)]
             for _ in range(n)]
    size = [random.Random(seed * 100 + i).randint(1, 5) for i in range(n)]
    cost = [[s * b for b in (4, 6, 8)[:levels]] for s in size]
    group = [i % 2 for i in range(n)]
    caps = [sum(cost[i][1] for i in range(n) if group[i] == k) for k in (0, 1)]
    return ref, drift, cost, group, caps


def test_superposed_kl_matches_the_per_image_mean():
    ref = torch.randn(3, 5)
    cand = torch.randn(2, 3, 5)
    want = [(torch.softmax(ref, 1) * (torch.log_softmax(ref, 1) - torch.log_softmax(c, 1))).sum(1).mean()
            for c in cand]
    assert torch.allclose(superposed_kl(ref, cand), torch.stack(want), atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_refine_lowers_the_superposed_kl_within_the_caps_and_is_deterministic(seed):
    ref, drift, cost, group, caps = _instance(seed)
    start = [1] * len(drift)  # the middle level everywhere: exactly at both caps
    before = superposed_kl(ref, (ref + sum(d[1] for d in drift))[None])[0].item()
    levels, kl = refine(ref, ref, drift, cost, group, caps, start)
    for k in (0, 1):
        assert sum(cost[i][j] for i, j in enumerate(levels) if group[i] == k) <= caps[k] + 1e-6
    assert kl <= before + 1e-9
    assert kl == pytest.approx(superposed_kl(ref, (ref + sum(d[j] for d, j in zip(drift, levels)))[None])[0].item(),
                               rel=1e-4)  # float32 sums in another order
    assert refine(ref, ref, drift, cost, group, caps, start) == (levels, kl)


def test_refine_finds_errors_that_cancel():
    # Items 0 and 1 have large, opposite logit errors at their low level: each alone costs much KL, both
    # together nothing. Item 2's error is small. The additive model lowers item 2 and one of 0/1; the budget
    # allows two lowered items, and the best pair is 0 and 1 together, which only a two-item move reaches.
    ref = torch.zeros(2, 4)
    v = torch.tensor([[2.0, -1.0, 0.0, 0.5], [0.0, 1.5, -2.0, 0.0]])
    zero = torch.zeros(2, 4)
    drift = [[v, zero], [-v, zero], [0.2 * v.flip(1), zero]]
    cost = [[4, 8]] * 3
    levels, kl = refine(ref, ref, drift, cost, [0, 0, 0], [4 + 4 + 8], [0, 1, 0])
    assert levels == [0, 0, 1] and kl == pytest.approx(0.0, abs=1e-6)


def test_refine_checks_its_inputs():
    ref, drift, cost, group, caps = _instance(0)
    with pytest.raises(ValueError, match="one entry per item"):
        refine(ref, ref, drift[:-1], cost, group, caps, [1] * len(drift))
    with pytest.raises(ValueError, match="exceed a budget cap"):
        refine(ref, ref, drift, cost, group, caps, [2] * len(drift))
