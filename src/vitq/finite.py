"""Non-finite values are errors: find the tensor or the layer where NaN or infinity first appears."""
from __future__ import annotations

import torch
from torch import nn


class NonFiniteError(ValueError):
    """NaN or infinity in weights, quantizer parameters or outputs, naming where it first appears."""


def _finite(t) -> bool:
    if isinstance(t, torch.Tensor):
        return not t.is_floating_point() or bool(torch.isfinite(t).all())
    if isinstance(t, (tuple, list)):
        return all(_finite(v) for v in t)
    if isinstance(t, dict):
        return all(_finite(v) for v in t.values())
    return True


def check_state_finite(model: nn.Module, where: str) -> None:
    """Every floating parameter and buffer of ``model`` must be finite.

    Args:
        model: the model (float or prepared).
        where: what the tensors come from (a checkpoint, an artifact), for the message.

    Raises:
        NonFiniteError: naming the first non-finite tensor.
    """
    for name, t in model.state_dict().items():
        if not _finite(t):
            n_bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"{where}: tensor {name} holds {n_bad} NaN or infinite value(s)")


@torch.no_grad()
def first_nonfinite_layer(model: nn.Module, images: torch.Tensor) -> str | None:
    """The name of the first module (in execution order) whose output is not finite on ``images``."""
    found: list[str] = []
    handles = []

    def hook(name):
        def fn(module, args, output):
            if not found and not _finite(output):
                found.append(name)
        return fn

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def nonfinite_message(model: nn.Module, images: torch.Tensor, what: str) -> str:
    """A one-line description of where ``model`` first produces non-finite values on ``images``."""
    if not _finite(images):
        return f"{what}: the input images hold NaN or infinite values"
    layer = first_nonfinite_layer(model, images)
    where = f"first at layer {layer}" if layer else "in its output"
    return f"{what} produces NaN or infinite values, {where}; check the weights (and the checkpoint) of that layer"


@torch.no_grad()
def check_forward_finite(model: nn.Module, images: torch.Tensor, what: str) -> None:
    """Run ``model`` on ``images`` and refuse non-finite outputs, naming the first layer that makes them.

    Raises:
        NonFiniteError: naming the layer.
    """
    if not _finite(model(images)):
        raise NonFiniteError(nonfinite_message(model, images, what))
