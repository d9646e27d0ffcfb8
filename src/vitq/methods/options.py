"""What the passes can be told, with no dependency on torch: :class:`MethodOptions` and the names of the
choices the command line offers (so ``vitq --help`` does not import torch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..quant.config import QuantConfig

SEARCHES = ("greedy", "knapsack")  # Greedy MP's searches (methods/greedy_mp.py)
ROTATION_PARTS = ("fc2", "v", "qk")  # the rotations the rotation pass can search (methods/rotation.py)


@dataclass
class MethodOptions:
    """Which methods run, and their settings. A method left None is off here and decided by the recipe in
    ``vitq.quantize`` (vitq.recipes.DEFAULTS)."""

    sq_b: bool | None = None
    opt_m: bool | None = None
    m_max: int | None = None  # None: max(4, bits - 1) per tensor (optm.default_m_max)
    # vitq's addition: Hadamard rotations of fc2's input (online), of v/proj and of q/k (folded), kept per
    # layer where they lower its quantized output error (methods/rotation.py). Off in a bare MethodOptions;
    # the mptq recipe turns it on where rule R30 adopted it (vitq.recipes.DEFAULTS).
    rotate: bool | None = None
    rotate_parts: tuple = ("fc2", "v", "qk")  # which rotations are searched (rotation.PARTS; "fc2", "v" until R30)
    # vitq's addition: static power-of-two factors on the token positions of fc2's input whose values are
    # massive (ViT-Tiny's four corner patches in block 7), kept where they lower its quantized output error
    # (methods/token_scale.py). Off in a bare MethodOptions; the mptq recipe turns it on where rules R31 and
    # R33 adopted it (vitq.recipes.DEFAULTS).
    token_scale: bool | None = None
    gptq: bool | None = None  # GPTQ weight rounding after calibration (vitq's addition, not in the paper)
    gptq_max_bits: int = 5  # layers with wider weights keep round-to-nearest (docs/methods.md)
    recon: bool | None = None  # block reconstruction of step sizes after GPTQ (vitq's addition)
    # It runs only when the config's default activation bits are at most this: 6 since session 8, chosen on
    # held-out calibration folds by a rule fixed before measuring; on eval968 it then lowered KL everywhere
    # but cost standard-protocol top-1 at W6A6 (docs/lab/results-log.md).
    recon_max_bits: int = 6
    # Adam steps per stage and QDrop probability: the best held-out-calibration KL among the settings
    # that keep the Greedy MP pipeline under 5 minutes (benchmarks/recon_holdout.py; how it was chosen,
    # including what eval968 showed first: docs/methods.md "Block reconstruction").
    recon_iters: int = 50
    recon_drop: float = 0.0

    def recon_applies(self, config: QuantConfig) -> bool:
        return bool(self.recon) and config.a_bits <= self.recon_max_bits

    def recon_kwargs(self) -> dict:
        """The :func:`apply_block_recon` settings these options choose (one place for every caller)."""
        return {"iters": self.recon_iters, "drop_prob": self.recon_drop}

# M2Q's level 1: the shift-add engine's grid per output channel, per layer, or nowhere (vitq.methods.m2q)
M2Q_LEVELS = ("channel", "layer", "none")
