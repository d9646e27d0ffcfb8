"""The quantization engine: place quantizers (via the family adapter), assign specs from a QuantConfig,
calibrate, and describe the result (per-tensor table, average bits, size, BOPs).

Typical use::

    qmodel = prepare(model, config)           # quantizers placed, float-exact rewrites done
    calibrate(qmodel, config, calib_batches)  # ranges observed, parameters set, quantization on
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..adapters import adapter_for
from ..device import model_device
from .config import ConfigError, QuantConfig, TensorSpec
from .layers import QuantConv2d, QuantLinear, QuantMatMul, TensorQuantizer, to_quant_conv, to_quant_linear

@dataclass
class QuantizedTensor:
    """One row of the per-tensor table."""

    name: str
    layer: str
    kind: str  # weight | activation
    bits: int
    scheme: str
    granularity: str
    range_min: float
    range_max: float
    elements: int  # parameters (weights) or values per image (activations)


def all_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    """Every tensor quantizer of a prepared model, in module order."""
    return [m for m in model.modules() if isinstance(m, TensorQuantizer)]


def weight_layers(model: nn.Module) -> list[QuantLinear | QuantConv2d]:
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def compute_layers(model: nn.Module) -> list[nn.Module]:
    """Layers that do multiply-accumulates: Linear, Conv2d and activation matmuls."""
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))]


def layer_names(model: nn.Module) -> list[str]:
    """Distinct layer names, as config rules see them."""
    seen: dict[str, None] = {}
    for q in all_quantizers(model):
        seen.setdefault(q.layer, None)
    return list(seen)


def check_weights_finite(model: nn.Module) -> None:
    """Refuse to quantize weights holding NaN or inf: every range would be meaningless.

    Raises:
        ValueError: naming the first bad parameter.
    """
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter '{name}' contains NaN or inf; cannot quantize this model")


def prepare(model: nn.Module, config: QuantConfig, inplace: bool = False) -> nn.Module:
    """Place quantizers on every quantizable tensor and assign their specs from ``config``.

    Args:
        model: a float timm model (ViT/DeiT, Swin, EfficientViT or CNN).
        config: the quantization settings.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The prepared model (quantizers off until :func:`calibrate`).

    Raises:
        ConfigError: a bad config, or a rule pattern that matches no layer.
        ValueError: NaN/inf weights, or an unsupported model.
    """
    config.validate()
    check_weights_finite(model)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    device = model_device(model)
    adapter = adapter_for(model)
    adapter.prepare(model)
    names = {m: n for n, m in model.named_modules()}
    placeholder = TensorSpec(bits=8)
    for m in list(model.modules()):
        if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear):
            to_quant_linear(m, names[m], placeholder, placeholder)
        elif isinstance(m, nn.Conv2d) and not isinstance(m, QuantConv2d):
            to_quant_conv(m, names[m], placeholder, placeholder)
    adapter.attach_matmuls(model, names)
    if config.protocol == "full":
        adapter.attach_full(model, names)
    model.to(device)  # the quantizers' buffers go where the weights are
    model.vitq_family = adapter.family
    model.vitq_first_layers = [names[m] for m in adapter.first_layers(model)]
    apply_config(model, config)
    return model


def apply_config(model: nn.Module, config: QuantConfig) -> None:
    """(Re)assign every quantizer's spec from ``config``; quantizers must be recalibrated afterwards.

    Raises:
        ConfigError: a rule pattern that matches no layer.
    """
    config.check_patterns(layer_names(model))
    first = set(getattr(model, "vitq_first_layers", []))
    gelu_grids = ({id(q) for q, _ in adapter_for(model).gelu_inputs(model)}
                  if config.protocol == "full" and config.gelu_token_shift else set())
    for q in all_quantizers(model):
        s = config.layer_settings(q.layer)
        if q.is_weight:
            q.spec = TensorSpec(bits=s["w_bits"], scheme=s["w_scheme"], symmetric=True,
                                granularity=s["w_granularity"], group_size=config.group_size,
                                apot_share=s["w_apot_share"] if s["w_scheme"] == "mixed" else None)
            q.set_apot_channels(None)
        else:
            bits = config.first_layer_a_bits if (q.layer in first and q.role == "input") else s["a_bits"]
            if q.ptf_axis is not None and config.residual_ptf:
                gran = "ptf"
            else:
                gran = "per_tensor"
            q.spec = TensorSpec(bits=bits, scheme="uniform", symmetric=config.a_symmetric and gran == "per_tensor",
                                granularity=gran)
            q.token_shifts = (config.residual_token_shift and gran == "ptf") or id(q) in gelu_grids
            q.set_token_shift(None)
        q.mode = "off"
    for m in weight_layers(model):
        m.refresh()
    model.vitq_config = config


def _as_batches(data) -> Iterable[torch.Tensor]:
    """Images from a DataLoader of Batch, an iterable of tensors / (images, labels), or one tensor."""
    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), 32):
            yield data[i:i + 32]
        return
    for b in data:
        if hasattr(b, "images"):
            yield b.images
        elif isinstance(b, (tuple, list)):
            yield b[0]
        else:
            yield b


@torch.inference_mode()
def calibrate(model: nn.Module, config: QuantConfig, calib_data, progress: bool = True) -> dict:
    """Observe activation ranges on calibration images (in float), then set every quantizer's parameters.

    Weights are calibrated from the weights themselves. Activation statistics come from the float
    model: every quantizer observes while none quantizes, so one pass suffices.

    Returns:
        ``{"n_images", "calibrate_s"}``.

    Raises:
        ValueError: an empty calibration set.
    """
    t0 = time.perf_counter()
    qs = all_quantizers(model)
    acts = [q for q in qs if not q.is_weight]
    for q in acts:
        q.start_observing(config.observer or "minmax", config.seed)
    for m in compute_layers(model):
        m.macs = 0
    n_images = 0
    for images in tqdm(_as_batches(calib_data), desc="calibrate", unit="batch", disable=None if progress else True, leave=False):
        if images.numel() == 0:
            continue
        model(images)
        n_images += len(images)
    if n_images == 0:
        for q in acts:
            q.mode = "off"
        raise ValueError("calibration set is empty: at least one image is needed")
    model.vitq_calib_images = n_images
    for q in acts:
        q.finish_observing(config.percentile, config.mse_objective)
    for m in weight_layers(model):
        m.w_quant.calibrate_weight(m.weight, config.observer or "minmax", config.percentile)
        m.refresh()
    for q in qs:
        q.calls = 0
    return {"n_images": n_images, "calibrate_s": time.perf_counter() - t0}


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch all quantizers between quantizing and pass-through (for A/B comparisons)."""
    for q in all_quantizers(model):
        q.mode = "quant" if enabled else "off"


