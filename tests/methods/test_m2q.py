from dataclasses import replace

import pytest
import torch

from vitq.hardware import estimate, extract_workloads, int8_baseline, load_hardware
from vitq.methods.m2q import balanced_share, choose_schemes, fixed_scheme_config, m2q, model_share, paper_config
from vitq.quant import quantizers as Q
from vitq.quant import QuantConfig
from vitq.quant.config import ConfigError
from vitq.quant.engine import prepare, weight_layers

from conftest import tiny_images, tiny_model


def _pot_friendly(model):
    """Make fc1 of block 0 exactly representable on the 4-bit APoT grid: level 1 must pick APoT for it."""
    g = torch.Generator().manual_seed(1)
    w = model.blocks[0].mlp.fc1.weight
    levels = Q.apot_levels(4)
    with torch.no_grad():
        sign = torch.randint(0, 2, w.shape, generator=g) * 2 - 1
        w.copy_(sign * levels[torch.randint(1, len(levels), w.shape, generator=g)] * 0.05)
        w[:, 0] = 0.075  # every row reaches the top level, so the grid's scale is the same for all
    return model


def test_level1_picks_the_lower_error_and_holds_ineligible_layers_uniform():
    model, size = tiny_model("deit")
    _pot_friendly(model)
    x = tiny_images(size, n=8)
    choice = choose_schemes(model, x, QuantConfig(w_bits=4, a_bits=8), 4, (3, size, size))
    fc1 = choice["blocks.0.mlp.fc1"]
    assert fc1.scheme == "apot" and fc1.mse_pot < fc1.mse_uniform
    for c in choice.values():
        if c.mse_pot is None:
            assert c.scheme == "uniform"
        else:
            assert c.scheme == ("apot" if c.mse_pot < c.mse_uniform else "uniform")
    assert choice["patch_embed.proj"].mse_pot is None  # a 8x8 conv: not eligible


def test_depthwise_convs_are_never_pot():
    model, size = tiny_model("efficientvit")
    choice = choose_schemes(model, tiny_images(size, n=4), QuantConfig(a_bits=8), 4, (3, size, size), n_images=4)
    names = {w.name: w.op for w in extract_workloads(prepare(model, QuantConfig()), (3, size, size))}
    dw = [n for n, op in names.items() if op == "dwconv"]
    assert dw and all(choice[n].scheme == "uniform" and choice[n].mse_pot is None for n in dw)


@pytest.mark.parametrize("metric", ["edp", "energy"])
def test_budget_is_met_and_pot_layers_decode_to_shifts(metric):
    model, size = tiny_model("deit")
    _pot_friendly(model)
    x = tiny_images(size, n=8)
    hw = load_hardware()
    q, res = m2q(model, x, QuantConfig(w_bits=8, a_bits=8), hw, 0.6, (3, size, size), metric=metric, progress=False,
                 level="layer")
    assert res.cost[{"edp": "edp", "energy": "energy_j"}[metric]] <= 0.6 * res.baseline[
        {"edp": "edp", "energy": "energy_j"}[metric]] * (1 + 1e-9)
    # the model's own quantizers agree with the report
    wl = extract_workloads(q, (3, size, size))
    assert estimate(wl, hw).edp == pytest.approx(res.cost["edp"])
    assert estimate(int8_baseline(wl), hw).edp == pytest.approx(res.baseline["edp"])
    rows = {r["layer"]: r for r in res.layers}
    assert rows["blocks.0.mlp.fc1"]["scheme"] == "apot"
    for m in weight_layers(q):
        if m.w_quant.spec.scheme == "apot":
            assert rows[m.layer_name]["engine"] == "shift"
            with torch.no_grad():
                wq = m.w_quant.fake_quant(m.weight)
            scale = m.w_quant.scale.reshape(-1, 1)
            levels = Q.apot_levels(m.w_quant.spec.bits)
            idx = ((wq / scale).abs().unsqueeze(-1) - levels).abs().argmin(-1)
            assert torch.equal(wq, torch.sign(wq) * levels[idx] * scale)  # every value: scale x (2^-i + 2^-j)


