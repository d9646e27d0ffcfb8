import copy
from dataclasses import replace

import pytest
import torch

from vitq.adapters import adapter_for
from vitq.methods.mptq import MethodOptions, run_pipeline
from vitq.methods.recon import apply_block_recon, stage_loss
from vitq.quant import QuantConfig
from vitq.quant import quantizers as Q
from vitq.quant.config import TensorSpec
from vitq.quant.engine import all_quantizers, weight_layers
from vitq.quant.layers import TensorQuantizer

from conftest import tiny_images, tiny_model, tiny_vit_with_massive_position


def _kl(model, x, ref):
    with torch.inference_mode():
        return torch.nn.functional.kl_div(model(x).log_softmax(-1), ref, log_target=True, reduction="batchmean").item()


def test_ste_quantizers_match_the_plain_ones_and_pass_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 3
    scale, zp = torch.tensor(0.1), torch.tensor(3.0)
    s = scale.clone().requires_grad_(True)
    xi = x.clone().requires_grad_(True)
    y = Q.fake_quant_uniform_ste(xi, s, zp, 0, 15)
    assert torch.allclose(y, Q.fake_quant_uniform(x, scale, zp, 0, 15), atol=1e-6)
    y.sum().backward()
    assert s.grad.abs() > 0
    r = torch.round(x / scale) + zp
    inner, outer = (r > 0) & (r < 15), (r < 0) | (r > 15)  # codes on the edge may go either way
    assert torch.allclose(xi.grad[inner], torch.ones(())) and torch.equal(xi.grad[outer], torch.zeros(int(outer.sum())))
    d = torch.tensor(0.5, requires_grad=True)
    y2 = Q.fake_quant_two_region_ste(x.abs(), d, 3, torch.tensor(0.4), 4)
    assert torch.allclose(y2, Q.fake_quant_two_region(x.abs(), torch.tensor(0.5), 3, torch.tensor(0.4), 4), atol=1e-6)
    y2.sum().backward()
    assert d.grad.abs() > 0


def test_recon_lowers_calibration_kl_keeps_weights_on_grid_and_is_deterministic():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=16)
    with torch.inference_mode():
        ref = model(x).log_softmax(-1)
    cfg = QuantConfig(w_bits=4, a_bits=4, observer="mse")
    base = run_pipeline(model, x, cfg, MethodOptions(sq_b=True, opt_m=True)).model
    keys = set(base.state_dict())
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    res = apply_block_recon(a, model, x, iters=30, progress=False)
    apply_block_recon(b, model, x, iters=30, progress=False)
    assert res.skipped is None and [s.name for s in res.stages][:2] == ["stem", "blocks.0"]
    assert res.stages[-1].name == "head"
    assert _kl(a, x, ref) < _kl(base, x, ref)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) == keys  # learnable copies never reach a state dict
    assert all(p.requires_grad for p in a.parameters())  # restored
    learned = [m for m, m0 in zip(weight_layers(a), weight_layers(base))
               if not torch.equal(m.w_quant.scale, m0.w_quant.scale)]
    assert learned
    for m in learned:  # a learned weight scale rewrites the weight on its new grid (same integers)
        w = m.weight.detach()
        assert torch.allclose(m.w_quant.fake_quant(w), w, atol=1e-5), m.layer_name
    # the classifier (one token per image) keeps its weight scales
    assert torch.equal(a.head.w_quant.scale, base.head.w_quant.scale)


def test_recon_only_at_low_activation_bits_and_named_when_no_trunk():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=8)
    opts = MethodOptions(opt_m=True, recon=True)
    assert run_pipeline(model, x, QuantConfig(w_bits=8, a_bits=8), opts).recon is None
    assert run_pipeline(model, x, QuantConfig(w_bits=6, a_bits=6), opts).recon is not None
    assert run_pipeline(model, x, QuantConfig(w_bits=4, a_bits=4), opts).recon is not None
    assert run_pipeline(model, x, QuantConfig(w_bits=4, a_bits=4), replace(opts, recon_max_bits=3)).recon is None
    cnn, size = tiny_model("cnn")
    q = run_pipeline(cnn, tiny_images(size, n=4), QuantConfig(w_bits=4, a_bits=4), MethodOptions(recon=True))
    assert "trunk" in q.recon["skipped"]


