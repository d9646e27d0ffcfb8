"""Devices: --device is checked before any work, and every pass keeps its tensors on the model's device.

CI has no GPU. What a GPU run needs can still be checked on the CPU: every tensor a pass makes must be placed
beside the data it works on, never on the process's default device. Running the passes under
``torch.device("meta")`` makes any tensor created without an explicit device a meta tensor, and the first
operation that mixes it with the CPU model fails; a pass that passes here places its tensors explicitly, as
it must for CUDA. (benchmarks/device_check.py runs the real CPU-against-CUDA comparison on a GPU.)
"""
from __future__ import annotations

import pytest
import torch

import vitq
from vitq.api import CostBudget
from vitq.device import model_device, resolve_device, to_device
from vitq.evaluation import evaluate
from vitq.methods.greedy_mp import Budget
from vitq.quant.config import ConfigError, QuantConfig

from conftest import tiny_images, tiny_model

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def test_cpu_and_auto_resolve_on_a_machine_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@needs_no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line_naming_the_option(spec):
    with pytest.raises(ConfigError, match=rf"--device {spec}: .*use --device cpu or auto"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["tpu", "gpu0", "mps"])
def test_unknown_devices_are_refused(spec):
    with pytest.raises(ConfigError, match="--device"):
        resolve_device(spec)


def test_to_device_never_moves_the_callers_model():
    model, _ = tiny_model("deit")
    assert to_device(model, torch.device("cpu")) is model
    moved = to_device(model, torch.device("meta"))
    assert moved is not model and model_device(moved).type == "meta" and model_device(model).type == "cpu"


CASES = {
    "deit-w4a4": ("deit", dict(config=QuantConfig(w_bits=4, a_bits=4))),  # SQ-b, rotation, OPT-m, GPTQ, recon
    "deit-greedy-mp": ("deit", dict(budget=Budget(w_bits=5, a_bits=6))),  # banks, probes, knapsack
    "swin-full": ("swin", dict(config=QuantConfig(w_bits=4, a_bits=4, protocol="full"))),
    "efficientvit-m2q": ("efficientvit", dict(recipe="m2q", budget=CostBudget(fraction=0.6))),
    "cnn-w4a8": ("cnn", dict(config=QuantConfig(w_bits=4, a_bits=8))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_pass_places_its_tensors_beside_the_model(case):
    family, kwargs = CASES[case]
    model, size = tiny_model(family)
    x, labels = tiny_images(size, n=8), torch.zeros(8, dtype=torch.long)
    with torch.device("meta"):  # a tensor made without an explicit device lands here, and mixing it fails
        res = vitq.quantize(model, x, progress=False, **kwargs)
        out = evaluate(res.model, (x, labels), reference=model, progress=False)
    assert all(t.device.type == "cpu" for t in res.model.state_dict().values())
    assert out.n_images == len(x) and out.agreement is not None


def test_the_default_device_does_not_change_the_model():
    model, size = tiny_model("deit")
    x = tiny_images(size, n=8)
    a = vitq.quantize(model, x, QuantConfig(w_bits=4, a_bits=4), progress=False, device="cpu").model.state_dict()
    with torch.device("meta"):
        b = vitq.quantize(model, x, QuantConfig(w_bits=4, a_bits=4), progress=False).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
