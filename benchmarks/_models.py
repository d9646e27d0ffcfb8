"""Loading shared by the benchmarks: models (with a random-init fallback where weights do not matter) and calib32."""
from __future__ import annotations

from pathlib import Path

import torch

from vitq.data import load_tensors, make_dataset
from vitq.zoo import EvalTransform, LoadedModel, ZooError, load_model


def load_or_random_init(name: str) -> LoadedModel:
    """The zoo model with its local weights, else with random weights (``random_init`` says which).

    Only for benchmarks whose figures do not depend on the weights (latency, sizes, cost); the library
    itself never falls back to random weights.
    """
    try:
        return load_model(name)
    except ZooError:
        return load_model(name, random_init=True)


def module_inputs(model: torch.nn.Module, modules: dict, x: torch.Tensor) -> dict:
    """The first positional input of each of ``modules`` (``key -> module``) in one float forward pass of
    ``x``, under the same keys; the hooks are removed even if the pass fails."""
    inputs: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, key=key: inputs.__setitem__(key, a[0].detach()))
             for key, m in modules.items()]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def load_calib32(assets: Path, transform: EvalTransform) -> torch.Tensor:
    """The fixed calibration split (``assets/calib32.txt`` of ``assets/imagenet-sample``) as one tensor."""
    images, _ = load_tensors(make_dataset(Path(assets) / "imagenet-sample", transform, Path(assets) / "calib32.txt"))
    return images
