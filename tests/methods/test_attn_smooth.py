import copy

import pytest
import torch

from vitq.adapters import adapter_for
from vitq.methods.attn_smooth import apply_attn_smooth, fold_qk, fold_v
from vitq.quant import QuantConfig

from conftest import tiny_images, tiny_model


@pytest.mark.parametrize("family", ["deit", "swin"])
def test_folds_are_exact_in_float_for_any_factors(family):
    model, size = tiny_model(family)
    x = tiny_images(size, n=4)
    folded = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    attns = adapter_for(folded).qkv_attentions(folded)
    assert attns
    for a in attns:
        dim = a.qkv.weight.shape[0] // 3
        fold_qk(a, torch.rand(dim, generator=g) * 4 + 0.25, torch.randn(dim, generator=g))
        fold_v(a, torch.rand(dim, generator=g) * 4 + 0.25)
    with torch.inference_mode():
        assert (folded(x) - model(x)).abs().max() < 1e-4
    assert not torch.equal(folded.blocks[0].attn.qkv.weight if family == "deit" else attns[0].qkv.weight,
                           model.blocks[0].attn.qkv.weight if family == "deit"
                           else adapter_for(model).qkv_attentions(model)[0].qkv.weight)


def _with_outlier_channels(model):
    """Give block 0's k a large, offset channel and its v one large channel, as trained ViTs have."""
    a = model.blocks[0].attn
    dim = a.qkv.weight.shape[0] // 3
    with torch.no_grad():
        a.qkv.weight[dim + 5] *= 30
        a.qkv.bias[dim + 5] += 40
        a.qkv.weight[2 * dim + 7] *= 30
    return model


def test_search_lowers_the_quantized_errors_and_keeps_the_model_exact():
    model, size = tiny_model("deit")
    model = _with_outlier_channels(model)
    x = tiny_images(size, n=4)
    smoothed = copy.deepcopy(model)
    res = apply_attn_smooth(smoothed, x, QuantConfig(w_bits=4, a_bits=4), progress=False)
    assert len(res.layers) == len(model.blocks)
    for layer in res.layers:  # "unchanged" is a candidate, so neither error can rise
        assert layer.qk_mse_after <= layer.qk_mse_before
        assert layer.v_mse_after <= layer.v_mse_before
    first = res.layers[0]
    assert first.qk_alpha is not None and first.qk_mse_after < 0.5 * first.qk_mse_before
    assert first.v_alpha is not None and first.v_mse_after < first.v_mse_before
    with torch.inference_mode():
        assert (smoothed(x) - model(x)).abs().max() < 1e-3 * model(x).abs().max()
    again = copy.deepcopy(model)
    apply_attn_smooth(again, x, QuantConfig(w_bits=4, a_bits=4), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), smoothed.parameters()))  # deterministic


def test_proj_behind_an_explicit_sqb_operation_is_left_alone():
    from vitq.methods.sqb import apply_sqb

    model, size = tiny_model("deit")
    model = _with_outlier_channels(model)
    x = tiny_images(size, n=4)
    apply_sqb(model, x, QuantConfig(w_bits=4, a_bits=4), progress=False, unnormed=True)
    proj = model.blocks[0].attn.proj.weight.clone()
    ref = model(x).detach()
    res = apply_attn_smooth(model, x, QuantConfig(w_bits=4, a_bits=4), progress=False)
    assert all(layer.v_alpha is None for layer in res.layers)
    assert torch.equal(model.blocks[0].attn.proj.weight, proj)
    with torch.inference_mode():
        assert (model(x) - ref).abs().max() < 1e-3 * ref.abs().max()


def test_parts_choose_which_transform_runs():
    model, size = tiny_model("deit")
    model = _with_outlier_channels(model)
    x = tiny_images(size, n=4)
    qk_only = copy.deepcopy(model)
    res = apply_attn_smooth(qk_only, x, QuantConfig(w_bits=4, a_bits=4), progress=False, parts=("qk",))
    assert res.layers[0].qk_alpha is not None and all(layer.v_alpha is None for layer in res.layers)
    assert all(torch.equal(a.attn.proj.weight, b.attn.proj.weight) for a, b in zip(qk_only.blocks, model.blocks))
    v_only = copy.deepcopy(model)
    res = apply_attn_smooth(v_only, x, QuantConfig(w_bits=4, a_bits=4), progress=False, parts=("v",))
    assert res.layers[0].v_alpha is not None and all(layer.qk_alpha is None for layer in res.layers)
    dim = model.blocks[0].attn.qkv.weight.shape[0] // 3
    assert torch.equal(v_only.blocks[0].attn.qkv.weight[:2 * dim], model.blocks[0].attn.qkv.weight[:2 * dim])
    with pytest.raises(ValueError, match="parts"):
        apply_attn_smooth(copy.deepcopy(model), x, QuantConfig(), progress=False, parts=("kv",))
