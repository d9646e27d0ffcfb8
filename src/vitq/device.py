"""Where vitq computes: ``auto``, ``cpu`` or ``cuda[:N]``, checked before any work.

Every pass runs on the device of the model it is given; :func:`vitq.quantize` moves a copy of the model and
the calibration images there and runs the passes inside ``torch.device(...)``, so tensors the passes create
land beside the model. Random draws that choose calibration samples stay on the CPU (the same seed picks the
same samples on every device); the reconstruction's drop masks use a generator on the model's device.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .quant.config import ConfigError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device a spec names, checked.

    Args:
        spec: ``"auto"`` (or None): CUDA when available (under torchrun, the process's ``LOCAL_RANK`` GPU),
            else the CPU; ``"cpu"``; ``"cuda"`` or ``"cuda:N"``; or a ``torch.device``.

    Returns:
        The device.

    Raises:
        ConfigError: an unknown spec, or a CUDA device this machine does not have (one line, naming it).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {spec!r}: give auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"--device {spec!r}: vitq runs on cpu or cuda[:N] (or auto)")
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"--device {spec}: {why} (torch {torch.__version__}); use --device cpu or auto")
    index = dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (the CPU for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``: itself when it is there already, else a moved copy (the caller's model stays
    where it was)."""
    if model_device(model) == device:
        return model
    import copy

    return copy.deepcopy(model).to(device)
