import torch

from vitq.methods.optm import CLIP_GRID, apply_optm, default_m_max, search_two_region, search_uniform_clip
from vitq.quant import QuantConfig, quantize

from conftest import tiny_images, tiny_model


def test_never_worse_than_m0_and_two_region_on_softmax_like_data():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    attn = logits.softmax(-1)  # skewed: most values tiny, a few large
    v = torch.randn(50, 8)
    out_fn = lambda a: a @ v  # noqa: E731
    _, _, err0 = search_uniform_clip(attn, 4, out_fn)
    delta, m, boundary, err = search_two_region(attn, 4, 4, False, out_fn)
    assert err < err0 and m >= 1


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


def test_full_protocol_ptf_grids_are_left_alone():
    model, size = tiny_model("vit")
    x = tiny_images(size, n=8)
    q = quantize(model, x, QuantConfig(w_bits=6, a_bits=6, protocol="full"))
    ptf = [t for t in q.modules() if getattr(t, "spec", None) is not None and getattr(t.spec, "granularity", "") == "ptf"]
    before = [t.scale.clone() for t in ptf]
    apply_optm(q, x, progress=False)
    assert ptf and all(torch.equal(t.scale, b) and t.scale.numel() > 1 for t, b in zip(ptf, before))


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


def test_wide_grid_contains_the_standard_one_so_it_is_never_worse():
    from vitq.methods.optm import GRIDS, STANDARD_GRID, WIDE_GRID

    assert set(STANDARD_GRID.deltas) <= set(WIDE_GRID.deltas) and min(WIDE_GRID.deltas) < min(STANDARD_GRID.deltas)
    assert set(STANDARD_GRID.boundaries) <= set(WIDE_GRID.boundaries)
    torch.manual_seed(0)
    h = torch.nn.functional.gelu(torch.randn(512, 64) * 2)
    h[:, 3] *= 60
    w = torch.randn(32, 64)
    out_fn = lambda a: a @ w.T  # noqa: E731
    std = search_two_region(h, 4, 4, True, out_fn, STANDARD_GRID)
    wide = search_two_region(h, 4, 4, True, out_fn, GRIDS["wide"])
    assert wide[3] <= std[3]


def test_unknown_grid_is_named_in_the_error():
    import pytest

    model, size = tiny_model("deit")
    x = tiny_images(size, n=4)
    q = quantize(model, x, QuantConfig(w_bits=4, a_bits=4))
    with pytest.raises(ValueError, match="unknown OPT-m grid 'huge'"):
        apply_optm(q, x, progress=False, grid="huge")
