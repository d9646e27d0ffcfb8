import copy
import pytest
import torch

from vitq.methods.gptq import apply_gptq, gptq_quantize
from vitq.methods.mptq import MethodOptions, run_pipeline
from vitq.quant import QuantConfig, calibrate, prepare
from vitq.quant import quantizers as Q
from vitq.quant.engine import weight_layers

from conftest import tiny_images, tiny_model


def _grid(w, bits):
    scale, zp = Q.uniform_params(-w.abs().amax(1), w.abs().amax(1), bits, symmetric=True)
    qmin, qmax = Q.int_range(bits, True)
    return lambda col: Q.fake_quant_uniform(col, scale[:, None], zp[:, None], qmin, qmax)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_round_to_nearest_on_its_objective(act_order):
    g = torch.Generator().manual_seed(0)
    # correlated inputs, as real activations are: that is where spreading the error pays
    x = torch.randn(512, 32, generator=g) @ torch.randn(32, 32, generator=g)
    w = torch.randn(16, 32, generator=g)
    quant = _grid(w, 4)
    qw = gptq_quantize(w.double(), (x.T @ x).double(), quant, act_order=act_order).float()
    rtn = quant(w)
    err = lambda v: (x @ v.T - x @ w.T).pow(2).sum().item()  # noqa: E731
    assert err(qw) < 0.7 * err(rtn)
    assert torch.equal(quant(qw), qw)  # on the grid: fake-quantizing again changes nothing


def test_bias_column_is_kept_in_float_and_absorbs_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g) + 3.0  # a non-zero mean: a bias can compensate part of the error
    w, b = torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    rows = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    quant = _grid(w, 3)
    w_aug = torch.cat([w, b[:, None]], 1).double()
    plain = gptq_quantize(w.double(), (x.T @ x).double(), quant).float()
    fitted = gptq_quantize(w_aug, rows.T @ rows, quant, keep_last=True)
    ref = x @ w.T + b
    err_plain = (x @ plain.T + b - ref).pow(2).sum()
    err_fit = (rows @ fitted.T - ref.double()).pow(2).sum()
    assert err_fit < err_plain
    assert torch.equal(quant(fitted[:, :-1].float()), fitted[:, :-1].float())


@pytest.mark.parametrize("family", ["deit", "swin"])
def test_apply_gptq_lowers_layer_error_and_keeps_weights_on_the_grid(family):
    model, size = tiny_model(family)
    x = tiny_images(size, n=16)
    cfg = QuantConfig(w_bits=4, a_bits=8)
    q = prepare(model, cfg)
    calibrate(q, cfg, x, progress=False)
    res = apply_gptq(q, x, progress=False)
    assert res.layers, "no layer was processed"
    for row in res.layers:
        assert row.err_gptq <= row.err_rtn * 1.0001, row
    done = {row.name for row in res.layers}
    for m in weight_layers(q):
        if m.layer_name not in done:
            continue
        w = m.weight.detach()
        assert torch.allclose(m.w_quant.fake_quant(w), w, atol=1e-6), m.layer_name
    # the head sees one token per image: too few rows for a Hessian, so it keeps round-to-nearest
    assert any(name.startswith("head") for name in res.skipped)


def test_gptq_pipeline_is_deterministic_and_improves_kl():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=32)  # 32 x 17 tokens: enough rows for 32- and 128-wide Hessians
    cfg = QuantConfig(w_bits=3, a_bits=8)
    with torch.inference_mode():
        ref = model(x).log_softmax(-1)

    def kl(m):
        with torch.inference_mode():
            return torch.nn.functional.kl_div(m(x).log_softmax(-1), ref, log_target=True, reduction="batchmean").item()

    a = run_pipeline(model, x, cfg, MethodOptions(gptq=True)).model
    b = run_pipeline(model, x, cfg, MethodOptions(gptq=True)).model
    base = run_pipeline(model, x, cfg, MethodOptions()).model
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
    assert kl(a) < kl(base)


