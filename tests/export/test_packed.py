import math

import pytest
import torch

from vitq.artifact import ArtifactError
from vitq.export.packed import (SMALL_NUMEL, codes_per_byte, decode_weight, encode_weight, export_packed, load_packed,
                                merge_small, pack_bits, split_small, unpack_bits)
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
    other.write_bytes(data.replace(b"vitq-packed/2", b"vitq-packed/1"))  # the older format is refused by name
    with pytest.raises(ArtifactError, match="format 'vitq-packed/1'"):
        load_packed(other)
    bad_meta = tmp_path / "bad_meta.safetensors"
    bad_meta.write_bytes(data.replace(b'"meta_encoding":"zlib+base64"', b'"meta_encoding":"zlib+base32"'))
    with pytest.raises(ArtifactError, match="metadata encoding 'zlib\\+base32'"):
        load_packed(bad_meta)
    with pytest.raises(ArtifactError, match="not found"):
        load_packed(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="corrupted"):
        load_packed(junk)


def test_small_tensors_share_one_tensor_per_dtype(tmp_path):
    from safetensors import safe_open

    q, _ = _model()
    f = tmp_path / "m.safetensors"
    export_packed(q, _meta("deit"), f)
    with safe_open(str(f), "pt") as h:
        keys = list(h.keys())
        sizes = {k: h.get_slice(k).get_shape() for k in keys}
    small = [k for k in keys if k.startswith("__small__.")]
    assert small, keys
    # Every other tensor is too large to have been merged (or is packed codes).
    assert all(math.prod(s) > SMALL_NUMEL or k.endswith(".__packed__") for k, s in sizes.items() if k not in small)


def test_merge_small_round_trip_and_size_check():
    state = {"a.scale": torch.tensor([0.5]), "a.zp": torch.tensor([3], dtype=torch.int64),
             "b.scale": torch.arange(4.0).reshape(2, 2), "big": torch.zeros(SMALL_NUMEL + 1)}
    merged, index = merge_small(dict(state))
    assert set(merged) == {"big", "__small__.float32", "__small__.int64"}
    back = dict(merged)
    split_small(back, index, "x")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    merged["__small__.float32"] = merged["__small__.float32"][:-1]
    with pytest.raises(ArtifactError, match="__small__.float32"):
        split_small(merged, index, "x")