def test_bad_budget_and_metric():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=4)
    with pytest.raises(ConfigError, match="fraction"):
        m2q(model, x, QuantConfig(), load_hardware(), 1.5, (3, size, size), progress=False)
    with pytest.raises(ConfigError, match="metric"):
        m2q(model, x, QuantConfig(), load_hardware(), 0.5, (3, size, size), metric="power", progress=False)
    with pytest.raises(ConfigError, match="unreachable"):
        m2q(model, x, QuantConfig(), load_hardware(), 0.01, (3, size, size), progress=False)


def test_pot_only_reference_config():
    model, size = tiny_model("deit")
    cfg = fixed_scheme_config(model, QuantConfig(w_bits=8, a_bits=8), (3, size, size))
    names = {r.pattern for r in cfg.rules}
    assert "blocks.0.mlp.fc1" in names and "patch_embed.proj" not in names
    assert all(r.w_scheme == "apot" and r.w_bits == 4 for r in cfg.rules)


def test_curve_snapshots_and_config_round_trip():
    from vitq.methods.mptq import MethodOptions, run_pipeline

    model, size = tiny_model("deit")
    _pot_friendly(model)
    x = tiny_images(size, n=8)
    hw = load_hardware()
    q, res = m2q(model, x, QuantConfig(w_bits=8, a_bits=8), hw, 0.5, (3, size, size), curve=(0.9, 0.7),
                 progress=False, level="layer")
    # the saved config rebuilds the searched model exactly (schemes and bits included)
    again = run_pipeline(model, x, res.config, MethodOptions()).model
    with torch.inference_mode():
        assert torch.equal(again(x), q(x))
    assert set(res.curve) == {0.9, 0.7}
    edps = []
    for f, cfg in sorted(res.curve.items()):
        m = run_pipeline(model, x, cfg, MethodOptions()).model
        edp = estimate(extract_workloads(m, (3, size, size)), hw).edp
        assert edp <= f * res.baseline["edp"] * (1 + 1e-9)
        edps.append(edp)
    assert res.cost["edp"] <= edps[0] <= edps[1]


def test_uniform_only_search_uses_no_pot():
    model, size = tiny_model("deit")
    _pot_friendly(model)
    q, res = m2q(model, tiny_images(size, n=8), QuantConfig(w_bits=8, a_bits=8), load_hardware(), 0.6,
                 (3, size, size), level="none", progress=False)
    assert all(r["scheme"] == "uniform" and r["engine"] == "mac" for r in res.layers)


def test_channel_split_balances_the_engines_meets_the_budget_and_rebuilds_exactly(tmp_path):
    from vitq.methods.mptq import MethodOptions, run_pipeline

    model, size = tiny_model("deit")
    x = tiny_images(size, n=8)
    hw = load_hardware()
    hw = replace(hw, memory=replace(hw.memory, dram_gb_per_s=1e6))  # compute-bound, as real-sized models are
    assert balanced_share(8, 8, hw) == pytest.approx(0.5) and balanced_share(4, 8, hw) == pytest.approx(1 / 3)
    wl = extract_workloads(prepare(model, QuantConfig()), (3, size, size))
    shares = {b: model_share(wl, b, 8, hw) for b in (4, 8)}
    # pipeline: the MAC engine also carries the matmuls, so the model's best share lies above the layer's
    assert shares[8] > 0.5 and shares[4] > 1 / 3
    seq = replace(hw, schedule="sequential")  # one layer at a time: each layer's own balance is the best
    assert model_share(wl, 8, 8, seq) == pytest.approx(0.5) and model_share(wl, 4, 8, seq) == pytest.approx(0.33)
    assert model_share(wl, 8, 8, hw, "energy") == 0.0  # an APoT product costs more than an 8-bit multiply
    q, res = m2q(model, x, QuantConfig(w_bits=8, a_bits=8), hw, 0.5, (3, size, size), progress=False,
                 options=MethodOptions(gptq=True))
    assert res.cost["edp"] <= 0.5 * res.baseline["edp"] * (1 + 1e-9)
    rows = {r["layer"]: r for r in res.layers}
    assert any(r["engine"] == "split" and 0 < r["shift_share"] < 1 for r in rows.values())
    for m in weight_layers(q):
        if m.w_quant.spec.scheme == "mixed":
            n, k = m.weight.shape[0], int(m.w_quant.apot_mask.sum())
            assert k == round(shares[m.w_quant.spec.bits] * n)
            assert rows[m.layer_name]["shift_share"] == pytest.approx(k / n)
    assert res.cost["busy_s"]["shift"] > 0
    # the saved config rebuilds the searched model's grids (GPTQ moves the weights; the shares stay)
    again = run_pipeline(model, x, res.config, MethodOptions()).model
    for a, b in zip(weight_layers(again), weight_layers(q)):
        assert a.w_quant.spec == b.w_quant.spec


