import numpy as np
import onnx
import pytest
import onnxruntime as ort
import torch

from vitq.export.onnx import export_onnx
from vitq.export.onnx_graph import module_path as _module_path
from vitq.quant import QuantConfig
from vitq.quant.config import LayerRule
from vitq.quant.engine import quantize

from conftest import tiny_images, tiny_model


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"images": x.numpy()})[0]


def test_module_path_from_scope_names():
    assert _module_path("/blocks/blocks.0/attn/qkv/MatMul") == "blocks.0.attn.qkv"
    assert _module_path("/stages/stages.1/blocks/blocks.2/main/conv/Conv") == "stages.1.blocks.2.main.conv"
    assert _module_path("/head/MatMul") == "head"


def test_w8a8_export_is_valid_runs_integer_kernels_and_matches_the_simulation(tmp_path):
    model, size = tiny_model("deit")
    x = tiny_images(size, 8)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8))
    f = tmp_path / "m.onnx"
    rep = export_onnx(q, (3, size, size), f)
    onnx.checker.check_model(str(f))
    rows = {r["layer"]: r for r in rep.layers}
    assert rows["blocks.0.attn.qkv"]["integer"] and rows["blocks.1.mlp.fc2"]["integer"]
    assert rep.integer_ops.get("MatMulIntegerToFloat", 0) >= 8
    out = _run(f, x)
    with torch.inference_mode():
        ref = q(x).numpy()
    # same grids, same scales; only rounding of x / s versus x * (1 / s) and summation order differ
    assert np.abs(out - ref).max() < 0.15 * np.abs(ref).max()
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99


def test_low_bit_activations_are_written_exactly_on_int8_kernels(tmp_path):
    # a 6-bit input grid is a clipped subset of uint8: the codes, and so the logits, are the simulation's
    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8, rules=[LayerRule("blocks.0.mlp.fc1", a_bits=6)]))
    rep = export_onnx(q, (3, size, size), tmp_path / "m.onnx", check_images=x)
    fc1 = next(r for r in rep.layers if r["layer"] == "blocks.0.mlp.fc1")
    assert fc1["integer"] and fc1["exact"]
    _assert_export_graph_is_the_simulation(q, x)
    with torch.inference_mode():
        top = q(x).abs().max().item()
    # ONNX Runtime's integer kernels scale int32 sums where the simulation multiplies dequantized floats: the
    # last-bit differences can move a later code by one step (docs/results.md measures this on eval968)
    assert rep.check["agreement"] == 100.0 and rep.check["max_logit_diff"] < 0.05 * top


def _assert_export_graph_is_the_simulation(q, x, signed=False):
    """The module tree that torch.onnx traces computes the simulation's logits (same codes everywhere)."""
    from vitq.export.qdq_modules import export_copy

    with torch.inference_mode():
        assert torch.allclose(export_copy(q, signed=signed)(x), q(x), atol=1e-5, rtol=0)


def test_w4a4_mptq_export_is_the_scored_model_with_integer_linears(tmp_path):
    import vitq
    from vitq.export.onnx import onnx_metadata

    model, size = tiny_model("deit")
    x = tiny_images(size, 8)
    q = vitq.quantize(model, x, QuantConfig(w_bits=4, a_bits=4), progress=False).model  # rotation, OPT-m, GPTQ
    _assert_export_graph_is_the_simulation(q, x)
    f = tmp_path / "m.onnx"
    rep = export_onnx(q, (3, size, size), f, check_images=x)
    linears = [r for r in rep.layers if r["kind"] == "linear"]
    assert all(r["integer"] for r in linears), [r for r in linears if not r["integer"]]
    with torch.inference_mode():
        ref = q(x).numpy()
    assert np.abs(_run(f, x) - ref).max() < 0.05 * np.abs(ref).max()
    meta = onnx_metadata(f)
    assert meta["vitq_check_agreement"] == "100.00" and meta["vitq_integer_layers"].startswith(str(rep.n_integer))


