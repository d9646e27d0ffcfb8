"""Additive power-of-two (APoT) weights and the per-channel uniform/APoT split."""
import pytest
import torch

from vitq.quant import QuantConfig
from vitq.quant import quantizers as Q
from vitq.quant.engine import quantize, weight_layers

from conftest import tiny_images, tiny_model


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_every_apot_value_is_the_scale_times_at_most_two_powers_of_two(bits):
    first, second = Q.apot_terms(bits)
    assert len(first) == 2 ** (bits - 1) and len(set((first + second).tolist())) == 2 ** (bits - 1)
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 40, generator=g)
    scale = Q.apot_scale(w.abs().amax(1, keepdim=True) * 0.8, bits)
    wq = Q.fake_quant_apot(w, scale, bits)
    levels = Q.apot_levels(bits)
    idx = ((wq / scale).abs().unsqueeze(-1) - levels).abs().argmin(-1)
    # every dequantized weight is exactly sign x scale x level, and each level has at most two bits set
    assert torch.equal(wq, torch.sign(wq) * levels[idx] * scale)
    for v in levels.double().tolist():
        ones = [e for e in range(-1, 40) if (v * 2.0 ** e) % 2 >= 1]
        assert len(ones) <= 2 and v == sum(2.0 ** -e for e in ones), v
    # nearest level: no other level of the grid is closer to any value
    levels = Q.apot_levels(bits) * scale
    err = (w - wq).abs()
    others = (w.abs().unsqueeze(-1) - levels.unsqueeze(1)).abs().amin(-1)
    assert torch.all(err <= others + 1e-6)


def test_split_by_error_or_by_share():
    eu = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ea = torch.tensor([2.0, 1.0, 3.5, 0.5])
    assert Q.split_channels(eu, ea).tolist() == [False, True, False, True]
    # a share of one half: the two channels that lose least (gain most) by moving
    assert Q.split_channels(eu, ea, 0.5).tolist() == [False, True, False, True]
    assert Q.split_channels(eu, ea, 0.75).tolist() == [False, True, True, True]
    assert Q.split_channels(eu, ea, 0.0).sum() == 0 and Q.split_channels(eu, ea, 1.0).all()


def test_mixed_grid_is_each_channels_better_grid_and_reloads_bit_for_bit(tmp_path):
    from vitq.artifact import load_artifact, save_artifact
    from vitq.export.packed import export_packed, load_packed
    from vitq.output import destination

    from conftest import TINY

    meta = {"model": "deit_tiny_patch16_224.fb_in1k", "model_kwargs": TINY["deit"][1]}

    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    uni = quantize(model, x, QuantConfig(w_bits=4, a_bits=8))
    apot = quantize(model, x, QuantConfig(w_bits=4, a_bits=8, w_scheme="apot"))
    mixed = quantize(model, x, QuantConfig(w_bits=4, a_bits=8, w_scheme="mixed"))
    n_apot = 0
    with torch.no_grad():
        for mu, ma, mm in zip(weight_layers(uni), weight_layers(apot), weight_layers(mixed)):
            mask = mm.w_quant.apot_mask
            assert mask is not None and mask.shape == (mm.weight.shape[0],)
            n_apot += int(mask.sum())
            w = mm.weight.reshape(len(mask), -1)
            got = mm.quantized_weight().reshape(len(mask), -1)
            # each channel is exactly its grid's value: APoT channels equal the APoT model's, the rest the uniform
            assert torch.equal(got[mask], ma.quantized_weight().reshape(len(mask), -1)[mask])
            assert torch.equal(got[~mask], mu.quantized_weight().reshape(len(mask), -1)[~mask])
            err = (got - w).pow(2).sum()
            assert err <= (mu.quantized_weight().reshape(len(mask), -1) - w).pow(2).sum() + 1e-9
    assert n_apot > 0
    with torch.no_grad():
        ref = mixed(x)
    with destination(tmp_path / "a") as folder:
        save_artifact(mixed, folder, meta)
    again, saved = load_artifact(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(x), ref)
    assert saved["specs"]["blocks.0.mlp.fc1.weight"]["scheme"] == "mixed"
    export_packed(mixed, meta, tmp_path / "p.safetensors")
    packed, _ = load_packed(tmp_path / "p.safetensors")
    with torch.no_grad():
        assert torch.equal(packed(x), ref)


def test_a_share_puts_that_many_channels_on_apot():
    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8, w_scheme="mixed", w_apot_share=0.25))
    for m in weight_layers(q):
        assert int(m.w_quant.apot_mask.sum()) == round(0.25 * m.weight.shape[0])