@contextmanager
def left_in_float(quantizers: Iterable[TensorQuantizer]) -> Iterator[None]:
    """Let the given quantizers pass their tensors through unquantized for a while (sensitivity
    diagnostics), then restore each one's mode."""
    quantizers = list(quantizers)
    modes = [q.mode for q in quantizers]
    for q in quantizers:
        q.mode = "off"
    try:
        yield
    finally:
        for q, mode in zip(quantizers, modes):
            q.mode = mode


def tensor_table(model: nn.Module) -> list[QuantizedTensor]:
    """The per-tensor table: name, kind, bits, scheme, granularity, clip range and size."""
    n_img = max(1, getattr(model, "vitq_calib_images", 1))
    owners = {id(m.w_quant): m for m in weight_layers(model)}
    rows = []
    for q in all_quantizers(model):
        if q.is_weight:
            elements = owners[id(q)].weight.numel()
            gran = q.spec.granularity
        else:
            elements = q.elements // n_img
            # a grid with token shifts says so (ptf+token, per_tensor+token): its steps also depend on the
            # token position
            gran = q.spec.granularity + ("+token" if q.token_shift_or_none is not None else "")
        rows.append(QuantizedTensor(
            name=q.name, layer=q.layer, kind="weight" if q.is_weight else "activation", bits=q.spec.bits,
            scheme=q.spec.scheme, granularity=gran, range_min=float(q.range_min.min()),
            range_max=float(q.range_max.max()), elements=int(elements)))
    return rows


def model_stats(model: nn.Module) -> dict:
    """Average bits, size and BOPs of a calibrated model.

    * ``avg_w_bits``: weight bits weighted by parameter count (quantized Linear/Conv weights).
    * ``avg_a_bits``: activation bits weighted by the number of values per image.
    * ``size_bytes``: quantized weights at their bit-widths, plus one fp32 scale (and zero point for
      asymmetric grids) per channel or group, plus every other parameter (biases, norms, embeddings) in fp32.
    * ``bops``: per image, sum over layers of MACs x weight bits x activation bits (for activation
      matmuls, the two operands' bits).
    """
    n_img = max(1, getattr(model, "vitq_calib_images", 1))
    wl = weight_layers(model)
    quantized_params = {id(m.weight) for m in wl}
    w_bits_sum = w_count = 0
    size_bits = 0
    for m in wl:
        n = m.weight.numel()
        w_bits_sum += n * m.w_quant.spec.bits
        w_count += n
        size_bits += n * m.w_quant.spec.bits + m.w_quant.scale.numel() * 32
    for p in model.parameters():
        if id(p) not in quantized_params:
            size_bits += p.numel() * 32
    a_bits_sum = a_count = 0
    for q in all_quantizers(model):
        if not q.is_weight:
            a_bits_sum += q.elements * q.spec.bits
            a_count += q.elements
    bops = 0
    for m in compute_layers(model):
        if isinstance(m, QuantMatMul):
            bops += m.macs * m.a_quant.spec.bits * m.b_quant.spec.bits
        else:
            bops += m.macs * m.w_quant.spec.bits * m.in_quant.spec.bits
    return {
        "avg_w_bits": w_bits_sum / max(1, w_count),
        "avg_a_bits": a_bits_sum / max(1, a_count),
        "size_bytes": int(size_bits // 8),
        "fp32_size_bytes": int(sum(p.numel() for p in model.parameters()) * 4),
        "bops": int(bops // n_img),
        "macs": int(sum(m.macs for m in compute_layers(model)) // n_img),
    }


def quantize(model: nn.Module, calib_data, config: QuantConfig | None = None, progress: bool = False) -> nn.Module:
    """Quantize a float model: prepare a copy, calibrate it, and return it ready to use.

    Args:
        model: a float timm model.
        calib_data: a DataLoader or any iterable of image batches (or of ``(images, labels)``).
        config: quantization settings (default: W8A8, standard protocol, min-max).
        progress: show a progress bar.

    Returns:
        The quantized ``nn.Module`` (fake-quantized: simulates integer arithmetic exactly in float).
    """
    config = config or QuantConfig()
    qmodel = prepare(model, config)
    calibrate(qmodel, config, calib_data, progress=progress)
    return qmodel


__all__ = [
    "ConfigError", "QuantConfig", "QuantizedTensor", "apply_config", "calibrate", "model_stats", "prepare",
    "quantize", "all_quantizers", "set_quant_enabled", "tensor_table",
]