@pytest.mark.parametrize("m, integer", [(2, True), (6, False)])
def test_two_region_grids_are_written_exactly_and_on_int8_where_their_levels_fit(tmp_path, m, integer):
    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8))
    fc2 = dict(q.named_modules())["blocks.0.mlp.fc2"]
    fc2.in_quant.spec = fc2.in_quant.spec.__class__(bits=4)
    fc2.in_quant.set_two_region(0.05, m, 0.02, signed_fine=True)  # 4 bits: 7 * 2^m coarse levels on the fine step
    _assert_export_graph_is_the_simulation(q, x)
    rep = export_onnx(q, (3, size, size), tmp_path / "m.onnx", check_images=x)
    row = next(r for r in rep.layers if r["layer"] == "blocks.0.mlp.fc2")
    assert row["exact"] and row["integer"] == integer and rep.check["agreement"] == 100.0


def test_a_grid_onnx_cannot_hold_is_refused_by_name_or_listed_when_approximated(tmp_path):
    from dataclasses import replace

    from vitq.export.onnx import ExportError, onnx_metadata

    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8))
    fc1 = dict(q.named_modules())["blocks.0.mlp.fc1"]
    fc1.in_quant.spec = replace(fc1.in_quant.spec, scheme="pot")
    fc1.in_quant.set_range(torch.tensor(-2.0), torch.tensor(2.0))
    f = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"blocks\.0\.mlp\.fc1\.input \(8-bit power-of-two"):
        export_onnx(q, (3, size, size), f)
    assert not f.exists()
    rep = export_onnx(q, (3, size, size), f, allow_approx=True)
    assert rep.approximate == ["blocks.0.mlp.fc1.input"]
    assert not next(r for r in rep.layers if r["layer"] == "blocks.0.mlp.fc1")["exact"]
    assert onnx_metadata(f)["vitq_approximate"] == "blocks.0.mlp.fc1.input"


def test_weights_are_stored_as_codes_and_the_file_is_compact(tmp_path):
    from vitq.export.packed import export_packed

    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8))
    rep = export_onnx(q, (3, size, size), tmp_path / "m.onnx")
    inits = onnx.load(str(tmp_path / "m.onnx")).graph.initializer
    # the patch embedding has no integer kernel in ONNX Runtime: its weight is stored as the float values the
    # codes give (ONNX Runtime runs a float conv faster on a constant weight); the logits do not change
    assert rep.weight_codes == 10 and rep.float_weight_layers == ["patch_embed.proj"]
    assert sum(i.data_type == onnx.TensorProto.INT8 for i in inits) >= 9
    codes_only = export_onnx(q, (3, size, size), tmp_path / "p.onnx", target="portable")
    assert not codes_only.float_weight_layers
    np.testing.assert_array_equal(_run(tmp_path / "m.onnx", x), _run(tmp_path / "p.onnx", x))
    sizes = export_packed(q, {"model": "deit_tiny"}, tmp_path / "m.safetensors")
    # the tensors: no float copy of a weight is left (in a tiny model the graph's own text is a third of the
    # file; docs/results.md compares the real files)
    tensors = sum(len(i.raw_data) for i in onnx.load(str(tmp_path / "p.onnx")).graph.initializer)
    assert tensors <= sizes["file_bytes"], (tensors, sizes["file_bytes"])


def test_portable_target_stores_4bit_weights_as_int4_and_computes_the_same(tmp_path):
    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    q = quantize(model, x, QuantConfig(w_bits=4, a_bits=8))
    a = export_onnx(q, (3, size, size), tmp_path / "ort.onnx")
    b = export_onnx(q, (3, size, size), tmp_path / "portable.onnx", target="portable")
    assert b.int4_layers and b.opset == 21 and b.file_bytes < a.file_bytes
    proto = onnx.load(str(tmp_path / "portable.onnx"))
    assert not any(n.domain == "com.microsoft" for n in proto.graph.node)
    assert any(i.data_type == onnx.TensorProto.INT4 for i in proto.graph.initializer)
    np.testing.assert_allclose(_run(tmp_path / "portable.onnx", x), _run(tmp_path / "ort.onnx", x), atol=1e-4)


