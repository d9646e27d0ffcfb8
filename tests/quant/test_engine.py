"""Engine coverage on tiny random-init models of every family: every Linear, Conv and matmul quantized
exactly once, in both protocols, with the expected number of quantized tensors."""
import copy

import pytest
import torch
from torch import nn

from vitq.quant import LayerRule, QuantConfig, calibrate, model_stats, prepare, quantize, tensor_table
from vitq.quant.config import ConfigError
from vitq.quant.engine import all_quantizers, left_in_float, set_quant_enabled
from vitq.quant.layers import QuantConv2d, QuantLinear, QuantMatMul

from conftest import tiny_images, tiny_model, tiny_vit_with_massive_position

FAMILIES = ["vit", "deit", "swin", "efficientvit", "cnn"]


def _counts(model):
    lin = sum(isinstance(m, nn.Linear) for m in model.modules())
    conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    return lin, conv


def _n_attention(model, family):
    from timm.layers.attention import Attention
    from timm.models.efficientvit_mit import LiteMLA
    from timm.models.swin_transformer import WindowAttention
    kind = {"vit": Attention, "deit": Attention, "swin": WindowAttention, "efficientvit": LiteMLA}.get(family)
    return 0 if kind is None else sum(isinstance(m, kind) for m in model.modules())


def _extra_full(model, family):
    """Tensors the full protocol adds, counted from the float model's structure."""
    from timm.models.efficientvit_mit import ResidualBlock
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
    from timm.models.vision_transformer import Block
    count = lambda t: sum(isinstance(m, t) for m in model.modules())  # noqa: E731
    if family in ("vit", "deit"):
        # per block: 4 residual inputs + softmax input + GELU input; plus the final norm
        return count(Block) * 6 + 1
    if family == "swin":
        return count(SwinTransformerBlock) * 6 + count(PatchMerging) + 1
    if family == "efficientvit":
        res = sum(isinstance(m, ResidualBlock) and m.shortcut is not None for m in model.modules())
        acts = count((nn.Hardswish, nn.ReLU, nn.LayerNorm)) - _n_attention(model, family)  # not LiteMLA's kernel ReLU
        return 2 * res + 2 * _n_attention(model, family) + acts
    skips = sum(isinstance(m, (DepthwiseSeparableConv, InvertedResidual)) and m.has_skip for m in model.modules())
    return 2 * skips + count(nn.ReLU6)