def test_bad_fit_bias_is_named():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=2)
    cfg = QuantConfig(w_bits=4, a_bits=8)
    q = prepare(model, cfg)
    calibrate(q, cfg, x, progress=False)
    with pytest.raises(ValueError, match="fit_bias"):
        apply_gptq(q, x, fit_bias="sometimes", progress=False)


def test_only_layers_up_to_max_bits_are_rerounded():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=16)
    cfg = QuantConfig(w_bits=6, a_bits=8, rules=[{"pattern": "blocks.0.attn.qkv", "w_bits": 4}])
    res = run_pipeline(model, x, cfg, MethodOptions(gptq=True)).gptq  # default: layers of <= 5 weight bits
    assert [row["name"] for row in res["layers"]] == ["blocks.0.attn.qkv"] and res["skipped"] == []


def test_hessian_clip_keeps_a_weight_that_meets_a_huge_input():
    from vitq.methods.gptq import CLIP_RATIOS, hessian_clip
    from vitq.quant.config import TensorSpec
    from vitq.quant.layers import TensorQuantizer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 512, generator=g)
    x[::64, 5] = 200.0  # a rare "massive activation" channel
    w = torch.randn(8, 512, generator=g) * 0.15
    w[3, 5] = 2.5  # the one weight that turns it into a huge output
    h = x.T @ x
    wq = TensorQuantizer("fc", "weight", TensorSpec(bits=4, granularity="per_channel"), is_weight=True)
    wq.calibrate_weight(w, "mse", 99.9)  # the weight-error clip cuts the outlier weight
    assert wq.fake_quant(w)[3, 5] < 2.0
    mse_err = ((wq.fake_quant(w) - w) @ h * (wq.fake_quant(w) - w)).sum()
    lo, hi = hessian_clip(w, h, wq)
    wq.set_range(lo, hi)
    e = wq.fake_quant(w) - w
    assert abs(wq.fake_quant(w)[3, 5] - 2.5) < 0.05  # kept (up to rounding), not clipped
    assert (e @ h * e).sum() < 0.5 * mse_err
    # never worse than the min-max grid (ratio 1.0 is a candidate), row by row
    wq.calibrate_weight(w, "minmax", 99.9)
    e0 = wq.fake_quant(w) - w
    assert CLIP_RATIOS[0] == 1.0
    assert torch.all((e @ h * e).sum(1) <= (e0 @ h * e0).sum(1) * (1 + 1e-5))


def test_gptq_through_the_efficientvit_trunk_equals_whole_model_capture(monkeypatch):
    # staged capture (one block at a time, NHWC between steps) must give the weights that capturing each
    # layer's input from whole-model runs gives
    from vitq.adapters.efficientvit import EfficientViTAdapter

    model, size = tiny_model("efficientvit")
    x = tiny_images(size, n=8)
    cfg = QuantConfig(w_bits=4, a_bits=8)
    q = prepare(model, cfg)
    calibrate(q, cfg, x, progress=False)
    staged, whole = copy.deepcopy(q), copy.deepcopy(q)
    apply_gptq(staged, x, progress=False)
    monkeypatch.setattr(EfficientViTAdapter, "trunk", lambda self, m: None)
    apply_gptq(whole, x, progress=False)
    for a, b in zip(weight_layers(staged), weight_layers(whole)):
        assert torch.allclose(a.weight, b.weight, atol=1e-6), a.layer_name
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(weight_layers(staged), weight_layers(q)))


def test_pipeline_passes_gptq_options(monkeypatch):
    import vitq.methods.mptq as mptq
    seen = {}
    real = mptq.apply_gptq

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mptq, "apply_gptq", spy)
    model, size = tiny_model("deit")
    x = tiny_images(size, n=8)
    run_pipeline(model, x, QuantConfig(w_bits=4, a_bits=8), MethodOptions(gptq=True, gptq_max_bits=4))
    assert seen["max_bits"] == 4
