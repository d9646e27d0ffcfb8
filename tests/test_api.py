"""vitq.quantize: one API behind the command line; recipes fill only what the caller left open."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitq
from vitq.api import SearchOptions, calibration_tensor, plan
from vitq.cli import main
from vitq.data import load_tensors, make_dataset
from vitq.methods.greedy_mp import Budget
from vitq.methods.mptq import MethodOptions
from vitq.quant import QuantConfig
from vitq.quant.config import ConfigError
from vitq.recipes import DEFAULTS, resolve
from vitq.settings import defaults_table, settings_key
from vitq.zoo import load_model

from conftest import tiny_images, tiny_model, write_images

SYN = ["n01440764", "n01443537", "n01484850", "n15075141"]


def test_python_and_cli_give_bit_identical_models_and_equal_reports(tmp_path):
    names = write_images(tmp_path / "img", SYN, size=48)
    (tmp_path / "calib.txt").write_text("\n".join(names[:2]))
    (tmp_path / "eval.txt").write_text("\n".join(names[2:]))
    out = tmp_path / "q"
    assert main(["quantize", "deit_tiny", "--random-init", "--calib", str(tmp_path / "img"), "--calib-list",
                 str(tmp_path / "calib.txt"), "--eval", str(tmp_path / "img"), "--eval-list",
                 str(tmp_path / "eval.txt"), "--w-bits", "8", "--a-bits", "8", "--workers", "0", "-q",
                 "--out", str(out)]) == 0  # no --method: the mptq recipe
    report = json.loads((out / "report.json").read_text())
    loaded = load_model("deit_tiny", random_init=True)
    calib, _ = load_tensors(make_dataset(tmp_path / "img", loaded.entry.transform, tmp_path / "calib.txt"), workers=0)
    res = vitq.quantize(loaded.model, calib, QuantConfig(w_bits=8, a_bits=8), progress=False)
    cli_state = load_file(str(out / "model.safetensors"))
    api_state = res.model.state_dict()
    assert set(cli_state) == set(api_state)
    assert all(torch.equal(cli_state[k], api_state[k].contiguous()) for k in cli_state)
    assert report["recipe"] == res.report["recipe"] == "mptq"
    assert report["methods"] == json.loads(json.dumps(vars(res.options)))
    assert report["methods"]["sq_b"] is True and report["methods"]["opt_m"] is True
    for key in ("sqb", "optm"):
        assert report[key] == json.loads(json.dumps(res.report[key]))


def test_calibration_may_be_a_tensor_a_list_or_batches():
    x = tiny_images(32, n=4)
    forms = [x, [x[:2], x[2:]], [(x[:2], torch.zeros(2)), (x[2:], torch.zeros(2))]]
    assert all(torch.equal(calibration_tensor(f), x) for f in forms)
    model, _ = tiny_model("deit")
    a = vitq.quantize(model, forms[0], QuantConfig(w_bits=6, a_bits=6), recipe="minmax", progress=False).model
    b = vitq.quantize(model, forms[2], QuantConfig(w_bits=6, a_bits=6), recipe="minmax", progress=False).model
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))


def test_recipes_fill_only_what_the_caller_left_open():
    cfg = QuantConfig(w_bits=4, a_bits=4)
    c, o = resolve("mptq", cfg, MethodOptions(), mixed=False)
    assert (o.sq_b, o.opt_m, o.gptq, o.recon, o.rotate, o.token_scale) == (True,) * 6
    _, o = resolve("mptq", cfg, MethodOptions(gptq=False, rotate=False), mixed=False)
    assert o.gptq is False and o.rotate is False and o.sq_b is True
    _, o = resolve("minmax", cfg, MethodOptions(opt_m=True), mixed=False)
    assert o.opt_m is True and not any((o.sq_b, o.gptq, o.recon, o.rotate, o.token_scale))
    c, o = resolve("mptq", QuantConfig(w_bits=8, a_bits=8, protocol="full"), MethodOptions(), mixed=False)
    assert c.gelu_token_shift is True and o.token_scale is True and o.rotate is False  # R33/R47; R30
    with pytest.raises(ConfigError, match="m2q recipe does not take rotate"):
        resolve("m2q", cfg, MethodOptions(rotate=True), mixed=False)
    _, o = resolve("m2q", cfg, MethodOptions(sq_b=True, gptq=True), mixed=False)  # M2Q on the MPTQ passes
    assert o.sq_b and o.gptq and not o.recon
    with pytest.raises(ConfigError, match="unknown recipe"):
        resolve("fast", cfg, MethodOptions(), mixed=False)
    table = defaults_table()
    assert all(f"`{settings_key(d.option)}`" in table for d in DEFAULTS)
    assert "`sqb.enabled`" in table and "`quant.observer`" in table
    for doc in ("docs/usage.md", "docs/methods.md"):  # the docs show the table the code has
        assert table in (Path(__file__).parents[1] / doc).read_text(), doc


def test_plan_checks_budgets_and_searches_before_any_model():
    p = plan(None, "mptq", Budget(w_bits=5, a_bits=5))
    assert (p.config.w_bits, p.config.a_bits) == (5, 5) and p.search.search == "knapsack" and p.search.probe_images == 16
    assert p.search.uniform_fallback is False  # R37: standard Greedy MP at <= 6 bits keeps its assignment
    with pytest.raises(ConfigError, match="--budget-w must be a positive finite number"):
        Budget(w_bits=float("nan"))  # a budget checks its own values, so Python and the CLI refuse alike
    with pytest.raises(ConfigError, match="give a budget"):
        plan(None, "mptq", None, search=SearchOptions(search="greedy"))


def test_any_batch_type_with_an_input_function():
    x = tiny_images(32, n=4)
    batches = [{"pixel_values": x[:2], "label": 0}, {"pixel_values": x[2:], "label": 1}]
    assert torch.equal(calibration_tensor(batches, input_fn=lambda b: b["pixel_values"]), x)
    with pytest.raises(TypeError, match="pass input_fn"):
        calibration_tensor(batches)


def test_the_paper_recipe_takes_no_budget():
    from vitq.api import CostBudget

    with pytest.raises(ConfigError, match="m2q-paper recipe is M2-ViT's fixed recipe: it takes no budget"):
        plan(None, "m2q-paper", CostBudget(fraction=0.5))
    p = plan(None, "m2q-paper")
    assert p.config.observer == "mse" and not p.options.gptq and p.search.m2q_level is None