@pytest.mark.parametrize("protocol", ["standard", "full"])
def test_recon_on_swin_steps_through_patch_merging_and_lowers_kl(protocol):
    from timm.models.swin_transformer import PatchMerging

    model, size = tiny_model("swin")
    x = tiny_images(size, n=8)
    stem, steps, head = adapter_for(model).trunk(model)
    with torch.inference_mode():  # the trunk is the model: same logits
        y = stem(x)
        for s in steps:
            y = s(y)
        assert torch.allclose(head(y), model(x), atol=1e-5)
    assert any(isinstance(s, PatchMerging) for s in steps)
    with torch.inference_mode():
        ref = model(x).log_softmax(-1)
    cfg = QuantConfig(w_bits=4, a_bits=4, protocol=protocol)
    base = run_pipeline(model, x, cfg, MethodOptions(opt_m=True)).model
    a = copy.deepcopy(base)
    res = apply_block_recon(a, model, x, iters=20, progress=False)
    assert res.skipped is None and len(res.stages) == len(steps) + 2
    assert any(s.params > 0 for s in res.stages)
    assert _kl(a, x, ref) < _kl(base, x, ref)


@pytest.mark.parametrize("bad", ["weight"])
def test_weight_quantizer_cannot_learn_an_activation_step(bad):
    model, size = tiny_model("deit")
    x = tiny_images(size, n=4)
    q = run_pipeline(model, x, QuantConfig(w_bits=4, a_bits=4), MethodOptions()).model
    with pytest.raises(ValueError, match="cannot learn"):
        q.blocks[0].attn.qkv.w_quant.begin_scale_learning()


def test_qdrop_keeps_the_drawn_fraction_float_only_on_the_gradient_path():
    q = TensorQuantizer("l", "input", TensorSpec(bits=4))
    x = torch.randn(4000, generator=torch.Generator().manual_seed(1))
    q.set_range(x.min(), x.max())
    q.mode = "quant"
    fq = q.fake_quant(x)
    q.drop_prob, q.drop_generator = 0.5, torch.Generator().manual_seed(0)
    y = q(x.clone().requires_grad_(True)).detach()
    is_float, is_quant = y == x, y == fq
    assert bool((is_float | is_quant).all())
    assert 0.45 < (is_float & ~is_quant).float().mean().item() / (x != fq).float().mean().item() < 0.55
    assert torch.equal(q(x), fq)  # evaluation (no gradient) never drops
    q.drop_generator = torch.Generator().manual_seed(0)
    assert torch.equal(q(x.clone().requires_grad_(True)).detach(), y)  # same seed, same draw


def test_recon_with_qdrop_is_deterministic_and_resets_the_drop():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=8)
    cfg = QuantConfig(w_bits=4, a_bits=4, observer="mse")
    base = run_pipeline(model, x, cfg, MethodOptions(opt_m=True)).model
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    apply_block_recon(a, model, x, iters=10, drop_prob=0.5, progress=False)
    apply_block_recon(b, model, x, iters=10, drop_prob=0.5, progress=False)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
    assert all(q.drop_prob == 0 and q.drop_generator is None for q in all_quantizers(a))


def test_recon_learns_the_ptf_base_scale_and_keeps_power_of_two_ratios():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=16)
    # min-max PTF grids to start from (no OPT-m): its PTF search would leave this tiny model's steps little to learn
    cfg, opts = QuantConfig(w_bits=4, a_bits=4, protocol="full"), MethodOptions()
    base = run_pipeline(model, x, cfg, opts).model
    ptf0 = [q for q in all_quantizers(base) if q.spec.granularity == "ptf"]
    assert ptf0 and all(q.scale_learnable for q in ptf0)
    # in the pipeline itself: calibration makes the steps under inference mode, and they must still train
    a = run_pipeline(model, x, cfg, replace(opts, recon=True, recon_iters=30)).model
    # (the random-init tiny model's logits do not move at 4 bits; its residual stream does)
    with torch.inference_mode():
        target = model.forward_features(x)
        assert stage_loss(a.forward_features(x), target) < stage_loss(base.forward_features(x), target)
    ptf = [q for q in all_quantizers(a) if q.spec.granularity == "ptf"]
    moved = 0
    for q, q0 in zip(ptf, ptf0):
        ratio = q.scale / q0.scale  # one multiplier for every channel
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5), q.name
        moved += not torch.allclose(ratio[0], torch.ones(()))
        shifts = torch.log2(q.scale / q.scale.min())
        assert torch.allclose(shifts, shifts.round(), atol=1e-4), q.name  # still power-of-two apart
        assert torch.equal(q.zero_point, q0.zero_point)
        # the clip range follows the scale, and the plain path uses the learned grid
        assert torch.allclose(q.range_max, (Q.int_range(q.spec.bits, False)[1] - q.zero_point) * q.scale)
    assert moved


