import copy

import pytest
import torch

from vitq.adapters import adapter_for
from vitq.artifact import load_artifact, save_artifact
from vitq.output import destination
from vitq.export.onnx import export_onnx
from vitq.export.packed import export_packed, load_packed
from vitq.methods.mptq import MethodOptions, run_pipeline
from vitq.methods.rotation import (apply_rotation, attach_input_rotation, block_size, fold_qk_rotation,
                                   fold_v_rotation, hadamard_transform, random_signs, rotation_matrix)
from vitq.quant import QuantConfig, quantize

from conftest import TINY, tiny_images, tiny_model


def test_transform_is_the_signed_block_hadamard_matrix():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    h4 = torch.kron(h2, h2) / 2  # Sylvester's H_4, normalized
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0])
    expected = torch.diag(signs) @ torch.block_diag(h4, h4)
    assert torch.allclose(rotation_matrix(signs, 4), expected, atol=1e-6)
    r = rotation_matrix(random_signs(96, 3), block_size(96))
    assert block_size(96) == 32 and block_size(768) == 256
    assert torch.allclose(r @ r.T, torch.eye(96), atol=1e-5)  # orthogonal
    x = torch.randn(2, 5, 96)
    assert torch.allclose(hadamard_transform(x, random_signs(96, 3), 32), x @ r, atol=1e-5)
    with pytest.raises(ValueError, match="block 24"):
        hadamard_transform(x, random_signs(96, 3), 24)


