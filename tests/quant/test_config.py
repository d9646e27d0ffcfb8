import pytest

from vitq.quant.config import ConfigError, LayerRule, QuantConfig


@pytest.mark.parametrize("kw", [dict(w_bits=1), dict(a_bits=9), dict(w_bits=4.5), dict(protocol="half"),
                                dict(observer="max"), dict(w_scheme="log"), dict(percentile=10)])
def test_bad_options_are_named(kw):
    with pytest.raises(ConfigError, match=list(kw)[0]):
        QuantConfig(**kw)


def test_bad_rule_bits_named():
    with pytest.raises(ConfigError, match="rule 'head' a_bits"):
        QuantConfig(rules=[LayerRule("head", a_bits=12)])


def test_rules_override_in_order():
    c = QuantConfig(w_bits=4, a_bits=4, rules=[LayerRule("blocks.*", w_bits=6), LayerRule("blocks.1.*", w_bits=8, w_scheme="pot")])
    assert c.layer_settings("head")["w_bits"] == 4
    assert c.layer_settings("blocks.0.attn.qkv")["w_bits"] == 6
    s = c.layer_settings("blocks.1.mlp.fc1")
    assert s["w_bits"] == 8 and s["w_scheme"] == "pot" and s["a_bits"] == 4


def test_pattern_matching_no_layer_is_an_error():
    c = QuantConfig(rules=[LayerRule("blocks.99.*", w_bits=4)])
    with pytest.raises(ConfigError, match="blocks.99"):
        c.check_patterns(["blocks.0.attn.qkv", "head"])


def test_json_round_trip(tmp_path):
    c = QuantConfig(w_bits=5, rules=[LayerRule("head", a_bits=8)], protocol="full")
    c.save(tmp_path / "c.json")
    assert QuantConfig.load(tmp_path / "c.json") == c


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        QuantConfig.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantConfig.load(tmp_path / "bad.json")
    (tmp_path / "unk.json").write_text('{"wbits": 4}')
    with pytest.raises(ConfigError, match="wbits"):
        QuantConfig.load(tmp_path / "unk.json")


def test_retired_options_load_only_at_their_off_value():
    from vitq.quant.config import ConfigError, QuantConfig

    cfg = QuantConfig.from_dict({"w_bits": 4, "head_grids": False, "qkv_head_grids": False})
    assert cfg.w_bits == 4 and "head_grids" not in cfg.to_dict()
    with pytest.raises(ConfigError, match="head_grids=True was an option of an earlier vitq"):
        QuantConfig.from_dict({"head_grids": True})