def test_recon_learns_ptf_steps_through_token_shifts():
    model, x = tiny_vit_with_massive_position(n=8)
    cfg = QuantConfig(w_bits=4, a_bits=4, protocol="full", residual_token_shift=True)
    opts = MethodOptions()
    base = run_pipeline(model, x, cfg, opts).model
    a = run_pipeline(model, x, cfg, replace(opts, recon=True, recon_iters=30)).model
    shifted = [q for q in all_quantizers(a) if "token_shift" in q._buffers]
    assert shifted
    for q in shifted:  # the STE path divides by the same factors as the plain one
        t = torch.randn(3, *q.token_shift.shape, q.scale.numel())
        assert torch.allclose(q._fake_quant_ste(t.requires_grad_()), q.fake_quant(t.detach()), atol=1e-5)
    with torch.inference_mode():
        target = model.forward_features(x)
        assert stage_loss(a.forward_features(x), target) < stage_loss(base.forward_features(x), target)


@pytest.mark.parametrize("bad", [dict(drop_prob=1.0), dict(drop_prob=-0.1), dict(iters=0), dict(batch=0)])
def test_recon_rejects_bad_settings_by_name(bad):
    model, size = tiny_model("deit")
    x = tiny_images(size, n=4)
    q = run_pipeline(model, x, QuantConfig(w_bits=4, a_bits=4), MethodOptions()).model
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        apply_block_recon(q, model, x, progress=False, **bad)


def _tiny_w4_opt_m(n: int):
    """A tiny random-init DeiT, n images, its FP log-probabilities and its W4A4 OPT-m model (no recon)."""
    model, size = tiny_model("deit")
    x = tiny_images(size, n=n)
    with torch.inference_mode():
        ref = model(x).log_softmax(-1)
    base = run_pipeline(model, x, QuantConfig(w_bits=4, a_bits=4, observer="mse"), MethodOptions(opt_m=True)).model
    return model, x, ref, base


@pytest.mark.parametrize("protocol", ["standard", "full"])
def test_recon_on_efficientvit_runs_block_by_block_on_nchw_features(protocol):
    model, size = tiny_model("efficientvit")
    x = tiny_images(size, n=16)
    stem, steps, head = adapter_for(model).trunk(model)
    with torch.inference_mode():  # the trunk is the model, bit for bit (NHWC between steps)
        y = stem(x)
        for s in steps:
            y = s(y)
        assert torch.equal(head(y), model(x))
    assert len(steps) == sum(len(stage.blocks) for stage in model.stages)
    base = run_pipeline(model, x, QuantConfig(w_bits=4, a_bits=4, protocol=protocol), MethodOptions(opt_m=True)).model
    res = apply_block_recon(copy.deepcopy(base), model, x, iters=30, progress=False)
    assert res.skipped is None and len(res.stages) == len(steps) + 2
    assert all(s.params > 0 for s in res.stages[1:-1])
    # the random-init tiny model's logits say little; the per-block objective must fall
    blocks = res.stages[1:-1]
    assert sum(s.loss_after for s in blocks) < sum(s.loss_before for s in blocks)


def test_pipeline_seed_reaches_reconstruction():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=12)
    opts = MethodOptions(sq_b=True, opt_m=True, recon=True, recon_iters=10)
    cfg = QuantConfig(w_bits=4, a_bits=4)
    runs = {seed: run_pipeline(model, x, replace(cfg, seed=seed), opts) for seed in (0, 1)}
    again = run_pipeline(model, x, cfg, opts)
    assert runs[0].recon["settings"]["seed"] == 0 and runs[1].recon["settings"]["seed"] == 1
    with torch.inference_mode():
        assert torch.equal(again.model(x), runs[0].model(x))  # same seed, same model
        assert not torch.equal(runs[1].model(x), runs[0].model(x))  # the batch order changed


