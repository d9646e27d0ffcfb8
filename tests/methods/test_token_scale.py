import copy

import pytest
import torch

from vitq.export.onnx import export_onnx
from vitq.export.packed import export_packed, load_packed
from vitq.methods import optm
from vitq.methods.gptq import input_hessians
from vitq.methods.mptq import MethodOptions, run_pipeline
from vitq.methods.token_scale import BUFFER, apply_token_scale, attach_token_scale, flagged_positions
from vitq.quant import QuantConfig, quantize
from vitq.quant.engine import weight_layers

from conftest import TINY, tiny_images, tiny_model


def _massive_gelu(model, position: int = 3, channel: int = 5, factor: float = 200.0):
    """Make block 0's post-GELU values massive at one token position and channel (as ViT-Tiny's block 7)."""
    def hook(mod, args, out):
        out = out.clone()
        out[:, position, channel] = out[:, position, channel].abs() * factor + factor
        return out

    model.blocks[0].mlp.act.register_forward_hook(hook)
    return model


def _shift(n: int, positions: dict[int, int]) -> torch.Tensor:
    s = torch.zeros(n)
    for p, b in positions.items():
        s[p] = b
    return s


def test_scaling_is_exact_in_float_with_and_without_bias():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=3)
    with torch.inference_mode():
        ref = model(x)
    tokens = model.patch_embed.num_patches + 1
    scaled = copy.deepcopy(model)
    attach_token_scale(scaled.blocks[0].mlp.fc2, _shift(tokens, {0: 3, 5: 6}))
    scaled.blocks[1].mlp.fc2.bias = None
    model.blocks[1].mlp.fc2.bias = None
    attach_token_scale(scaled.blocks[1].mlp.fc2, _shift(tokens, {2: 1}))
    with torch.inference_mode():
        ref = model(x)
        assert torch.allclose(scaled(x), ref, atol=1e-5)
    assert not torch.equal(scaled.blocks[0].mlp.fc2.token_scale_shift, torch.zeros(tokens))


def test_other_token_count_is_refused_naming_the_layer():
    model, _ = tiny_model("deit")
    fc2 = model.blocks[0].mlp.fc2
    attach_token_scale(fc2, torch.zeros(17))
    with pytest.raises(ValueError, match="calibrated for 17 token positions"):
        fc2(torch.randn(1, 18, fc2.in_features))


def test_search_scales_only_the_massive_position_and_lowers_its_error():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=4)
    clean = apply_token_scale(copy.deepcopy(model), x, QuantConfig(w_bits=4, a_bits=4), progress=False)
    assert clean.layers == []  # nothing massive in a random-init model: nothing flagged, nothing attached
    _massive_gelu(model)
    with torch.inference_mode():
        ref = model(x)
    res = apply_token_scale(model, x, QuantConfig(w_bits=4, a_bits=4), progress=False)
    assert [(la.name, la.positions) for la in res.layers] == [("blocks.0.mlp.fc2", [3])]
    layer = res.layers[0]
    assert layer.shift > 0 and layer.mse_scaled < layer.mse_before
    assert getattr(model.blocks[0].mlp.fc2, BUFFER)[3] == layer.shift
    assert getattr(model.blocks[1].mlp.fc2, BUFFER, None) is None
    with torch.inference_mode():
        assert torch.allclose(model(x), ref, rtol=1e-4, atol=1e-3)  # float model unchanged (values ~1e3)


def test_flagged_positions_threshold():
    x = torch.ones(2, 10, 4)
    x[:, 7, 1] = 8.5  # more than 8 times the median position's largest magnitude (1)
    x[:, 2, 0] = 7.9  # within it
    assert flagged_positions(x).nonzero().flatten().tolist() == [7]


def test_gptq_and_optm_see_the_true_input_scale():
    """GPTQ's Hessian and OPT-m's output objective undo the factor: the same as without scaling."""
    model, size = tiny_model("deit")
    x = tiny_images(size, n=2)
    cfg = QuantConfig(w_bits=8, a_bits=8)
    plain = quantize(copy.deepcopy(model), x, cfg)
    tokens = model.patch_embed.num_patches + 1
    attach_token_scale(model.blocks[0].mlp.fc2, _shift(tokens, {1: 4}))
    scaled = quantize(model, x, cfg)
    fc2_plain = {m.layer_name: m for m in weight_layers(plain)}["blocks.0.mlp.fc2"]
    fc2 = {m.layer_name: m for m in weight_layers(scaled)}["blocks.0.mlp.fc2"]
    with torch.inference_mode():  # input_hessians runs the model as it is: quantizers off, float inputs
        for q in (plain, scaled):
            for t in q.modules():
                if hasattr(t, "is_weight"):
                    t.mode = "off"
        hp, n_p = input_hessians(plain, x, [fc2_plain], set())[id(fc2_plain)]
        hs, n_s = input_hessians(scaled, x, [fc2], set())[id(fc2)]
    assert n_p == n_s and torch.allclose(hp, hs, rtol=1e-5, atol=1e-5)
    found = optm._capture(scaled, x, max_rows=10_000)
    rows, out_fn = found[id(fc2.in_quant)]
    true_in = optm._capture(plain, x, max_rows=10_000)[id(fc2_plain.in_quant)][0]
    assert not torch.allclose(rows, true_in)  # the quantizer sees divided rows ...
    assert torch.allclose(out_fn(rows), true_in @ fc2.weight.detach().T, atol=1e-4)  # ... scored at true scale


def test_pipeline_option_and_packed_round_trip_and_onnx(tmp_path):
    import numpy as np
    import onnxruntime as ort

    model, size = tiny_model("deit")
    x = tiny_images(size, n=4)
    _massive_gelu(model)
    res = run_pipeline(model, x, QuantConfig(w_bits=8, a_bits=8), MethodOptions(sq_b=True, opt_m=True,
                                                                                token_scale=True))
    assert [la["name"] for la in res.token_scale] == ["blocks.0.mlp.fc2"] and "token_scale_s" in res.timing
    assert run_pipeline(model, x, QuantConfig(w_bits=8, a_bits=8), MethodOptions()).token_scale is None
    # a clean model with a scaled fc2 (the GELU hook above is not part of an artifact)
    clean, _ = tiny_model("deit")
    tokens = clean.patch_embed.num_patches + 1
    attach_token_scale(clean.blocks[1].mlp.fc2, _shift(tokens, {4: 5}))
    q = quantize(clean, x, QuantConfig(w_bits=8, a_bits=8))
    meta = {"model": "deit_tiny_patch16_224.fb_in1k", "model_kwargs": TINY["deit"][1]}
    export_packed(q, meta, tmp_path / "m.safetensors")
    r, _ = load_packed(tmp_path / "m.safetensors")
    with torch.inference_mode():
        assert torch.equal(q(x), r(x))
    export_onnx(q, (3, size, size), tmp_path / "m.onnx")
    out = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})[0]
    with torch.inference_mode():
        assert np.corrcoef(out.ravel(), q(x).numpy().ravel())[0, 1] > 0.99
