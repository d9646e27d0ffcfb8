"""What every family adapter provides, and the pieces adapters share.

An adapter is the only place that knows a model family's structure: which modules hold the attention
matmuls, where the residual additions are, which layer sees the raw image, and which float-exact
rewrites (BatchNorm folding, unfused attention) must happen before quantization. The engine itself
only converts every ``nn.Linear`` and ``nn.Conv2d`` by type and never matches names.
"""
from __future__ import annotations

import torch
from torch import nn

from ..device import model_device
from ..quant.config import TensorSpec
from ..quant.layers import QuantMatMul, TensorQuantizer, add_input_quantizer

PLACEHOLDER = TensorSpec(bits=8)  # specs are assigned from the QuantConfig after placement


class QuantAdd(nn.Module):
    """The two inputs of a residual addition ``x + branch`` (full protocol). Has no forward: the block
    applies ``x_quant`` where ``x`` enters (it also feeds the block's norm) and ``b_quant`` to the branch."""

    def __init__(self, name: str, channel_axis: int | None = None):
        super().__init__()
        self.layer_name = name
        self.x_quant = TensorQuantizer(name, "x", PLACEHOLDER)
        self.b_quant = TensorQuantizer(name, "branch", PLACEHOLDER)
        # transformer residual streams are channel-last and get PTF grids (see QuantConfig.residual_ptf)
        self.x_quant.ptf_axis = self.b_quant.ptf_axis = channel_axis


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that compute attention, found by what they are, not by their names: ``nn.MultiheadAttention``,
    and any module that holds a head count (``num_heads`` or ``heads``, as every timm attention does). A model
    with such modules is a transformer or a hybrid: only an adapter that places quantizers on their matmuls
    may take it."""
    found = []
    for m in model.modules():
        heads = getattr(m, "num_heads", getattr(m, "heads", None))
        if m is not model and (isinstance(m, nn.MultiheadAttention)
                               or (isinstance(heads, int) and not isinstance(heads, bool))):
            found.append(m)
    return found


ATTENTION_OPS = ("matmul", "bmm", "baddbmm", "einsum", "__matmul__", "__rmatmul__", "softmax",
                 "scaled_dot_product_attention")


def attention_ops(model: nn.Module, input_size: tuple[int, ...], skip: tuple[type, ...] = ()) -> dict[str, int]:
    """The attention operations one forward pass of ``model`` runs, by what they compute: softmax, and
    matmuls whose operands are both activations (a weight is a Parameter). Ops inside modules of type
    ``skip`` (e.g. ``QuantMatMul``) are not counted.

    Returns:
        op name -> calls on one random image.
    """
    from torch.overrides import TorchFunctionMode

    depth = [0]
    found: dict[str, int] = {}

    class _Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if depth[0] == 0 and name in ATTENTION_OPS and (
                    "softmax" in name or not any(isinstance(a, nn.Parameter) for a in args)):
                found[name] = found.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    hooks = [h for m in model.modules() if skip and isinstance(m, skip)
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.inference_mode(), _Record():
            model(torch.randn(1, *input_size, device=model_device(model)))
    finally:
        for h in hooks:
            h.remove()
    return found


class Adapter:
    """Base class of the family adapters. Subclasses override what their family needs."""

    family: str = ""

    def applies_to(self, model: nn.Module) -> bool:
        """Whether this adapter understands ``model`` (by its class, never by parameter names)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        """Float-exact rewrites before quantization (e.g. fold BatchNorm, use the unfused attention path)."""

    def first_layers(self, model: nn.Module) -> list[nn.Module]:
        """Layers that see the raw image; their input stays at ``first_layer_a_bits`` (8)."""
        return []

    def attach_matmuls(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        """Put :class:`~vitq.quant.layers.QuantMatMul` modules on every activation x activation matmul."""

    def attach_full(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        """Full protocol: quantize the inputs of nonlinearities, norms and residual additions."""

    def two_region_targets(self, model: nn.Module) -> list[tuple[TensorQuantizer, bool]]:
        """Quantizers of skewed activations for OPT-m's two-region grid: ``(quantizer, signed_fine)``
        (post-GELU values dip below zero: signed fine region; post-softmax values do not)."""
        return []

    def gelu_inputs(self, model: nn.Module) -> list[tuple[TensorQuantizer, nn.GELU]]:
        """Full protocol: the quantizers of GELU inputs, each with the GELU it feeds.

        OPT-m's ``nonlin_objective="output"`` clips them on the GELU *output*'s error. Every family that
        quantizes a GELU's input does so through the module's ``in_quant`` (``quantize_inputs_of``), so
        this default finds them by module type for ViT/DeiT, Swin and any other family.
        """
        return [(m.in_quant, m) for m in model.modules() if isinstance(m, nn.GELU) and hasattr(m, "in_quant")]

    def softmax_inputs(self, model: nn.Module) -> list[TensorQuantizer]:
        """Full protocol: the quantizers of softmax inputs (each softmax over the last axis).

        OPT-m's ``softmax_objective="output"`` clips them on the softmax output's error. This default finds
        the inputs of ``nn.Softmax`` modules (Swin); families that call ``Tensor.softmax`` override it.
        """
        return [m.in_quant for m in model.modules() if isinstance(m, nn.Softmax) and hasattr(m, "in_quant")]

    def trunk(self, model: nn.Module):
        """``(stem, blocks, head)`` callables if the model is a plain sequence of blocks (lets searches
        re-run only the blocks after a change; block reconstruction tunes one step at a time), else None.
        ``blocks`` are modules whose outputs are channels-last token tensors ([B, N, C] or [B, H, W, C])."""
        return None

    def norm_linear_pairs(self, model: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
        """(LayerNorm, Linear) pairs where the Linear's only input is the norm's output (for SQ-b)."""
        return []

    def post_gelu_linears(self, model: nn.Module) -> list[nn.Linear]:
        """Linears whose input is a GELU output (MLP fc2): where rotation and token scaling act."""
        return []

    def qkv_attentions(self, model: nn.Module) -> list[nn.Module]:
        """Self-attention modules with a fused ``qkv`` Linear (output laid out as [3, heads, head_dim]),
        ``num_heads``, and a ``proj`` Linear fed by the heads' concatenated outputs, with nothing between
        ``qkv`` and the q/k matmul or between the attention output and ``proj`` that a per-channel factor
        would not pass through (the q/k and v/proj rotations, ``methods/rotation.py``)."""
        return []


def morph(module: nn.Module, cls: type) -> nn.Module:
    """Give ``module`` a subclass of its class that overrides ``forward`` (parameters and names kept)."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls
    return module


def add_qk_av_matmuls(attn: nn.Module, name: str) -> None:
    """Give an attention module its two quantized matmuls: ``matmul_qk`` (q, k) and ``matmul_av`` (softmax
    output, v); the family's forward calls them."""
    attn.matmul_qk = QuantMatMul(f"{name}.matmul_qk", "q", "k", PLACEHOLDER, PLACEHOLDER)
    attn.matmul_av = QuantMatMul(f"{name}.matmul_av", "attn", "v", PLACEHOLDER, PLACEHOLDER)


def quantize_inputs_of(model: nn.Module, names: dict[nn.Module, str], types: tuple[type, ...],
                       skip: set[int] = frozenset(), ptf_axis: int | None = None) -> int:
    """Add an input quantizer to every module of the given types (full protocol). Returns how many."""
    n = 0
    for m in list(model.modules()):
        if isinstance(m, types) and id(m) not in skip and not hasattr(m, "in_quant"):
            add_input_quantizer(m, names[m], PLACEHOLDER).ptf_axis = ptf_axis
            n += 1
    return n


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the preceding convolution (exact in real arithmetic).

    ``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` becomes a conv with
    ``W' = W * gamma / sqrt(var + eps)`` and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
    Quantizing the folded weight is what an integer accelerator runs.
    """
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(factor)
    new_bias = (bias - bn.running_mean) * factor + beta
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def bn_remainder(bn: nn.Module) -> nn.Module:
    """What is left of a (possibly activation-fused) BatchNorm once folded: its activation, or nothing."""
    act = getattr(bn, "act", None)  # timm's BatchNormAct2d: BN -> drop -> act
    return act if isinstance(act, nn.Module) else nn.Identity()
