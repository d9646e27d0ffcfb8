import json

import pytest
import torch

from vitq.artifact import ArtifactError, load_artifact, save_artifact
from vitq.output import destination
from vitq.quant import LayerRule, QuantConfig, quantize
from conftest import TINY, tiny_images, tiny_model, tiny_vit_with_massive_position

META = {"model": "deit_tiny_patch16_224.fb_in1k", "model_kwargs": TINY["deit"][1]}


def _save(q, path, meta=META):
    with destination(path) as folder:
        save_artifact(q, folder, meta)


def _quantized(protocol="standard"):
    model, size = tiny_model("deit")
    x = tiny_images(size)
    cfg = QuantConfig(w_bits=4, a_bits=6, protocol=protocol, observer="mse",
                      rules=[LayerRule("head", w_bits=8, w_scheme="pot")])
    return quantize(model, x, cfg), x


@pytest.mark.parametrize("protocol", ["standard", "full"])
def test_save_and_reload_are_identical(tmp_path, protocol):
    q, x = _quantized(protocol)
    _save(q, tmp_path / "a")
    r, meta = load_artifact(tmp_path / "a")
    with torch.inference_mode():
        assert torch.equal(q(x), r(x))
    assert meta["quant_config"]["protocol"] == protocol


def test_token_shifts_survive_save_and_reload(tmp_path):
    model, x = tiny_vit_with_massive_position(n=4, family="deit", position=1, channel=5)
    q = quantize(model, x, QuantConfig(w_bits=6, a_bits=6, protocol="full", residual_token_shift=True))
    shifts = {k: v for k, v in q.state_dict().items() if k.endswith("token_shift")}
    assert shifts and all(v[1] > 0 for v in shifts.values())
    _save(q, tmp_path / "a")
    r, _ = load_artifact(tmp_path / "a")
    for k, v in shifts.items():
        assert torch.equal(r.state_dict()[k], v)
    with torch.inference_mode():
        assert torch.equal(q(x), r(x))


def test_gelu_token_shifts_survive_save_and_reload(tmp_path):
    model, size = tiny_model("deit")
    x = tiny_images(size)
    q = quantize(model, x, QuantConfig(w_bits=6, a_bits=6, protocol="full", gelu_token_shift=True))
    g = q.blocks[0].mlp.act.in_quant
    shift = torch.zeros(q.patch_embed.num_patches + q.num_prefix_tokens)  # one exponent per token position
    shift[1] = 3.0  # a flagged position, as calibration gives ViT-Tiny's block 7 (the tiny model has none)
    g.set_token_shift(shift)
    _save(q, tmp_path / "a")
    r, meta = load_artifact(tmp_path / "a")
    assert meta["quant_config"]["gelu_token_shift"] is True
    assert torch.equal(r.blocks[0].mlp.act.in_quant.token_shift, shift)
    with torch.inference_mode():
        assert torch.equal(q(x), r(x))


def test_other_version_and_corruption_are_rejected(tmp_path):
    q, _ = _quantized()
    _save(q, tmp_path / "a")
    cfg = tmp_path / "a" / "config.json"
    meta = json.loads(cfg.read_text())
    cfg.write_text(json.dumps(dict(meta, format="vitq-fakequant/0")))
    with pytest.raises(ArtifactError, match="format"):
        load_artifact(tmp_path / "a")
    cfg.write_text(json.dumps(meta))
    st = tmp_path / "a" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="corrupted"):
        load_artifact(tmp_path / "a")


def _edit(folder, fn):
    cfg = folder / "config.json"
    meta = json.loads(cfg.read_text())
    fn(meta)
    cfg.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["specs"][next(iter(m["specs"]))].update(bits=7), "were changed after vitq wrote them"),
    (lambda m: m["specs"][next(iter(m["specs"]))].update(bits=16), "bits must be an integer from 2 to 8, got 16"),
    (lambda m: m["specs"][next(iter(m["specs"]))].update(scheme="banana"), "scheme must be one of"),
    (lambda m: m["specs"][next(iter(m["specs"]))].update(colour=1), "unknown key(s) colour"),
    (lambda m: m.pop("quant_config"), "required key 'quant_config' is missing"),
    (lambda m: m.update(model="vit_tiny_patch16_224.augreg_in21k_ft_in1k"), "the files do not belong together"),
    (lambda m: m["quant_config"].update(seed="x"), "quant_config: seed must be an integer"),
    (lambda m: m["specs"].pop(next(iter(m["specs"]))), "were changed after vitq wrote them"),
])
def test_edited_artifacts_are_refused(tmp_path, edit, needle):
    q, _ = _quantized()
    _save(q, tmp_path / "a")
    _edit(tmp_path / "a", edit)
    with pytest.raises(ArtifactError) as info:
        load_artifact(tmp_path / "a")
    assert needle in str(info.value) and str(tmp_path / "a") in str(info.value)


def test_non_finite_artifact_tensors_are_refused(tmp_path):
    q, _ = _quantized()
    iq = q.blocks[0].attn.qkv.in_quant
    iq.scale = torch.full_like(iq.scale, float("nan"))
    _save(q, tmp_path / "a")
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.in_quant.scale holds"):
        load_artifact(tmp_path / "a")
