import numpy as np
import onnx
import onnxruntime as ort
import torch

from vitq.export.onnx import _module_path, export_onnx
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


def test_non_8bit_layers_stay_float_and_say_why(tmp_path):
    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8, rules=[LayerRule("blocks.0.mlp.fc1", a_bits=6)]))
    rep = export_onnx(q, (3, size, size), tmp_path / "m.onnx")
    fc1 = next(r for r in rep.layers if r["layer"] == "blocks.0.mlp.fc1")
    assert not fc1["integer"] and "input 6-bit" in fc1["reason"]
    assert _run(tmp_path / "m.onnx", x).shape == (4, 1000)


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
    from vitq.export.onnx import _export_copy

    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8))
    e = _export_copy(q)

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
        assert (a[name] - b[name]).abs().max().item() < 1e-3 * scale, name
    assert torch.allclose(la, lb, atol=1e-4)
