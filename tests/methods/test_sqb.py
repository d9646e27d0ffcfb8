import copy

import pytest
import torch

from vitq.methods.sqb import apply_sqb, smoothing_factors
from vitq.quant import QuantConfig

from conftest import tiny_images, tiny_model


@pytest.mark.parametrize("family", ["deit", "swin"])
def test_folding_is_exact_in_float(family):
    model, size = tiny_model(family)
    x = tiny_images(size, n=6)
    smoothed = copy.deepcopy(model)
    res = apply_sqb(smoothed, x, QuantConfig(w_bits=4, a_bits=4), progress=False)
    n_pairs = {"deit": 2 * 2, "swin": 2 * 4 + 1}[family]  # qkv+fc1 per block (+ Swin patch merging)
    assert len(res.layers) == n_pairs
    with torch.inference_mode():
        assert (smoothed(x) - model(x)).abs().max() < 1e-4
    assert not torch.equal(smoothed.state_dict()[next(k for k in model.state_dict() if "norm1.weight" in k)],
                           model.state_dict()[next(k for k in model.state_dict() if "norm1.weight" in k)])


def test_zero_gamma_channel_gives_no_inf_or_nan():
    model, size = tiny_model("deit")
    with torch.no_grad():
        model.blocks[0].norm1.weight[3] = 0.0  # that LayerNorm channel is the constant beta
    x = tiny_images(size, n=4)
    smoothed = copy.deepcopy(model)
    apply_sqb(smoothed, x, QuantConfig(w_bits=4, a_bits=4), progress=False)
    for p in smoothed.parameters():
        assert torch.isfinite(p).all()
    with torch.inference_mode():
        assert (smoothed(x) - model(x)).abs().max() < 1e-4


def test_smoothing_factor_formula():
    a, w = torch.tensor([4.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0])
    s = smoothing_factors(a, w, 0.5)
    assert s.tolist() == [2.0, 1.0, 1.0]


def test_search_lowers_the_quantized_output_error():
    model, size = tiny_model("deit")
    with torch.no_grad():  # an outlier channel, the case SmoothQuant is for
        model.blocks[0].norm1.weight[5] = 30.0
        model.blocks[0].norm1.bias[5] = 20.0
    res = apply_sqb(copy.deepcopy(model), tiny_images(size, n=6), QuantConfig(w_bits=4, a_bits=4), progress=False)
    first = res.layers[0]
    assert first.name == "blocks.0.attn.qkv" and first.mse_after < first.mse_before
