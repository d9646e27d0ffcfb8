import pytest
import torch
from torch import nn

from vitq.adapters import adapter_for
from vitq.adapters.base import fold_batchnorm

from conftest import tiny_images, tiny_model


@pytest.mark.parametrize("family,expected", [("vit", "vit"), ("deit", "vit"), ("swin", "swin"),
                                             ("efficientvit", "efficientvit"), ("cnn", "cnn")])
def test_adapter_chosen_by_model_class(family, expected):
    model, _ = tiny_model(family)
    assert adapter_for(model).family == expected


def test_unsupported_model_is_named():
    with pytest.raises(ValueError, match="Sequential"):
        adapter_for(nn.Sequential(nn.Linear(3, 3)))


@pytest.mark.parametrize("name, kwargs, modules", [
    ("eva02_tiny_patch14_224", dict(depth=2), "EvaAttention"),
])
def test_hybrids_without_an_adapter_are_refused_by_their_attention_not_taken_as_cnns(name, kwargs, modules):
    import timm

    from vitq.adapters import UnsupportedModel

    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(UnsupportedModel, match=f"model '{name}': .*attention modules: {modules}.*no vitq adapter"):
        adapter_for(model, f"model '{name}'")


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "resnet18", "convnext_atto"])
def test_timm_models_outside_the_zoo_find_their_family(name):
    import timm

    model = timm.create_model(name, pretrained=False)
    assert adapter_for(model).family == ("vit" if name.startswith("deit3") else "cnn")


def test_batchnorm_folding_is_exact():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    ref = bn(conv(x))
    fold_batchnorm(conv, bn)
    assert torch.allclose(conv(x), ref, atol=1e-5)


@pytest.mark.parametrize("family", ["efficientvit", "cnn"])
def test_prepare_removes_batchnorm_and_keeps_outputs(family):
    model, size = tiny_model(family)
    x = tiny_images(size)
    with torch.inference_mode():
        ref = model(x)
    import copy
    m = copy.deepcopy(model)
    adapter_for(m).prepare(m)
    assert not any(isinstance(k, nn.BatchNorm2d) for k in m.modules())
    with torch.inference_mode():
        assert torch.allclose(m(x), ref, atol=1e-4, rtol=1e-4)


def test_swin_shifted_window_mask_is_kept():
    from vitq.quant import QuantConfig, prepare
    model, size = tiny_model("swin")
    q = prepare(model, QuantConfig())
    shifted = [b for b in q.modules() if hasattr(b, "attn_mask") and b.attn_mask is not None]
    assert shifted, "the tiny Swin must contain a shifted-window block"
    x = tiny_images(size)
    with torch.inference_mode():
        assert torch.allclose(q(x), model(x), atol=1e-5)


def test_mobilevit_v1_quantizes_every_attention_matmul_and_folds_batchnorm():
    import timm

    import vitq
    from vitq.coverage import coverage
    from vitq.quant import QuantConfig

    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", pretrained=False).eval()
    assert adapter_for(model).family == "mobilevit"
    x = torch.randn(2, 3, 256, 256)
    q = vitq.quantize(model, x, QuantConfig(w_bits=8, a_bits=8), recipe="minmax", progress=False).model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    with torch.inference_mode():
        assert torch.equal(q(x).argmax(1), model(x).argmax(1))
    row = coverage("mobilevit_xxs")
    attention = sum(type(m).__name__ == "Attention" for m in model.modules())
    assert row.family == "mobilevit" and row.matmuls == 2 * attention and not row.unused
    assert not {k for k in row.float_ops if k != "softmax"}  # no activation matmul left in float


