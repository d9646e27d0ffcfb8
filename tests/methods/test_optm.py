import pytest
import torch

from vitq.methods.optm import CLIP_GRID, apply_optm, default_m_max, search_two_region, search_uniform_clip
from vitq.quant import quantizers as Q
from vitq.quant import QuantConfig, quantize

from conftest import tiny_images, tiny_model, tiny_vit_with_massive_position


def test_never_worse_than_m0_and_two_region_on_softmax_like_data():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    attn = logits.softmax(-1)  # skewed: most values tiny, a few large
    v = torch.randn(50, 8)
    out_fn = lambda a: a @ v  # noqa: E731
    _, _, err0 = search_uniform_clip(attn, 4, out_fn)
    delta, m, boundary, err = search_two_region(attn, 4, 4, False, out_fn)
    assert err < err0 and m >= 1


def test_two_region_search_equals_the_plain_loop_over_fake_quant_bit_for_bit():
    # search_two_region computes both grids once per (delta, m) and only re-picks per boundary; it must
    # return exactly what trying every candidate with fake_quant_two_region returns.
    from vitq.methods.optm import STANDARD_GRID, _error
    g = torch.Generator().manual_seed(1)
    for signed, x in ((False, (torch.randn(200, 40, generator=g) * 2).softmax(-1)),
                      (True, torch.nn.functional.gelu(torch.randn(200, 40, generator=g) * 2))):
        w = torch.randn(16, 40, generator=g)
        out_fn = lambda v, w=w: v @ w.T  # noqa: E731
        ref, n, top = out_fn(x), 2 ** 3, x.max().clamp_min(1e-8)
        best = (None, None, None, float("inf"))
        for m in range(1, 5):
            for r in STANDARD_GRID.deltas:
                delta = top * r / (n - 1)
                fine_top = ((n // 2 if signed else n) - 0.5) * delta / 2**m
                for c in STANDARD_GRID.boundaries:
                    err = _error(out_fn, ref, Q.fake_quant_two_region(x, delta, m, fine_top * c, 4, signed))
                    if err < best[3]:
                        best = (delta.item(), m, (fine_top * c).item(), err)
        assert search_two_region(x, 4, 4, signed, out_fn) == best


def test_apply_optm_on_model_choices_are_consistent():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=8)
    cfg = QuantConfig(w_bits=4, a_bits=4)
    q = quantize(model, x, cfg)
    res = apply_optm(q, x, progress=False)
    assert len(res.choices) == 2 * 2  # fc2 input and attn probabilities per block
    for c in res.choices:
        assert c.error <= c.error_m0
        qz = dict((t.name, t) for t in q.modules() if hasattr(t, "spec") and hasattr(t, "role"))[c.name]
        assert qz.spec.scheme == ("two_region" if c.m > 0 else "uniform")
    with torch.inference_mode():
        assert torch.isfinite(q(x)).all()


def _full_protocol_vit():
    """A tiny ViT quantized at W6A6 in the full protocol, its 8 images, and its PTF residual-stream grids."""
    model, size = tiny_model("vit")
    x = tiny_images(size, n=8)
    q = quantize(model, x, QuantConfig(w_bits=6, a_bits=6, protocol="full"))
    ptf = [t for t in q.modules() if getattr(t, "spec", None) is not None and getattr(t.spec, "granularity", "") == "ptf"]
    return q, x, ptf


def test_m_max_default_scales_with_bits_and_zero_keeps_every_tensor_uniform():
    assert [default_m_max(b) for b in (2, 4, 5, 6, 8)] == [4, 4, 4, 5, 7]
    assert 0.97 in CLIP_GRID and 1.0 in CLIP_GRID and min(CLIP_GRID) == 0.3  # fine steps near the max
    model, size = tiny_model("deit")
    x = tiny_images(size, n=8)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8))
    apply_optm(q, x, m_max=0, progress=False)  # clip search only: exportable as plain 8-bit QDQ
    assert all(t.spec.scheme == "uniform" for t in q.modules() if hasattr(t, "spec") and hasattr(t, "role"))