@pytest.mark.parametrize("protocol", ["standard", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_quantized_exactly_once(family, protocol):
    model, size = tiny_model(family)
    lin, conv = _counts(model)
    n_att = _n_attention(model, family)
    cfg = QuantConfig(protocol=protocol)
    q = prepare(model, cfg)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == lin
    assert sum(isinstance(m, QuantConv2d) for m in q.modules()) == conv
    assert sum(isinstance(m, QuantMatMul) for m in q.modules()) == 2 * n_att
    expected = 2 * (lin + conv) + 4 * n_att + (_extra_full(model, family) if protocol == "full" else 0)
    assert len(all_quantizers(q)) == expected
    x = tiny_images(size)
    calibrate(q, cfg, x, progress=False)
    with torch.inference_mode():
        q(x)
    for t in all_quantizers(q):
        if t.is_weight:
            continue
        # every activation quantizer ran exactly once per forward (no double wrapping, none skipped)
        assert t.calls == 1, t.name
    names = [t.name for t in all_quantizers(q)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("family", FAMILIES)
def test_prepared_model_with_quantizers_off_equals_float(family):
    model, size = tiny_model(family)
    x = tiny_images(size)
    q = prepare(model, QuantConfig(protocol="full"))
    with torch.inference_mode():
        ref, out = model(x), q(x)
    # float-exact rewrites only (unfused attention, folded BatchNorm)
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_close_to_float(family):
    model, size = tiny_model(family)
    x = tiny_images(size, n=8)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8))
    with torch.inference_mode():
        ref, out = model(x), q(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1, rel
    q4 = quantize(model, x, QuantConfig(w_bits=4, a_bits=4))
    with torch.inference_mode():
        rel4 = (q4(x) - ref).norm() / ref.norm()
    assert rel4 > rel  # fewer bits, more error: the quantizers really act


def test_quantize_does_not_touch_the_float_model():
    model, size = tiny_model("deit")
    before = copy.deepcopy(model.state_dict())
    quantize(model, tiny_images(size), QuantConfig(w_bits=4, a_bits=4))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_rules_give_layers_their_own_bits_and_scheme():
    model, size = tiny_model("deit")
    cfg = QuantConfig(w_bits=4, a_bits=6, rules=[LayerRule("blocks.1.mlp.*", w_bits=8, a_bits=8),
                                                  LayerRule("head", w_scheme="pot")])
    q = quantize(model, tiny_images(size), cfg)
    rows = {r.name: r for r in tensor_table(q)}
    assert rows["blocks.1.mlp.fc1.weight"].bits == 8 and rows["blocks.1.mlp.fc1.input"].bits == 8
    assert rows["blocks.0.mlp.fc1.weight"].bits == 4 and rows["blocks.0.attn.matmul_qk.q"].bits == 6
    assert rows["head.weight"].scheme == "pot"
    assert rows["patch_embed.proj.input"].bits == 8  # image input stays at 8 bits
    w = q.head.quantized_weight()
    mags = w.abs()[w != 0]
    assert torch.equal(torch.log2(mags), torch.round(torch.log2(mags)))


def test_per_group_weights():
    model, size = tiny_model("deit")
    q = quantize(model, tiny_images(size), QuantConfig(w_bits=4, w_granularity="per_group", group_size=16))
    lin = q.blocks[0].mlp.fc1
    assert lin.w_quant.scale.numel() == lin.weight.numel() // 16


def test_stats_average_bits_and_size():
    model, size = tiny_model("deit")
    cfg = QuantConfig(w_bits=4, a_bits=8, rules=[LayerRule("head", w_bits=8)])
    q = quantize(model, tiny_images(size), cfg)
    st = model_stats(q)
    head_n = q.head.weight.numel()
    total = sum(m.weight.numel() for m in q.modules() if isinstance(m, (QuantLinear, QuantConv2d)))
    assert abs(st["avg_w_bits"] - (4 * (total - head_n) + 8 * head_n) / total) < 1e-9
    assert st["avg_a_bits"] == 8.0 and st["size_bytes"] < st["fp32_size_bytes"] / 3
    assert st["bops"] > 0 and st["macs"] > 0


def test_clear_errors():
    model, size = tiny_model("deit")
    with pytest.raises(ConfigError, match="nothing.here"):
        prepare(model, QuantConfig(rules=[LayerRule("nothing.here", w_bits=4)]))
    with pytest.raises(ValueError, match="calibration set is empty"):
        cfg = QuantConfig()
        calibrate(prepare(model, cfg), cfg, [], progress=False)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        prepare(bad, QuantConfig())


def test_calibration_is_deterministic():
    model, size = tiny_model("swin")
    x = tiny_images(size, n=4)
    cfg = QuantConfig(w_bits=4, a_bits=4, observer="mse")
    a, b = quantize(model, x, cfg), quantize(model, x, cfg)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))


def test_switching_quantization_off_restores_float():
    model, size = tiny_model("vit")
    x = tiny_images(size)
    q = quantize(model, x, QuantConfig(w_bits=4, a_bits=4))
    set_quant_enabled(q, False)
    with torch.inference_mode():
        assert torch.allclose(q(x), model(x), atol=1e-5)


def test_full_protocol_residual_stream_uses_ptf_and_can_be_turned_off():
    model, size = tiny_model("vit")
    x = tiny_images(size)
    with torch.no_grad():
        model.pos_embed[..., 3] += 200.0  # a massive channel in the residual stream, as in ViT-Tiny
    ptf = quantize(model, x, QuantConfig(protocol="full"))
    flat = quantize(model, x, QuantConfig(protocol="full", residual_ptf=False))
    grans = {r.name: r.granularity for r in tensor_table(ptf)}
    assert grans["blocks.0.residual1.x"] == "ptf" and grans["norm.input"] == "ptf"
    assert grans["blocks.0.attn.qkv.input"] == "per_tensor"
    with torch.inference_mode():
        stream = model._pos_embed(model.patch_embed(x))  # what blocks.0.residual1.x quantizes
        normal = torch.arange(stream.shape[-1]) != 3  # the channels next to the massive one
        err_ptf = (ptf.blocks[0].residual1.x_quant.fake_quant(stream) - stream)[..., normal].norm()
        err_flat = (flat.blocks[0].residual1.x_quant.fake_quant(stream) - stream)[..., normal].norm()
    assert err_ptf < err_flat / 10  # per tensor, the big channel's range swamps the others


