"""Workloads of real (tiny, random-init) models: every compute layer, with the right MAC counts."""
import timm

from vitq.hardware import extract_workloads
from vitq.quant import QuantConfig
from vitq.quant.engine import all_quantizers, prepare

from conftest import tiny_model


def test_vit_workloads_match_the_architecture():
    model, size = tiny_model("deit")
    q = prepare(model, QuantConfig())
    wl = {w.name: w for w in extract_workloads(q, (3, size, size))}
    tokens, dim = (size // 8) ** 2 + 1, 32
    assert wl["blocks.0.attn.qkv"].macs == tokens * dim * 3 * dim
    # q k^T: heads x tokens x head_dim x tokens
    assert wl["blocks.0.attn.matmul_qk"].macs == 2 * tokens * 16 * tokens
    assert wl["blocks.0.attn.matmul_qk"].op == "matmul"
    assert wl["patch_embed.proj"].op == "conv" and not wl["patch_embed.proj"].pot_eligible
    assert wl["blocks.0.mlp.fc1"].pot_eligible
    # quantizer modes are restored after the pass
    assert {q_.mode for q_ in all_quantizers(q)} == {"off"}


def test_efficientvit_has_depthwise_litemla_and_division():
    model, size = tiny_model("efficientvit")
    wl = extract_workloads(prepare(model, QuantConfig()), (3, size, size))
    ops = {w.op for w in wl}
    assert {"conv", "dwconv", "matmul", "div", "linear"} <= ops
    assert not any(w.pot_eligible for w in wl if w.op in ("dwconv", "gconv"))
    div = next(w for w in wl if w.op == "div")
    qkv = next(w for w in wl if w.name + ".div" == div.name)
    assert 0 < div.macs < qkv.out_elems  # one division per value except the normalizer column


def test_total_macs_close_to_published_counts():
    # timm / the papers: DeiT-Tiny 1.3 GMACs, EfficientViT-B1 0.53 GMACs at 224 (random init is enough).
    for name, published in (("deit_tiny_patch16_224", 1.26e9), ("efficientvit_b1", 0.53e9)):
        m = timm.create_model(name, pretrained=False).eval()
        macs = sum(w.macs for w in extract_workloads(prepare(m, QuantConfig()), (3, 224, 224)))
        assert abs(macs - published) / published < 0.05, (name, macs)
