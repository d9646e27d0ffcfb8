import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg

from vitq.zoo import ZOO, ZooError, get_entry, load_model, load_strict, read_state_dict, resolve_checkpoint


def test_every_entry_pins_a_tag_and_timm_agrees_on_its_transform():
    assert {"deit_tiny", "deit_small", "deit_base", "vit_tiny", "vit_small", "vit_base", "swin_tiny", "swin_small",
            "efficientvit_b0", "efficientvit_b1", "efficientvit_b2", "tf_efficientnet_lite0"} <= set(ZOO)
    for e in ZOO.values():
        assert "." in e.timm_name, e
        cfg = get_pretrained_cfg(e.timm_name)
        t = e.transform
        assert (cfg.interpolation, cfg.crop_pct, tuple(cfg.mean), tuple(cfg.std), tuple(cfg.input_size)) == (
            t.interpolation, t.crop_pct, t.mean, t.std, t.input_size), e.short


def test_vit_uses_augreg_in21k_ft_in1k_not_timm_default():
    assert get_entry("vit_tiny").timm_name == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def test_names_resolve_short_full_and_untagged():
    e = get_entry("deit_tiny")
    assert get_entry("deit_tiny_patch16_224.fb_in1k") is e
    assert get_entry("deit_tiny_patch16_224") is e


def test_unknown_model_suggests_close_names():
    with pytest.raises(ZooError, match="deit_tiny"):
        get_entry("deit_tiy")


def _save_tiny(path, model):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_resolution_order_explicit_then_untagged_then_tagged(tmp_path, monkeypatch):
    entry = get_entry("deit_tiny")
    models = tmp_path / "models"
    models.mkdir()
    untagged, tagged = models / f"{entry.arch}.safetensors", models / f"{entry.timm_name}.safetensors"
    tagged.write_bytes(b"x")
    monkeypatch.setenv("VITQ_ASSETS", str(tmp_path))
    assert resolve_checkpoint(entry, None) == tagged
    untagged.write_bytes(b"x")
    assert resolve_checkpoint(entry, None) == untagged
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"x")
    assert resolve_checkpoint(entry, explicit) == explicit
    with pytest.raises(ZooError, match="not found"):
        resolve_checkpoint(entry, tmp_path / "absent.safetensors")


def test_offline_without_weights_names_the_paths_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("VITQ_ASSETS", str(tmp_path))
    with pytest.raises(ZooError) as err:
        load_model("deit_tiny")
    msg = str(err.value)
    assert str(tmp_path / "models" / "deit_tiny_patch16_224.safetensors") in msg and "--checkpoint" in msg


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_pth_with_or_without_wrapper(tmp_path, wrapper):
    m = timm.create_model("deit_tiny_patch16_224")
    sd = m.state_dict()
    path = tmp_path / "ck.pth"
    torch.save(sd if wrapper is None else {wrapper: sd, "epoch": 3}, path)
    loaded = load_model("deit_tiny", checkpoint=path)
    assert not loaded.random_init
    assert torch.equal(loaded.model.head.weight, m.head.weight)


def test_safetensors_checkpoint_roundtrip(tmp_path):
    m = timm.create_model("deit_tiny_patch16_224")
    _save_tiny(tmp_path / "ck.safetensors", m)
    loaded = load_model("deit_tiny_patch16_224.fb_in1k", checkpoint=tmp_path / "ck.safetensors")
    assert torch.equal(loaded.model.pos_embed, m.pos_embed)


def test_strict_load_lists_missing_unexpected_and_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    state = {"0.weight": torch.zeros(3, 5), "extra.bias": torch.zeros(1)}
    with pytest.raises(ZooError) as err:
        load_strict(model, state, "ck.safetensors")
    msg = str(err.value)
    assert "missing keys (1): 0.bias" in msg and "unexpected keys (1): extra.bias" in msg
    assert "0.weight: file (3, 5) vs model (3, 4)" in msg and "ck.safetensors" in msg


def test_wrong_architecture_checkpoint_is_rejected(tmp_path):
    _save_tiny(tmp_path / "vit.safetensors", timm.create_model("efficientvit_b0"))
    with pytest.raises(ZooError, match="does not fit"):
        load_model("deit_tiny", checkpoint=tmp_path / "vit.safetensors")


def test_corrupt_checkpoint_names_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ZooError, match="bad.safetensors"):
        read_state_dict(bad)


def test_random_init_only_when_asked():
    loaded = load_model("swin_tiny", random_init=True)
    assert loaded.random_init and loaded.checkpoint is None
    with pytest.raises(ZooError, match="exclude"):
        load_model("swin_tiny", checkpoint="x.pth", random_init=True)


def test_any_timm_name_outside_the_zoo_gets_timms_transform():
    e = get_entry("deit3_small_patch16_224")
    cfg = get_pretrained_cfg("deit3_small_patch16_224")
    assert not e.pinned and e.timm_name == "deit3_small_patch16_224" and e.family == ""
    assert (e.transform.crop_pct, e.transform.mean, e.transform.input_size) == (cfg.crop_pct, tuple(cfg.mean),
                                                                               tuple(cfg.input_size))
    with pytest.raises(ZooError, match="neither in vitq's zoo nor a timm model"):
        get_entry("no_such_model_xyz")


def test_a_checkpoint_with_its_own_head_sets_the_classes(tmp_path):
    two = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=2)
    _save_tiny(tmp_path / "ft.safetensors", two)
    loaded = load_model("deit_tiny", checkpoint=tmp_path / "ft.safetensors")  # read from the checkpoint
    assert loaded.model.num_classes == 2 and loaded.model_kwargs == {"num_classes": 2}
    assert torch.equal(loaded.model.head.weight, two.head.weight)
    forced = load_model("deit_tiny", random_init=True, num_classes=5)
    assert forced.model.head.weight.shape[0] == 5 and forced.model_kwargs == {"num_classes": 5}
    with pytest.raises(ZooError, match="head.weight: file"):  # --num-classes against the checkpoint: named
        load_model("deit_tiny", checkpoint=tmp_path / "ft.safetensors", num_classes=3)
    with pytest.raises(ZooError, match="--num-classes must be a positive integer"):
        load_model("deit_tiny", random_init=True, num_classes=0)


def test_coverage_counts_every_attention_matmul_and_names_refusals():
    from vitq.coverage import coverage

    deit = coverage("deit_tiny")
    assert deit.family == "vit" and deit.matmuls == 24 and deit.weights == 50  # 12 blocks x (q k, attn v)
    assert not deit.unused and not {k for k in deit.float_ops if k != "softmax"}  # no matmul left in float
    assert deit.tensors["full"] > deit.tensors["standard"]
    row = coverage("eva02_tiny_patch14_224")
    assert row.family == "none" and row.refused.startswith("refused:") and "no vitq adapter" in row.refused