def test_wider_m_range_is_never_worse_at_8_bits():
    torch.manual_seed(0)
    h = torch.nn.functional.gelu(torch.randn(512, 64) * 2)
    h[:, 3] *= 60  # one outlier channel, as in ViT-Tiny's post-GELU values
    w = torch.randn(32, 64)
    out_fn = lambda a: a @ w.T  # noqa: E731
    err4 = search_two_region(h, 8, 4, True, out_fn)[3]
    err7 = search_two_region(h, 8, default_m_max(8), True, out_fn)[3]
    assert err7 <= err4


def _residual_like(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=g) * torch.linspace(0.05, 3.0, 32)  # channel ranges over two orders
    x[7, 5] = 400.0  # one massive activation in one token and channel, as in ViT-Tiny's residual stream
    return x


def test_ptf_search_is_never_worse_than_minmax_and_keeps_power_of_two_steps():
    from vitq.methods.optm import search_ptf
    from vitq.quant import quantizers as Q

    x = _residual_like()
    lo, hi = x.min(0).values, x.max(0).values
    for bits in (4, 6, 8):
        scale0, zp0, _ = Q.ptf_params(lo, hi, bits)
        qmin, qmax = Q.int_range(bits, False)
        err0 = (Q.fake_quant_uniform(x, scale0, zp0, qmin, qmax, axis=-1) - x).pow(2).mean().item()
        scale, zp, err, err_minmax = search_ptf(x, lo, hi, bits)
        assert abs(err_minmax - err0) <= 1e-6 * max(1.0, err0)
        got = (Q.fake_quant_uniform(x, scale, zp, qmin, qmax, axis=-1) - x).pow(2).mean().item()
        assert err <= err0 and abs(got - err) <= 1e-6 * max(1.0, err)  # the reported error is the grid's error
        ratios = torch.log2(scale / scale.min())
        assert torch.allclose(ratios, ratios.round(), atol=1e-5) and ratios.max() <= 7  # one base, shifts 0..7
        assert ((zp >= qmin) & (zp <= qmax)).all()
    assert err < err0  # at 8 bits the min-max grid wastes resolution: the search finds a strictly better one


def test_apply_optm_searches_ptf_grids_by_default():
    q, x, ptf = _full_protocol_vit()
    before = [t.scale.clone() for t in ptf]
    res = apply_optm(q, x, progress=False)
    assert any(not torch.equal(t.scale, b) for t, b in zip(ptf, before))
    searched = [c for c in res.choices if c.scheme == "ptf"]  # reported, with the error before and after
    assert len(searched) == len(ptf) and all(c.error <= c.error_m0 for c in searched)
    for t in ptf:  # the clip range follows the new steps and zero points
        qmin, qmax = t._qrange()
        assert torch.allclose(t.range_max, (qmax - t.zero_point) * t.scale)
    with torch.inference_mode():
        assert torch.isfinite(q(x)).all()
    other = next(t for t in q.modules() if getattr(t, "spec", None) is not None and hasattr(t, "role")
                 and not t.is_weight and t.spec.granularity == "per_tensor")
    with pytest.raises(ValueError, match="not a PTF grid"):
        other.set_ptf(torch.ones(3), torch.zeros(3))


def test_ptf_search_row_weights_define_the_objective():
    from vitq.methods.optm import search_ptf
    from vitq.quant import quantizers as Q

    x = _residual_like()
    lo, hi = x.min(0).values, x.max(0).values
    qmin, qmax = Q.int_range(6, False)
    # weights all one: the same grid and error as no weights
    plain = search_ptf(x, lo, hi, 6)
    ones = search_ptf(x, lo, hi, 6, row_weight=torch.ones(x.shape[0]))
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1], ones[1]) and abs(plain[2] - ones[2]) < 1e-9
    # the massive token (row 7) has a huge variance: weighted by 1 / var, its error counts for less
    w = 1.0 / x.var(-1, unbiased=False)
    scale, zp, err, err_minmax = search_ptf(x, lo, hi, 6, row_weight=w)

    def weighted(s, z):
        e = (Q.fake_quant_uniform(x, s, z, qmin, qmax, axis=-1) - x).pow(2) * w[:, None]
        return e.sum().item() / (w.sum().item() * x.shape[1])

    s0, z0, _ = Q.ptf_params(lo, hi, 6)
    assert abs(err_minmax - weighted(s0, z0)) <= 1e-6 * err_minmax and abs(err - weighted(scale, zp)) <= 1e-6 * err
    assert err <= err_minmax and err <= weighted(plain[0], plain[1])  # optimal on its own objective
    assert err < weighted(plain[0], plain[1])  # and here strictly better than the unweighted search's grid