def test_narrow_per_channel_weights_ride_in_int8_qdq(tmp_path):
    # A symmetric 4-bit (or 7-bit) per-channel grid is a subset of int8: the QDQ pair holds it exactly,
    # so W4A8 / W7A8 layers run on the same integer kernels as W8A8 ones.
    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8, rules=[LayerRule("blocks.0.mlp.fc1", w_bits=4),
                                                                    LayerRule("blocks.1.mlp.fc1", w_bits=7)]))
    rep = export_onnx(q, (3, size, size), tmp_path / "m.onnx")
    for name in ("blocks.0.mlp.fc1", "blocks.1.mlp.fc1"):
        row = next(r for r in rep.layers if r["layer"] == name)
        assert row["qdq"] and row["integer"], row
    with torch.inference_mode():
        ref = q(x).numpy()
    out = _run(tmp_path / "m.onnx", x)
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99


def test_hybrid_model_exports(tmp_path):
    model, size = tiny_model("efficientvit")
    x = tiny_images(size, 2)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8))
    rep = export_onnx(q, (3, size, size), tmp_path / "m.onnx")
    assert rep.n_integer > 0
    assert np.isfinite(_run(tmp_path / "m.onnx", x)).all()


def test_4bit_group_weights_become_matmul_nbits_with_vitq_codes(tmp_path):
    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    cfg = QuantConfig(w_bits=8, a_bits=8, group_size=16,
                      rules=[LayerRule("blocks.*.mlp.fc*", w_bits=4, w_granularity="per_group"),
                             LayerRule("blocks.0.attn.qkv", w_bits=3, w_granularity="per_group")])
    q = quantize(model, x, cfg)
    f = tmp_path / "m.onnx"
    rep = export_onnx(q, (3, size, size), f)
    assert set(rep.nbits_layers) == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1",
                                     "blocks.1.mlp.fc2", "blocks.0.attn.qkv"}
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(f)).graph.node) == 5
    out = _run(f, x)
    with torch.inference_mode():
        ref = q(x).numpy()
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99


def test_exported_graph_quantizes_exactly_like_the_simulation():
    # The module tree that torch.onnx traces must produce the same activation codes as the simulation;
    # any ONNX-vs-simulation difference then comes from the runtime's float arithmetic, not the export.
    from vitq.export.qdq_modules import export_copy

    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8))
    e = export_copy(q)

    def outputs(m):
        seen = {}
        hooks = [mod.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, o.detach().clone()))
                 for n, mod in m.named_modules() if getattr(mod, "is_weight", True) is False]
        with torch.inference_mode():
            logits = m(x)
        for h in hooks:
            h.remove()
        return seen, logits

    (a, la), (b, lb) = outputs(q), outputs(e)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        scale = float(dict(q.named_modules())[name].scale)
        # same grid values: a flip would differ by a whole step, a missing quantizer by up to half of one
        # (the classifier's input is run as [B, 1, C] in the export: the same values)
        assert (a[name] - b[name].reshape(a[name].shape)).abs().max().item() < 1e-3 * scale, name
    assert torch.allclose(la, lb, atol=1e-4)


def test_tensorrt_target_takes_signed_zero_point_0_grids_only(tmp_path):
    from onnx import numpy_helper

    from vitq.export.onnx import ExportError

    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    asym = quantize(model, x, QuantConfig(w_bits=8, a_bits=8))
    with pytest.raises(ExportError, match="8-bit asymmetric grid with zero point"):
        export_onnx(asym, (3, size, size), tmp_path / "a.onnx", target="tensorrt")
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=6, a_symmetric=True,
                                       rules=[LayerRule("blocks.0.mlp.fc2", a_bits=8)]))
    f = tmp_path / "trt.onnx"
    rep = export_onnx(q, (3, size, size), f, target="tensorrt", check_images=x)
    proto = onnx.load(str(f))
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    consts.update({i.name: numpy_helper.to_array(i) for i in proto.graph.initializer})
    zps = [consts[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)  # signed, zero point 0
    assert rep.check["agreement"] == 100.0 and rep.n_integer >= 8
    # an asymmetric grid of at most 7 bits fits signed int8 with zero point 0 exactly (its codes minus its zero point)
    low = quantize(model, x, QuantConfig(w_bits=8, a_bits=6, first_layer_a_bits=7))
    _assert_export_graph_is_the_simulation(low, x, signed=True)
    assert export_onnx(low, (3, size, size), tmp_path / "low.onnx", target="tensorrt", check_images=x).check[
        "agreement"] == 100.0