def test_transform_is_bit_identical_to_the_explicit_transposes():
    # Session 29 rewrote the transform for speed; every model built before must come out the same, so it
    # must equal the earlier formula (explicit transposes, division at the end) bit for bit.
    import math

    from vitq.methods.rotation import _sylvester

    def reference(x, signs, block):
        k = block.bit_length() - 1
        rows, cols = 1 << (k // 2), 1 << (k - k // 2)
        y = (x * signs).reshape(-1, cols) @ _sylvester(cols)
        y = y.reshape(-1, rows, cols).transpose(1, 2).reshape(-1, rows) @ _sylvester(rows)
        return y.reshape(-1, cols, rows).transpose(1, 2).reshape(x.shape) / math.sqrt(block)

    g = torch.Generator().manual_seed(0)
    for shape, block in (((4, 197, 768), 256), ((3, 50, 192), 64), ((2, 3, 50, 64), 64), ((2, 50, 96), 32),
                         ((5, 128), 128), ((7, 16), 16)):
        x = torch.nn.functional.gelu(torch.randn(*shape, generator=g) * 3)
        signs = random_signs(shape[-1], 1)
        assert torch.equal(hadamard_transform(x, signs, block), reference(x, signs, block)), (shape, block)


def test_folds_are_exact_in_float():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=4)
    rotated = copy.deepcopy(model)
    for k, blk in enumerate(rotated.blocks):
        fc2 = blk.mlp.fc2
        attach_input_rotation(fc2, random_signs(fc2.in_features, k), block_size(fc2.in_features))
        dim = blk.attn.qkv.weight.shape[0] // 3
        fold_v_rotation(blk.attn, random_signs(dim, 10 + k), block_size(dim // blk.attn.num_heads))
        fold_qk_rotation(blk.attn, random_signs(dim, 20 + k), block_size(dim // blk.attn.num_heads))
    with torch.inference_mode():
        assert (rotated(x) - model(x)).abs().max() < 1e-4
    assert not torch.equal(rotated.blocks[0].mlp.fc2.weight, model.blocks[0].mlp.fc2.weight)
    dim = model.blocks[0].attn.qkv.weight.shape[0] // 3
    for part in (slice(0, dim), slice(dim, 2 * dim)):  # q and k rows rotated, not only v's
        assert not torch.equal(rotated.blocks[0].attn.qkv.weight[part], model.blocks[0].attn.qkv.weight[part])
    assert not torch.equal(rotated.blocks[0].attn.proj.weight, model.blocks[0].attn.proj.weight)


def _with_outlier_channel(model):
    """Give block 0's fc1 one large output channel, so fc2's post-GELU input has an outlier channel."""
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[3] *= 40
        model.blocks[0].mlp.fc1.bias[3] += 20
    return model


def test_qk_rotation_is_searched_only_when_asked_and_only_where_it_lowers_the_logit_error():
    model, size = tiny_model("deit")
    with torch.no_grad():  # one large q channel and one large k channel in block 0 (per-tensor grids suffer)
        dim = model.blocks[0].attn.qkv.weight.shape[0] // 3
        model.blocks[0].attn.qkv.weight[2] *= 30
        model.blocks[0].attn.qkv.weight[dim + 2] *= 30
    x = tiny_images(size, n=4)
    default = apply_rotation(copy.deepcopy(model), x, QuantConfig(w_bits=4, a_bits=4), progress=False)
    assert {la.kind for la in default.layers} == {"fc2", "v/proj"}
    rotated = copy.deepcopy(model)
    res = apply_rotation(rotated, x, QuantConfig(w_bits=4, a_bits=4), progress=False, parts=("qk",))
    assert [la.kind for la in res.layers] == ["q/k"] * len(model.blocks)
    for layer in res.layers:
        assert layer.rotated == (layer.mse_rotated < layer.mse_before)
    assert res.layers[0].rotated and res.layers[0].mse_rotated < 0.5 * res.layers[0].mse_before
    for blk, ref, layer in zip(rotated.blocks, model.blocks, res.layers):
        assert torch.equal(blk.attn.qkv.weight[2 * dim:], ref.attn.qkv.weight[2 * dim:])  # v untouched
        assert torch.equal(blk.attn.qkv.weight, ref.attn.qkv.weight) != layer.rotated
        assert torch.equal(blk.attn.proj.weight, ref.attn.proj.weight)
    with torch.inference_mode():
        assert (rotated(x) - model(x)).abs().max() < 1e-3 * model(x).abs().max()
    # adding q/k leaves the fc2 and v/proj choices (and their signs) as they were
    both = apply_rotation(copy.deepcopy(model), x, QuantConfig(w_bits=4, a_bits=4), progress=False,
                          parts=("fc2", "v", "qk"))
    assert [vars(la) for la in both.layers[: len(default.layers)]] == [vars(la) for la in default.layers]
    with pytest.raises(ValueError, match="unknown rotation part"):
        apply_rotation(copy.deepcopy(model), x, QuantConfig(), parts=("kq",))


def test_search_keeps_a_rotation_only_where_it_lowers_the_error():
    model, size = tiny_model("deit")
    model = _with_outlier_channel(model)
    x = tiny_images(size, n=4)
    rotated = copy.deepcopy(model)
    res = apply_rotation(rotated, x, QuantConfig(w_bits=4, a_bits=4), progress=False)
    assert len(res.layers) == 2 * len(model.blocks)  # each block's fc2 and v/proj
    for layer in res.layers:
        assert layer.rotated == (layer.mse_rotated < layer.mse_before)
    assert any(la.rotated for la in res.layers) and any(la.rotated and la.kind == "fc2" for la in res.layers)
    for layer in res.layers:  # a kept fc2 rotation runs online
        if layer.rotated and layer.kind == "fc2":
            assert hasattr(dict(rotated.named_modules())[layer.name], "hadamard_signs")
    for layer in res.layers:  # layers the search left alone keep their weights
        if not layer.rotated and layer.kind == "fc2":
            assert not hasattr(dict(rotated.named_modules())[layer.name], "hadamard_signs")
    with torch.inference_mode():
        assert (rotated(x) - model(x)).abs().max() < 1e-3 * model(x).abs().max()
    again = copy.deepcopy(model)
    apply_rotation(again, x, QuantConfig(w_bits=4, a_bits=4), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), rotated.parameters()))  # deterministic


@pytest.mark.parametrize("protocol", ["standard", "full"])
def test_rotated_pipeline_survives_save_and_reload(tmp_path, protocol):
    model, size = tiny_model("deit")
    model = _with_outlier_channel(model)
    x = tiny_images(size, n=4)
    cfg = QuantConfig(w_bits=4, a_bits=4, protocol=protocol, observer="mse")
    res = run_pipeline(model, x, cfg, MethodOptions(sq_b=True, opt_m=True, gptq=True, rotate=True))
    assert res.rotation and any(layer["rotated"] for layer in res.rotation)
    assert "rotation_s" in res.timing
    q = res.model
    meta = {"model": "deit_tiny_patch16_224.fb_in1k", "model_kwargs": TINY["deit"][1]}
    with destination(tmp_path / "a") as folder:
        save_artifact(q, folder, meta)
    r, _ = load_artifact(tmp_path / "a")
    with torch.inference_mode():
        assert torch.equal(q(x), r(x))


def test_swin_fc2_rotations_are_exact():
    model, size = tiny_model("swin")
    x = tiny_images(size, n=2)
    rotated = copy.deepcopy(model)
    res = apply_rotation(rotated, x, QuantConfig(w_bits=4, a_bits=4), progress=False)
    assert len([la for la in res.layers if la.kind == "fc2"]) == len(adapter_for(model).post_gelu_linears(model))
    with torch.inference_mode():
        assert (rotated(x) - model(x)).abs().max() < 1e-3 * model(x).abs().max()


def _rotated_w8a8():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=4)
    for k, blk in enumerate(model.blocks):  # every fc2 rotated online, every v/proj folded
        fc2 = blk.mlp.fc2
        attach_input_rotation(fc2, random_signs(fc2.in_features, k), block_size(fc2.in_features))
        dim = blk.attn.qkv.weight.shape[0] // 3
        fold_v_rotation(blk.attn, random_signs(dim, 10 + k), block_size(dim // blk.attn.num_heads))
    return quantize(model, x, QuantConfig(w_bits=8, a_bits=8)), x, size


def test_rotated_model_exports_to_onnx_and_packed(tmp_path):
    import numpy as np
    import onnxruntime as ort

    q, x, size = _rotated_w8a8()
    rep = export_onnx(q, (3, size, size), tmp_path / "m.onnx")
    rows = {r["layer"]: r for r in rep.layers}
    assert rows["blocks.0.mlp.fc2"]["integer"]  # the rotation runs in float before fc2's QDQ pair
    out = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})[0]
    with torch.inference_mode():
        ref = q(x).numpy()
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99
    meta = {"model": "deit_tiny_patch16_224.fb_in1k", "model_kwargs": TINY["deit"][1]}
    export_packed(q, meta, tmp_path / "m.safetensors")
    r, _ = load_packed(tmp_path / "m.safetensors")
    with torch.inference_mode():
        assert torch.equal(q(x), r(x))
