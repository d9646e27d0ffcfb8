import pytest
import torch

from vitq.artifact import ArtifactError
from vitq.export.packed import (codes_per_byte, decode_weight, encode_weight, export_packed, load_packed,
                                pack_bits, unpack_bits)
from vitq.quant import QuantConfig
from vitq.quant.config import LayerRule
from vitq.quant.engine import quantize, weight_layers

from conftest import TINY, tiny_images, tiny_model


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_round_trip_and_density(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (1001,), generator=g)
    data = pack_bits(codes, bits)
    assert data.dtype == torch.uint8
    assert data.numel() == -(-1001 // codes_per_byte(bits))  # 2 per byte at 4 and 3 bits, 4 at 2 bits
    assert torch.equal(unpack_bits(data, bits, 1001), codes)
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([2**bits]), bits)


def _model(family="deit"):
    model, size = tiny_model(family)
    x = tiny_images(size, 4)
    cfg = QuantConfig(w_bits=4, a_bits=8, group_size=16, rules=[LayerRule("blocks.0.*", w_bits=3, w_scheme="pot"),
                                                 LayerRule("head", w_bits=6, w_granularity="per_group")])
    return quantize(model, x, cfg), x


def test_codes_decode_to_the_simulated_weights():
    q, _ = _model()
    for m in weight_layers(q):
        codes = encode_weight(m.w_quant, m.weight)
        assert int(codes.min()) >= 0 and int(codes.max()) < 2**m.w_quant.spec.bits
        assert torch.equal(decode_weight(m.w_quant, codes, m.weight.shape), m.quantized_weight())


def _meta(family):
    name, kwargs, _ = TINY[family]
    return {"model": name, "model_kwargs": kwargs}


@pytest.mark.parametrize("family", ["deit", "cnn"])
def test_packed_model_is_identical_to_the_simulation(tmp_path, family):
    if family == "deit":
        q, x = _model()
    else:
        model, size = tiny_model("cnn")
        x = tiny_images(size, 2)
        q = quantize(model, x, QuantConfig(w_bits=4, a_bits=8))
    f = tmp_path / "m.safetensors"
    sizes = export_packed(q, _meta(family), f)
    r, _ = load_packed(f)
    with torch.inference_mode():
        assert torch.equal(q(x), r(x))
    assert sizes["file_bytes"] == f.stat().st_size
    if family == "cnn":  # 98 % of EfficientNet-Lite0's parameters are 4-bit weights: two per byte
        assert sizes["ratio"] > 6.0


def test_bad_files_are_rejected(tmp_path):
    q, _ = _model()
    f = tmp_path / "m.safetensors"
    export_packed(q, _meta("deit"), f)
    data = f.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="corrupted"):
        load_packed(cut)
    other = tmp_path / "other.safetensors"
    other.write_bytes(data.replace(b"vitq-packed/1", b"vitq-packed/0"))
    with pytest.raises(ArtifactError, match="format 'vitq-packed/0'"):
        load_packed(other)
    with pytest.raises(ArtifactError, match="not found"):
        load_packed(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="corrupted"):
        load_packed(junk)
