"""Hadamard rotations of the fc2 and proj inputs (vitq's addition, not in MPTQ-ViT).

An orthogonal ``R`` leaves a Linear unchanged in float, ``x W^T = (x R)(W R)^T``, while it spreads a few
large channels of ``x`` (and of ``W``'s columns) over many, so a per-tensor activation grid and a
per-output-channel weight grid both lose less (the incoherence argument of QuIP / QuaRot). ``R`` here is
a block-diagonal Hadamard matrix with random signs, ``R = diag(s) blockdiag(H_b, ..., H_b) / sqrt(b)``
(``b`` the largest power of two dividing the width): ``O(n log b)`` additions per token in hardware.

* **fc2** (the post-GELU input, the costliest tensor at W4A4 in docs/lab/results-log.md session 9): GELU is not
  linear, so ``R`` cannot be folded into fc1; it runs online, as a forward pre-hook on fc2 in front of
  its input quantizer (``x -> x R``), and ``W_fc2`` becomes ``W_fc2 R``. In integer hardware this is a
  butterfly of additions and subtractions on GELU's output before it is requantized to fc2's width:
  ``n log2 b`` adds per token (768 x 8 for DeiT/ViT-Tiny, about 4 % of fc2's 147k MACs per token); the
  accelerator cost model (``hardware/``) does not count it.
* **v / proj** (the attention output): per head, ``R_h`` acts on the head dimension. ``softmax(.) V``
  is linear in ``V``, so ``V R_h`` gives an attention output ``O_h R_h``, and proj takes ``W_proj R``:
  folded into the v rows of ``qkv`` (``W_v <- R^T W_v``, ``b_v <- b_v R``) and into proj's columns,
  nothing runs at inference. Both v (the ``matmul_av`` operand) and proj's input are rotated.
* **q / k** (the ``matmul_qk`` operands; part ``qk``, session 20, not in the default parts): per head, the
  same ``R_h`` on q and k leaves ``q k^T`` unchanged (``R_h R_h^T = I``), folded into the q and k rows of
  ``qkv`` as for v; nothing runs at inference.

Chosen per layer: a rotation is kept only where it lowers that layer's quantized output error on the
calibration images, ``||Q(x R) Q(W R)^T - x W^T||^2`` against ``||Q(x) Q(W)^T - x W^T||^2`` (per-channel
min-max weights at the config's ``w_bits``; activations at ``a_bits`` with the best clip of OPT-m's grid,
and for fc2 also OPT-m's two-region grid, as OPT-m will choose later). For q/k the error is that of the
attention logits of every pair of sampled tokens, head by head, ``||Q(q R) Q(k R)^T - q k^T||^2``, each
operand per tensor at ``a_bits`` with its best clip of OPT-m's grid on its own error.
Needs widths with a power-of-two factor of at least :data:`MIN_BLOCK`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..adapters import adapter_for
from ..quant import quantizers as Q
from ..quant.config import QuantConfig
from .optm import search_uniform_clip
from .capture import collect_inputs, output_fn, quant_weight
from .options import ROTATION_PARTS
from .sqb import _two_region_output_mse

MIN_BLOCK = 16  # a Hadamard block narrower than this spreads too little to be worth a transform


def block_size(n: int) -> int:
    """The largest power of two that divides ``n`` (the Hadamard block of an ``n``-wide tensor)."""
    return n & -n


def random_signs(n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` signs +-1 from a seeded generator (the same seed gives the same rotation on every device)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, device="cpu")
    return torch.where(u < 0.5, -1.0, 1.0).to(device)


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two), entries +-1, symmetric."""
    h = torch.ones(1, 1, device="cpu")
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """``x R`` along the last dimension, ``R = diag(signs) blockdiag(H_block) / sqrt(block)``.

    ``H_block`` is Sylvester's Hadamard matrix (symmetric, entries +-1). Since ``H_(2^k) = H_(2^a) kron
    H_(2^b)`` (``a + b = k``), each block of ``x`` is reshaped to a ``2^a x 2^b`` matrix ``X`` and mapped to
    ``H_(2^a) X H_(2^b)``: two matrix products, which a CPU runs faster than the ``log2(block)``-stage
    butterfly of additions that hardware would run (the same values up to float rounding; the W4A4 builds
    of docs/lab/results-log.md session 19 took 166-168 s with this form, 180-187 s with the butterfly).
    """
    # Shapes are traced values while ONNX export traces the model (which ran untraced before), so the check
    # runs outside tracing only.
    if not torch.jit.is_tracing() and (x.shape[-1] != signs.shape[0] or x.shape[-1] % block
                                       or block & (block - 1)):
        raise ValueError(f"Hadamard block {block} must be a power of two dividing the width {x.shape[-1]}, "
                         f"and the width must equal the {signs.shape[0]} signs")
    k = block.bit_length() - 1
    rows, cols = 1 << (k // 2), 1 << (k - k // 2)
    h_rows, h_cols = _sylvester(rows).to(x.device, x.dtype), _sylvester(cols).to(x.device, x.dtype)
    # For even k, 1/sqrt(block) = 2^(-k/2) is a power of two: scaling H_cols by it instead of the result
    # gives the same floats (scaling by 2^j commutes with rounding) and saves a pass over x.
    exact = k % 2 == 0
    if exact:
        h_cols = h_cols / (1 << (k // 2))
    # X H_cols as one tall matrix product, then H_rows X; torch folds ``h_rows @ y`` into the same tall
    # product on the transposes (H is symmetric) without copying them: two large GEMMs, which a CPU runs
    # faster than a batch of small ones (bit-identical to the explicit transposes used until session 29,
    # tests/methods/test_rotation.py).
    y = h_rows @ ((x * signs).reshape(-1, rows, cols) @ h_cols)
    y = y.reshape(x.shape)
    return y if exact else y / math.sqrt(block)


def rotation_matrix(signs: torch.Tensor, block: int) -> torch.Tensor:
    """The orthogonal matrix ``R`` of :func:`hadamard_transform` (``x R`` for row vectors ``x``)."""
    return hadamard_transform(torch.eye(len(signs), dtype=signs.dtype, device=signs.device), signs, block)


def _rotate_input(module: nn.Module, args):
    # runs before forward, so before QuantLinear's input quantizer: the quantizer sees x R
    return (hadamard_transform(args[0], module.hadamard_signs, module.hadamard_block_size),) + tuple(args[1:])


def restore_input_rotation(linear: nn.Module, signs: torch.Tensor, block: torch.Tensor | int) -> None:
    """(Re)attach the online rotation with saved buffers (artifact loading); the weight is already ``W R``."""
    linear.register_buffer("hadamard_signs", signs.clone())
    linear.register_buffer("hadamard_block", torch.as_tensor(block, dtype=torch.int64, device=signs.device).reshape(1).clone())
    linear.hadamard_block_size = int(block)  # the hook's copy, so that tracing sees a constant
    linear.register_forward_pre_hook(_rotate_input)


@torch.no_grad()
def attach_input_rotation(linear: nn.Linear, signs: torch.Tensor, block: int) -> None:
    """Rotate ``linear``'s input online and its weight columns by the same ``R`` (exact in real arithmetic)."""
    linear.weight.copy_(hadamard_transform(linear.weight, signs, block))  # rows of W times R: W R
    restore_input_rotation(linear, signs, block)


def restore_rotations(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Re-create the online rotations that a saved state dict holds buffers for."""
    modules = dict(model.named_modules())
    for key in state:
        if key.endswith(".hadamard_signs"):
            name = key[: -len(".hadamard_signs")]
            restore_input_rotation(modules[name], state[key], state[name + ".hadamard_block"])


@torch.no_grad()
def fold_v_rotation(attn: nn.Module, signs: torch.Tensor, block: int) -> None:
    """Rotate v per head inside ``qkv`` (``W_v <- R^T W_v``, ``b_v <- b_v R``) and proj's columns (``W R``).

    ``block`` divides the head dimension, so ``R`` is block-diagonal within heads and ``softmax(.) (V R)``
    equals ``(softmax(.) V) R`` head by head.
    """
    qkv, proj = attn.qkv, attn.proj
    dim = qkv.weight.shape[0] // 3
    w_v = qkv.weight[2 * dim:]
    # R^T W_v = (W_v^T R)^T: rotate the columns of W_v^T
    qkv.weight[2 * dim:] = hadamard_transform(w_v.T.contiguous(), signs, block).T
    if qkv.bias is not None:
        qkv.bias[2 * dim:] = hadamard_transform(qkv.bias[2 * dim:], signs, block)
    proj.weight.copy_(hadamard_transform(proj.weight, signs, block))


@torch.no_grad()
def fold_qk_rotation(attn: nn.Module, signs: torch.Tensor, block: int) -> None:
    """Rotate q and k per head by the same ``R`` inside ``qkv`` (``W <- R^T W``, ``b <- b R`` on both).

    ``block`` divides the head dimension, so ``(q R)(k R)^T = q k^T`` head by head.
    """
    qkv = attn.qkv
    dim = qkv.weight.shape[0] // 3
    for part in (slice(0, dim), slice(dim, 2 * dim)):
        qkv.weight[part] = hadamard_transform(qkv.weight[part].T.contiguous(), signs, block).T
        if qkv.bias is not None:
            qkv.bias[part] = hadamard_transform(qkv.bias[part], signs, block)


@dataclass
class RotationLayer:
    """One layer's choice: rotated or not, and the quantized output MSE of both."""

    name: str
    kind: str  # "fc2" (online), "v/proj" or "q/k" (folded)
    rotated: bool
    mse_before: float
    mse_rotated: float


@dataclass
class RotationResult:
    layers: list[RotationLayer] = field(default_factory=list)

    def to_dict(self) -> list[dict]:
        return [vars(layer) for layer in self.layers]


def _output_mse(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, a_bits: int, w_bits: int,
                two_region: bool, factor: torch.Tensor | None = None) -> float:
    """Least ``||Q(x) Q(w)^T - ref||^2`` over OPT-m's uniform clips (and its two-region grids); with ``factor``
    (a ``[rows, 1]`` column, token scaling's) each row of ``Q(x) Q(w)^T`` is multiplied by it first."""
    # each clip scored against the float output
    best = search_uniform_clip(x, a_bits, output_fn(quant_weight(w, w_bits), factor), ref=ref)[2]
    if two_region:
        best = min(best, _two_region_output_mse(x, w, ref, a_bits, w_bits, factor))
    return best


def _logit_mse(x: torch.Tensor, w_qk: torch.Tensor, b_qk: torch.Tensor | None, heads: int, a_bits: int,
               signs: torch.Tensor | None, block: int) -> float:
    """Quantized attention-logit MSE over all pairs of the sampled tokens, per head, q and k rotated
    by ``R`` when ``signs`` is given (each operand per tensor at ``a_bits``, best clip on its own error)."""
    qk = x @ w_qk.T + (b_qk if b_qk is not None else 0)
    dim = qk.shape[1] // 2
    q, k = qk[:, :dim], qk[:, dim:]
    if signs is not None:
        q, k = hadamard_transform(q, signs, block), hadamard_transform(k, signs, block)
    quant = []
    for t in (q, k):
        lo, hi, _ = search_uniform_clip(t, a_bits)
        s, z = Q.uniform_params(torch.tensor(lo, device=t.device), torch.tensor(hi, device=t.device), a_bits, False)
        quant.append(Q.fake_quant_uniform(t, s, z, *Q.int_range(a_bits, False)))
    err = 0.0
    for h in range(heads):
        cols = slice(h * dim // heads, (h + 1) * dim // heads)
        err += (quant[0][:, cols] @ quant[1][:, cols].T - q[:, cols] @ k[:, cols].T).pow(2).mean().item()
    return err / heads


PARTS = ROTATION_PARTS


def apply_rotation(model: nn.Module, calib: torch.Tensor, config: QuantConfig, max_images: int = 8,
                   max_rows: int = 2048, seed: int = 0, progress: bool = True,
                   parts: tuple[str, ...] = ("fc2", "v")) -> RotationResult:
    """Rotate fc2's input (online), v/proj and q/k (folded) wherever that lowers the quantized error.

    Args:
        model: float model (modified in place; its outputs stay equal up to rounding).
        calib: calibration images; the first ``max_images`` are used.
        config: the default widths at which both choices are scored (``a_bits`` for the inputs,
            ``w_bits`` for the weights).
        max_images: images used for the search.
        max_rows: token rows per layer used for the search (a seeded subset when the images have more).
        seed: seeds the random signs (one draw per layer, so the same seed gives the same model).
        progress: show a progress bar.
        parts: which rotations are searched, of :data:`PARTS` (``fc2``, ``v`` for v/proj, ``qk``).

    Returns:
        Per layer, whether it was rotated and the quantized output MSE with and without the rotation.

    Raises:
        ValueError: an unknown part.
    """
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"unknown rotation part(s) {bad}; choose from {list(PARTS)}")
    adapter = adapter_for(model)
    names = {m: n for n, m in model.named_modules()}
    # (kind, module named in the report, Linear whose input is collected, Hadamard block)
    todo = [("fc2", m, m, block_size(m.in_features)) for m in adapter.post_gelu_linears(model)
            if "fc2" in parts and not hasattr(m, "hadamard_signs")]
    head_block = {a: block_size(a.qkv.weight.shape[0] // 3 // a.num_heads) for a in adapter.qkv_attentions(model)}
    todo += [("v/proj", a, a.proj, b) for a, b in head_block.items() if "v" in parts]
    # q/k: the qkv input gives q and k
    todo += [("q/k", a, a.qkv, b) for a, b in head_block.items() if "qk" in parts]
    todo = [t for t in todo if t[3] >= MIN_BLOCK]
    result = RotationResult()
    if not todo:
        return result
    inputs = collect_inputs(model, [lin for _, _, lin, _ in todo], calib[:max_images], max_rows)
    for k, ((kind, owner, lin, block), x) in enumerate(tqdm(list(zip(todo, inputs)), desc="rotation search",
                                                              disable=None if progress else True, leave=False)):
        w = lin.weight.detach().float()
        if kind == "q/k":
            dim = w.shape[0] // 3
            w_qk = w[: 2 * dim]
            b_qk = lin.bias.detach().float()[: 2 * dim] if lin.bias is not None else None
            signs = random_signs(dim, seed * 100003 + k, x.device)
            before = _logit_mse(x, w_qk, b_qk, owner.num_heads, config.a_bits, None, block)
            after = _logit_mse(x, w_qk, b_qk, owner.num_heads, config.a_bits, signs, block)
        else:
            signs = random_signs(x.shape[-1], seed * 100003 + k, x.device)
            ref = x @ w.T
            before = _output_mse(x, w, ref, config.a_bits, config.w_bits, kind == "fc2")
            after = _output_mse(hadamard_transform(x, signs, block), hadamard_transform(w, signs, block), ref,
                                config.a_bits, config.w_bits, kind == "fc2")
        rotated = after < before
        if rotated:
            if kind == "fc2":
                attach_input_rotation(lin, signs, block)
            elif kind == "v/proj":
                fold_v_rotation(owner, signs, block)
            else:
                fold_qk_rotation(owner, signs, block)
        result.layers.append(RotationLayer(names[owner], kind, rotated, before, after))
    return result
