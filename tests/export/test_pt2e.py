import json
import zipfile
from dataclasses import replace

import pytest
import torch

from vitq.export.pt2e import Pt2eError, Pt2eModel, export_pt2e, have_x86_passes, load_pt2e, to_program
from vitq.quant import QuantConfig
from vitq.quant.config import LayerRule
from vitq.quant.engine import quantize

from conftest import tiny_images, tiny_model


@pytest.fixture(scope="module")
def w8a8():
    model, size = tiny_model("deit")
    x = tiny_images(size, 4)
    return quantize(model, x, QuantConfig(w_bits=8, a_bits=8)), x, size


def test_round_trip_is_the_simulation_and_compiles_to_int8_kernels(w8a8, tmp_path):
    q, x, size = w8a8
    f = tmp_path / "m.pt2"
    rep = export_pt2e(q, (3, size, size), f, provenance={"vitq_model": "tiny"}, check_images=x)
    program, meta = load_pt2e(f)
    assert meta["vitq_model"] == "tiny" and meta["vitq_check_images"] == 4
    with torch.no_grad():
        ref = q(x)
        # uncompiled, the program's quantize/dequantize ops are the simulation's arithmetic: the same values
        assert torch.allclose(program.module()(x), ref, atol=1e-5, rtol=0)
        assert program.module()(x[:1]).shape == (1, ref.shape[1])  # the batch is dynamic
    # weights are stored as int8 codes, not float values
    codes = [v for k, v in program.state_dict.items() if k.endswith("_wcodes")]
    assert len(codes) == rep.layers and all(c.dtype == torch.int8 for c in codes)
    assert not [k for k in program.state_dict if k.endswith(".weight") and "norm" not in k]
    assert have_x86_passes()  # the test extras install torchao
    # every GEMM and the patch-embedding convolution become oneDNN int8 kernels under torch.compile
    assert rep.compiled and rep.int8_linear + rep.int8_conv == rep.layers
    assert rep.check["agreement"] == 100.0
    assert rep.check["max_logit_diff"] < 0.05 * float(ref.abs().max())
    # `vitq eval FILE.pt2` runs the file compiled, as a model
    runner = Pt2eModel(f)
    with torch.no_grad():
        assert torch.allclose(runner(x), ref, atol=0.05 * float(ref.abs().max()), rtol=0)


def test_grids_without_a_qdq_form_run_the_simulations_float_ops(w8a8):
    # a power-of-two activation grid, a 6-bit input and 4-bit per-group weights: all exact in the program
    _, x, size = w8a8
    model, _ = tiny_model("deit")
    q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8, rules=[
        LayerRule("blocks.1.mlp.fc1", a_bits=6), LayerRule("blocks.1.mlp.fc2", w_bits=4, w_granularity="per_group")]))
    fc1 = dict(q.named_modules())["blocks.0.mlp.fc1"]
    fc1.in_quant.spec = replace(fc1.in_quant.spec, scheme="pot")
    fc1.in_quant.set_range(torch.tensor(-2.0), torch.tensor(2.0))
    program, simulated = to_program(q, (3, size, size))
    assert simulated == ["blocks.0.mlp.fc1.input"]
    with torch.no_grad():
        assert torch.allclose(program.module()(x), q(x), atol=1e-5, rtol=0)


def test_the_loader_refuses_other_files_and_pickled_entries(w8a8, tmp_path):
    q, _, size = w8a8
    other = tmp_path / "other.pt2"
    other.write_bytes(b"not a zip")
    with pytest.raises(Pt2eError, match="not a .pt2 file written by"):
        load_pt2e(other)
    f = tmp_path / "m.pt2"
    program, _ = to_program(q, (3, size, size))
    buf = tmp_path / "plain.pt2"
    torch.export.save(program, str(buf))  # a torch.export file without vitq.json
    with pytest.raises(Pt2eError, match="not a .pt2 file written by"):
        load_pt2e(buf)
    export_pt2e(q, (3, size, size), f)
    # the same file with one weight marked as a pickle: torch.export.load would unpickle it
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(f) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                first = next(iter(cfg["config"]))
                cfg["config"][first]["use_pickle"] = True
                data = json.dumps(cfg).encode()
            zout.writestr(item, data)
    with pytest.raises(Pt2eError, match="is not raw tensor bytes"):
        load_pt2e(bad)