def test_token_shifts_give_massive_positions_their_own_factor():
    model, x = tiny_vit_with_massive_position(n=8)
    plain = quantize(model, x, QuantConfig(protocol="full", residual_token_shift=False))
    shifted = quantize(model, x, QuantConfig(protocol="full"))  # on by default since rule R20
    q = shifted.blocks[0].residual1.x_quant
    assert q.token_shift.shape == (model.pos_embed.shape[1],)
    assert q.token_shift[2] > 0 and int((q.token_shift > 0).sum()) == 1
    assert "token_shift" not in plain.blocks[0].residual1.x_quant._buffers
    grans = {r.name: r.granularity for r in tensor_table(shifted)}  # the report's table says which grids
    assert grans["blocks.0.residual1.x"] == "ptf+token" and grans["blocks.0.attn.qkv.input"] == "per_tensor"
    assert {r.granularity for r in tensor_table(plain)} & {"ptf+token"} == set()
    with torch.inference_mode():
        stream = model._pos_embed(model.patch_embed(x))
        others = torch.arange(stream.shape[1]) != 2
        err_plain = (plain.blocks[0].residual1.x_quant.fake_quant(stream) - stream)[:, others].norm()
        err_shift = (q.fake_quant(stream) - stream)[:, others].norm()
        # the massive position itself is still represented, on its coarser grid
        assert (q.fake_quant(stream)[:, 2, 3] - stream[:, 2, 3]).abs().max() < 300.0 / 2**q.spec.bits * 2
    assert err_shift < err_plain / 4  # the other positions no longer share the massive position's range
    with pytest.raises(ValueError, match="positions"):
        q.fake_quant(stream[:, :-1])


@pytest.mark.parametrize("kw", [dict(protocol="standard"), dict(protocol="full", residual_ptf=False)])
def test_token_shifts_apply_to_ptf_grids_only(kw):
    model, x = tiny_vit_with_massive_position(n=4)
    q = quantize(model, x, QuantConfig(residual_token_shift=True, **kw))
    assert not any("token_shift" in t._buffers for t in all_quantizers(q))


def test_left_in_float_switches_off_and_restores_modes_even_on_error():
    model, size = tiny_model("deit")
    x = tiny_images(size)
    q = quantize(model, x, QuantConfig(w_bits=4, a_bits=4))
    acts = [t for t in all_quantizers(q) if not t.is_weight]
    acts[0].mode = "off"  # one already off stays off afterwards
    before = [t.mode for t in all_quantizers(q)]
    with torch.inference_mode():
        quantized = q(x)
        with left_in_float(acts):
            assert all(t.mode == "off" for t in acts)
            assert not torch.equal(q(x), quantized)
    with pytest.raises(RuntimeError):
        with left_in_float(acts):
            raise RuntimeError("boom")
    assert [t.mode for t in all_quantizers(q)] == before


def _massive_gelu_input(model: nn.Module, position: int = 2, channel: int = 0, value: float = 300.0) -> None:
    """Make block 0's GELU input (fc1's output) massive at one token position, as in ViT-Tiny's block 7."""
    def hook(mod, args, out):
        out = out.clone()
        out[:, position, channel] += value
        return out

    model.blocks[0].mlp.fc1.register_forward_hook(hook)


def test_gelu_token_shifts_give_a_massive_gelu_position_its_own_factor():
    model, size = tiny_model("vit")
    x = tiny_images(size, n=8)
    _massive_gelu_input(model)
    plain = quantize(model, x, QuantConfig(protocol="full", a_bits=6))
    shifted = quantize(model, x, QuantConfig(protocol="full", a_bits=6, gelu_token_shift=True))
    q = shifted.blocks[0].mlp.act.in_quant
    assert q.token_shift.shape == (model.pos_embed.shape[1],)
    assert q.token_shift[2] > 0 and int((q.token_shift > 0).sum()) == 1
    assert "token_shift" not in plain.blocks[0].mlp.act.in_quant._buffers
    grans = {r.name: r.granularity for r in tensor_table(shifted)}
    assert grans["blocks.0.mlp.act.input"] == "per_tensor+token"
    assert grans["blocks.1.mlp.act.input"] == "per_tensor"  # no massive position there: no buffer
    hidden = []
    h = model.blocks[0].mlp.fc1.register_forward_hook(lambda m, a, out: hidden.append(out))
    with torch.inference_mode():
        model(x)
    h.remove()
    g = hidden[0]
    others = torch.arange(g.shape[1]) != 2
    with torch.inference_mode():
        err_plain = (plain.blocks[0].mlp.act.in_quant.fake_quant(g) - g)[:, others].norm()
        err_shift = (q.fake_quant(g) - g)[:, others].norm()
        # the massive value is still represented, on its position's coarser grid
        assert (q.fake_quant(g)[:, 2, 0] - g[:, 2, 0]).abs().max() < 2 * q.scale * 2 ** q.token_shift[2]
    assert err_shift < err_plain / 4
    with pytest.raises(ValueError, match="positions"):
        q.fake_quant(g[:, :-1])


@pytest.mark.parametrize("kw", [dict(protocol="standard"), dict(protocol="full", gelu_token_shift=False)])
def test_gelu_token_shifts_only_with_the_option_in_the_full_protocol(kw):
    model, size = tiny_model("vit")
    x = tiny_images(size)
    _massive_gelu_input(model)
    q = quantize(model, x, QuantConfig(residual_token_shift=False, **{"gelu_token_shift": True, **kw}))
    assert not any("token_shift" in t._buffers for t in all_quantizers(q))