def test_capture_row_weights_are_the_residual_streams_inverse_variance():
    from vitq.methods.optm import _capture

    model, size = tiny_model("vit")
    x = tiny_images(size, n=2)
    q = quantize(model, x, QuantConfig(w_bits=6, a_bits=6, protocol="full"))
    block = q.blocks[0]
    seen = {}
    hooks = [block.residual1.x_quant.register_forward_hook(lambda m, a, o: seen.setdefault("x1", a[0].clone())),
             block.residual2.x_quant.register_forward_hook(lambda m, a, o: seen.setdefault("x2", a[0].clone()))]
    weights: dict = {}
    try:
        _capture(q, x, max_rows=10**6, row_weights=weights)  # no subsampling: rows are every token
    finally:
        for h in hooks:
            h.remove()

    def inv_var(t):
        return 1.0 / t.reshape(-1, t.shape[-1]).var(-1, unbiased=False).clamp_min(1e-6)

    assert torch.allclose(weights[id(block.residual1.x_quant)], inv_var(seen["x1"]))
    # the branch is added to x: its error reaches norm2 through x + branch, which is residual2's input
    assert torch.allclose(weights[id(block.residual1.b_quant)], inv_var(seen["x2"]), rtol=1e-4)
    assert id(q.norm.in_quant) in weights
    # only the PTF grids get weights
    assert all(getattr(t, "ptf_axis", None) == -1 for t in q.modules() if id(t) in weights)


def test_apply_optm_searches_the_ptf_grids():
    q, x, _ = _full_protocol_vit()
    res = apply_optm(q, x, progress=False)
    searched = [c for c in res.choices if c.scheme == "ptf"]
    assert searched and all(c.error <= c.error_m0 for c in searched)
    with torch.inference_mode():
        assert torch.isfinite(q(x)).all()


def test_capture_divides_token_shifted_rows_and_weighs_their_errors_back():
    from vitq.methods.optm import _capture

    model, x = tiny_vit_with_massive_position(n=2)
    q = quantize(model, x, QuantConfig(w_bits=6, a_bits=6, protocol="full", residual_token_shift=True))
    grid = q.blocks[0].residual1.x_quant
    seen = {}
    hook = grid.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0].clone()))
    tw: dict = {}
    try:
        found = _capture(q, x, max_rows=10**6, token_weights=tw)  # every token: rows in order
    finally:
        hook.remove()
    f = torch.exp2(grid.token_shift).reshape(1, -1, 1)
    rows, _ = found[id(grid)]
    assert torch.equal(rows, (seen["x"] / f).reshape(-1, seen["x"].shape[-1]))  # what the channel grid sees
    assert torch.equal(tw[id(grid)], f.square().expand(2, -1, 1).reshape(-1))
    assert id(q.blocks[0].attn.qkv.in_quant) not in tw  # only grids with token shifts


def test_apply_optm_ptf_search_keeps_token_shifts():
    model, x = tiny_vit_with_massive_position(n=4)
    q = quantize(model, x, QuantConfig(w_bits=6, a_bits=6, protocol="full", residual_token_shift=True))
    grid = q.blocks[0].residual1.x_quant
    shift = grid.token_shift.clone()
    res = apply_optm(q, x, progress=False)
    choice = next(c for c in res.choices if c.name == grid.name)
    assert choice.scheme == "ptf" and choice.error <= choice.error_m0
    assert torch.equal(grid.token_shift, shift)


def _heads(seed: int = 0) -> torch.Tensor:
    """Softmax-input-like logits (batch, heads, N, N) whose three heads differ 1x, 4x and 16x in range."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 12, 12, generator=g) * torch.tensor([1.0, 4.0, 16.0]).view(1, 3, 1, 1)
