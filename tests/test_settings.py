"""The settings file: YAML in, every field checked, and a plan written back out reads in to the same plan."""
import json
import re

import pytest
import yaml

from vitq.api import CostBudget
from vitq.cli import build_parser
from vitq.methods.greedy_mp import Budget
from vitq.quant import QuantConfig
from vitq.quant.config import ConfigError
from vitq.settings import PASSES, Settings, dump, plan_to_dict

from conftest import tiny_model


def test_yaml_sections_become_the_plan(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("recipe: mptq\nquant: {protocol: full}\nbudget: {w_bits: 5, a_bits: 5}\n"
                 "gptq: {enabled: false}\nrotation: {parts: [fc2]}\nsearch: {probe_images: 4, w_candidates: [4, 8]}\n")
    p = Settings.load(f).plan()
    assert (p.config.w_bits, p.config.a_bits, p.config.protocol) == (5, 5, "full")  # widths from the budget
    assert isinstance(p.budget, Budget) and p.budget.w_bits == 5.0
    assert p.options.gptq is False and p.options.sq_b is True  # left out: the recipe decides
    assert p.options.rotate is True and p.options.rotate_parts == ("fc2",)  # choosing rotations asks for them
    assert p.search.probe_images == 4 and p.search.w_candidates == (4, 8)
    assert p.config.observer == "mse"  # the mptq recipe's observer


def test_a_written_plan_reads_back_to_the_same_plan(tmp_path):
    model, _ = tiny_model("deit")
    for s in (Settings(quant={"w_bits": 4, "a_bits": 4}), Settings(budget={"w_bits": 5.0, "a_bits": 6.0}),
              Settings(recipe="m2q", budget={"edp": 0.5}), Settings(recipe="minmax", quant={"protocol": "full"})):
        first = s.plan()
        f = tmp_path / "config.yaml"
        f.write_text(dump(plan_to_dict(first)))
        again = Settings.load(f).plan()
        assert plan_to_dict(again) == plan_to_dict(first)
        assert again.config == first.config and again.options == first.options and again.search == first.search
    assert isinstance(again.budget, Budget) is False
    m2 = Settings(recipe="m2q", budget={"edp": 0.5}).plan()
    assert isinstance(m2.budget, CostBudget) and m2.budget.fraction == 0.5


def test_a_quant_config_json_is_the_quant_section(tmp_path):
    f = tmp_path / "mixed_config.json"
    QuantConfig(w_bits=6, a_bits=6, rules=[{"pattern": "head", "w_bits": 8}]).save(f)
    p = Settings.load(f).plan()
    assert p.config.w_bits == 6 and p.config.rules[0].pattern == "head" and p.recipe == "mptq"


@pytest.mark.parametrize("text, needle", [
    ("recipes: mptq\n", "unknown section 'recipes'"),
    ("recipe: fast\n", "'recipe' must be one of minmax, mptq, m2q"),
    ("gptq: {enabled: 1}\n", "'gptq.enabled' must be bool"),
    ("gptq: {max_bit: 5}\n", "'gptq.max_bit': unknown field (known: enabled, max_bits)"),
    ("recon: {drop: fast}\n", "'recon.drop' must be float"),
    ("quant: {w_bit: 4}\n", "'quant.w_bit': unknown field"),
    ("quant: {w_bits: 12}\n", "w_bits must be"),
    ("budget: {edp: 0.5}\n", "budget.edp (--budget-edp) needs the m2q recipe"),
    ("budget: {w_bits: 5, edp: 0.5}\nrecipe: m2q\n", "cannot be combined"),
    ("budget: {w_bits: -1}\n", "--budget-w must be a positive finite number"),
    ("search: {w_candidates: [4, 9]}\n", "candidate bit-width 9 out of range"),
    ("sqb: [true]\n", "section 'sqb' must be a mapping"),
    ("- a\n- b\n", "must hold a mapping of sections"),
    ("quant: {w_bits: [\n", "is not valid YAML"),
    ("!!python/object/apply:os.system ['true']\n", "is not valid YAML"),  # safe_load runs nothing
])
def test_bad_settings_name_the_file_and_the_key(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        Settings.load(f).plan()


def test_set_reads_values_as_yaml_and_names_bad_keys():
    s = Settings()
    s.apply("recon.iters=100")
    s.apply("search.w_candidates=4,8")
    s.apply("quant.observer=percentile")
    s.apply("rotation.enabled=false")
    p = s.plan()
    assert p.options.recon_iters == 100 and p.search.w_candidates == (4, 8) and p.config.observer == "percentile"
    assert p.options.rotate is False
    for bad, needle in (("recon", "--set takes SECTION.FIELD=VALUE"), ("recon.iter=3", "'recon.iter': unknown field"),
                        ("optm.m_max=big", "'optm.m_max' must be int")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            Settings().apply(bad)


def test_every_pass_field_is_a_method_option():
    from dataclasses import fields

    from vitq.methods.options import MethodOptions

    names = {f.name for f in fields(MethodOptions)}
    assert {opt for section in PASSES.values() for opt in section.values()} == names  # nothing unreachable


def test_quantize_help_is_small_grouped_and_cites_no_rules():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["quantize"]
    options = [a for a in sub._actions if a.option_strings]
    assert len(options) <= 30
    assert all(a.help for a in options), [a.option_strings for a in options if not a.help]
    groups = {g.title for g in sub._action_groups if g._group_actions}
    assert {"model", "data", "quantization", "budget (mixed precision)", "output"} <= groups
    text = sub.format_help()
    assert not re.search(r"\bR\d+\b|rule", text) and "session" not in text


def test_report_json_settings_are_the_yaml(tmp_path):
    """report.json keeps the same mapping config.yaml holds (JSON-clean)."""
    p = Settings(quant={"w_bits": 6, "a_bits": 6}).plan()
    d = plan_to_dict(p)
    assert json.loads(json.dumps(d)) == yaml.safe_load(dump(d))
