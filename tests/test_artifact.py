import json

import pytest
import torch

from vitq.artifact import ArtifactError, load_artifact, save_artifact, write_dir_atomically
from vitq.quant import LayerRule, QuantConfig, quantize
from conftest import TINY, tiny_images, tiny_model, tiny_vit_with_massive_position

META = {"model": "deit_tiny_patch16_224.fb_in1k", "model_kwargs": TINY["deit"][1]}


def _quantized(protocol="standard"):
    model, size = tiny_model("deit")
    x = tiny_images(size)
    cfg = QuantConfig(w_bits=4, a_bits=6, protocol=protocol, observer="mse",
                      rules=[LayerRule("head", w_bits=8, w_scheme="pot")])
    return quantize(model, x, cfg), x


@pytest.mark.parametrize("protocol", ["standard", "full"])
def test_save_and_reload_are_identical(tmp_path, protocol):
    q, x = _quantized(protocol)
    write_dir_atomically(tmp_path / "a", lambda d: save_artifact(q, d, META))
    r, meta = load_artifact(tmp_path / "a")
    with torch.inference_mode():
        assert torch.equal(q(x), r(x))
    assert meta["quant_config"]["protocol"] == protocol


def test_token_shifts_survive_save_and_reload(tmp_path):
    model, x = tiny_vit_with_massive_position(n=4, family="deit", position=1, channel=5)
    q = quantize(model, x, QuantConfig(w_bits=6, a_bits=6, protocol="full", residual_token_shift=True))
    shifts = {k: v for k, v in q.state_dict().items() if k.endswith("token_shift")}
    assert shifts and all(v[1] > 0 for v in shifts.values())
    write_dir_atomically(tmp_path / "a", lambda d: save_artifact(q, d, META))
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
    write_dir_atomically(tmp_path / "a", lambda d: save_artifact(q, d, META))
    r, meta = load_artifact(tmp_path / "a")
    assert meta["quant_config"]["gelu_token_shift"] is True
    assert torch.equal(r.blocks[0].mlp.act.in_quant.token_shift, shift)
    with torch.inference_mode():
        assert torch.equal(q(x), r(x))


def test_other_version_and_corruption_are_rejected(tmp_path):
    q, _ = _quantized()
    write_dir_atomically(tmp_path / "a", lambda d: save_artifact(q, d, META))
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


def test_interrupted_write_keeps_previous_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")

    def failing(folder):
        (folder / "half.txt").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(tmp_path / "out", failing)
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_log2_grids_survive_save_and_reload(tmp_path):
    q, x = _quantized()
    attn = [t for t in q.modules() if getattr(t, "role", None) == "attn"]
    for t in attn:
        t.set_log2(0.7)
    write_dir_atomically(tmp_path / "a", lambda d: save_artifact(q, d, META))
    r, _ = load_artifact(tmp_path / "a")
    assert all(t.spec.scheme == "log2" for t in r.modules() if getattr(t, "role", None) == "attn")
    with torch.inference_mode():
        assert torch.equal(q(x), r(x))