def test_paper_recipe_config():
    model, size = tiny_model("efficientvit")
    cfg = paper_config(model, QuantConfig(), (3, size, size))
    ops = {w.name: w for w in extract_workloads(prepare(model, QuantConfig()), (3, size, size))}
    rules = {r.pattern: r for r in cfg.rules}
    for name, w in ops.items():
        if w.op == "dwconv":
            assert rules[name].w_bits == 4 and rules[name].w_scheme == "uniform"
        elif w.pot_eligible:
            assert rules[name].w_scheme == "mixed"
        else:
            assert name not in rules
    assert cfg.w_bits == 8 and cfg.a_bits == 8


def test_channel_split_config_rebuilds_the_searched_model_exactly():
    from vitq.methods.mptq import MethodOptions, run_pipeline

    model, size = tiny_model("deit")
    x = tiny_images(size, n=8)
    q, res = m2q(model, x, QuantConfig(w_bits=8, a_bits=8), load_hardware(), 0.5, (3, size, size), progress=False)
    again = run_pipeline(model, x, res.config, MethodOptions()).model
    for a, b in zip(weight_layers(again), weight_layers(q)):
        if b.w_quant.spec.scheme == "mixed":
            assert torch.equal(a.w_quant.apot_mask, b.w_quant.apot_mask)
    with torch.inference_mode():
        assert torch.equal(again(x), q(x))


def test_searched_scheme_meets_the_budget_and_rebuilds_exactly():
    """Each eligible layer's split is a search item; the config says which layers took it."""
    from vitq.methods.mptq import MethodOptions, run_pipeline

    model, size = tiny_model("deit")
    x = tiny_images(size, n=8)
    hw = load_hardware()
    hw = replace(hw, memory=replace(hw.memory, dram_gb_per_s=1e6))
    q, res = m2q(model, x, QuantConfig(w_bits=8, a_bits=8), hw, 0.45, (3, size, size), progress=False,
                 curve=(0.7,))
    assert res.cost["edp"] <= 0.45 * res.baseline["edp"] * (1 + 1e-9)
    schemes = {m.layer_name: m.w_quant.spec.scheme for m in weight_layers(q)}
    assert set(schemes.values()) <= {"uniform", "mixed"} and "mixed" in schemes.values()
    rules = {r.pattern: r for r in res.config.rules}
    for name, scheme in schemes.items():
        assert (rules[name].w_scheme == "mixed") == (scheme == "mixed")
    again = run_pipeline(model, x, res.config, MethodOptions()).model
    with torch.inference_mode():
        assert torch.equal(again(x), q(x))
    assert 0.7 in res.curve


def test_searched_scheme_needs_the_greedy_cost_search():
    from vitq.methods.greedy_mp import Budget, greedy_mp
    from vitq.methods.mptq import MethodOptions

    model, size = tiny_model("deit")
    with pytest.raises(ConfigError, match="split_config"):
        greedy_mp(model, tiny_images(size, n=4), QuantConfig(), MethodOptions(), Budget(w_bits=6),
                  split_config=lambda b: QuantConfig(w_bits=b), split_layers=("blocks.0.mlp.fc1",))
