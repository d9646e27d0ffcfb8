"""Loading shared by the benchmarks: models (with a random-init fallback where weights do not matter) and calib32."""
from __future__ import annotations

import os
from pathlib import Path

# no model hub here: a missing checkpoint falls back to random weights at once instead of retrying downloads
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from vitq.data import load_tensors, make_dataset, read_list
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
    return load_calib_files(assets, transform, read_list(Path(assets) / "calib32.txt", Path(assets) / "imagenet-sample"))


def alt_split(assets: Path, seed: int, n_calib: int = 32) -> tuple[list[str], list[str]]:
    """A second calibration/evaluation split drawn from eval968 (never calib32): the first ``n_calib`` images of
    a permutation seeded ``seed`` calibrate, the other images (in eval968's order) evaluate.

    Used to test an option on calibration data no earlier run saw (docs/methods.md, rule R30).
    """
    root = Path(assets) / "imagenet-sample"
    files = read_list(Path(assets) / "eval968.txt", root)
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(perm[:n_calib])
    return [files[i] for i in sorted(chosen)], [f for i, f in enumerate(files) if i not in chosen]


def load_calib_files(assets: Path, transform: EvalTransform, files: list[str]) -> torch.Tensor:
    """The given calibration images (paths relative to ``assets/imagenet-sample``) as one tensor."""
    images, _ = load_tensors(make_dataset(Path(assets) / "imagenet-sample", transform, files=files))
    return images