def test_mobilevit_v2_quantizes_both_products_of_its_linear_attention():
    import timm

    import vitq
    from vitq.coverage import coverage
    from vitq.quant import QuantConfig
    from vitq.quant.engine import all_quantizers, prepare

    torch.manual_seed(0)
    model = timm.create_model("mobilevitv2_050", pretrained=False).eval()
    for m in model.modules():  # statistics a trained model would have, so the folding is really tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    assert adapter_for(model).family == "mobilevit"
    x = torch.randn(2, 3, 256, 256)
    floated = prepare(model, QuantConfig())
    for q in all_quantizers(floated):
        q.mode = "off"
    with torch.inference_mode():  # folding and the matmul form of the two products are exact
        assert (floated(x) - model(x)).abs().max() < 1e-4
    q = vitq.quantize(model, x, QuantConfig(w_bits=8, a_bits=8), recipe="minmax", progress=False).model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    with torch.inference_mode():  # random weights give near-flat logits: compare their shape, not the argmax
        a, b = q(x), model(x)
    cos = nn.functional.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1)
    assert (cos > 0.99).all()
    row = coverage("mobilevitv2_050")
    attention = sum(type(m).__name__ == "LinearSelfAttention" for m in model.modules())
    assert attention > 0 and row.family == "mobilevit" and row.matmuls == 2 * attention and not row.unused


def test_levit_folds_every_batchnorm_exactly_and_quantizes_every_attention_matmul():
    import copy

    import timm

    import vitq
    from vitq.adapters.levit import LevitAdapter
    from vitq.coverage import coverage
    from vitq.quant import QuantConfig

    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False).eval()
    for m in model.modules():  # statistics a trained model would have, so the folding is really tested
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 224, 224)
    folded = copy.deepcopy(model)
    LevitAdapter().prepare(folded)
    with torch.inference_mode():
        assert (folded(x) - model(x)).abs().max() < 1e-4
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules())
    q = vitq.quantize(model, x, QuantConfig(w_bits=8, a_bits=8), recipe="minmax", progress=False).model
    with torch.inference_mode():
        assert torch.equal(q(x).argmax(1), model(x).argmax(1))
    row = coverage("levit_128s")
    attention = sum(type(m).__name__ in ("Attention", "AttentionDownsample") for m in model.modules())
    assert row.family == "levit" and row.matmuls == 2 * attention and not row.unused
    assert not {k for k in row.float_ops if k != "softmax"}


def test_efficientformer_v2_folds_batchnorm_exactly_and_quantizes_every_attention_matmul():
    import copy

    import timm

    import vitq
    from vitq.adapters.efficientformer import EfficientFormerV2Adapter
    from vitq.coverage import coverage
    from vitq.quant import QuantConfig

    torch.manual_seed(0)
    model = timm.create_model("efficientformerv2_s0", pretrained=False).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 224, 224)
    folded = copy.deepcopy(model)
    EfficientFormerV2Adapter().prepare(folded)
    with torch.inference_mode():
        assert (folded(x) - model(x)).abs().max() < 1e-4
    q = vitq.quantize(model, x, QuantConfig(w_bits=8, a_bits=8), recipe="minmax", progress=False).model
    with torch.inference_mode():  # random weights: near-tied logits, so compare them, not their argmax
        assert torch.nn.functional.cosine_similarity(q(x), model(x)).min() > 0.98
    row = coverage("efficientformerv2_s0")
    attention = sum(type(m).__name__ in ("Attention2d", "Attention2dDownsample") for m in model.modules())
    assert row.family == "efficientformerv2" and row.matmuls == 2 * attention and not row.unused
    assert not {k for k in row.float_ops if k != "softmax"} and row.tensors["full"] > row.tensors["standard"]


class _HeadlessAttentionNet(nn.Module):
    """A convolution net with a softmax attention module that holds no head count (as a new hybrid may)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        t = (q @ k.transpose(1, 2)).softmax(-1) @ v
        return self.head(t.mean(1))


def test_a_hybrid_whose_attention_has_no_head_count_is_refused_not_quantized_as_a_cnn():
    from vitq.adapters import UnsupportedModel, check_supported

    with pytest.raises(UnsupportedModel, match=r"conv-transformer hybrid \(its forward runs .*softmax x1"):
        check_supported(_HeadlessAttentionNet().eval(), "model 'headless'", (3, 16, 16))
