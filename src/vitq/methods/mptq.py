"""The MPTQ-ViT pipeline: optional SQ-b, calibration, optional OPT-m, optional GPTQ, optional block
reconstruction (Greedy MP builds on it)."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant.config import QuantConfig
from ..quant.engine import calibrate, prepare
from .attn_smooth import apply_attn_smooth
from .gptq import apply_gptq
from .optm import apply_optm
from .recon import apply_block_recon
from .rotation import apply_rotation
from .sqb import apply_sqb
from .token_scale import apply_token_scale


# Rule R30 (docs/methods.md, session 22): single-precision `--method mptq` (no budget, no saved config) rotates
# in the standard protocol at activation widths up to this many bits. Single precision in the full protocol was
# never decided on, so it keeps rotation off unless asked.
ROTATE_DEFAULT_MAX_BITS = 6
# Rule R37 (docs/methods.md, session 27): standard-protocol Greedy MP (`--method mptq` with a budget, or a
# config it saved) at base widths up to this many bits rotates, scales fc2's massive token positions, and keeps
# its searched assignment (no uniform fallback: R36 failed where the fallback, scored on round-to-nearest
# weights, replaced the knapsack's assignment with a uniform one that was worse on the evaluation images).
MIXED_DEFAULT_MAX_BITS = 6
# Rule R38 (docs/methods.md, session 28): full-protocol Greedy MP at base widths up to this many bits rotates and
# keeps its searched assignment too (token scaling was already on there by R33, with the GELU token shifts). Both
# 5-bit cells passed; DeiT-Tiny's 6-bit cell missed the KL criterion (-1.96 SE), so by the rule's own clause the
# change applies up to 5 bits only.
FULL_MIXED_DEFAULT_MAX_BITS = 5


def mptq_rotates(config: QuantConfig, single: bool = True) -> bool:
    """Whether ``--method mptq`` rotates by default for ``config`` (rules R30, R37 and R38).

    Args:
        config: the quantization config (its protocol and default activation width decide).
        single: single precision (no mixed-precision budget, no ``--config`` file).

    Returns:
        Single precision: True in the standard protocol at activation widths up to
        :data:`ROTATE_DEFAULT_MAX_BITS` (R30). A budget or a saved config (whose base width counts): True at
        base widths up to :data:`MIXED_DEFAULT_MAX_BITS` in the standard protocol (R37) and
        :data:`FULL_MIXED_DEFAULT_MAX_BITS` in the full protocol (R38).
    """
    if single:
        return _standard_up_to(config, ROTATE_DEFAULT_MAX_BITS)
    return _mixed_scope(config)


# Rule R31 (docs/methods.md, session 23): single-precision `--method mptq` also scales the massive token
# positions of fc2's input, in the same scope as R30's rotation. Rule R33 (session 24): in the full protocol it
# does so, single-precision and Greedy MP, wherever the GELU inputs have token shifts (one without the other
# measured worse, docs/methods.md), which `--method mptq` gave them at activation widths up to 6 bits; rule R47
# (session 32) extended that to every width, so full W8A8 gets them too.
TOKEN_SCALE_DEFAULT_MAX_BITS = 6


def mptq_token_scales(config: QuantConfig, single: bool = True) -> bool:
    """Whether ``--method mptq`` uses token scaling by default for ``config`` (rules R31 and R33).

    Args:
        config: the quantization config (its protocol, default activation width and GELU token shifts decide).
        single: single precision (no mixed-precision budget, no ``--config`` file).

    Returns:
        Full protocol: True where the config gives the GELU inputs token shifts (R33, with or without a
        budget). Standard protocol: True at activation widths up to :data:`TOKEN_SCALE_DEFAULT_MAX_BITS`
        (R31, single precision) or :data:`MIXED_DEFAULT_MAX_BITS` (R37, a budget or a saved config).
    """
    if config.protocol == "full":
        return config.gelu_token_shift
    return _standard_up_to(config, TOKEN_SCALE_DEFAULT_MAX_BITS if single else MIXED_DEFAULT_MAX_BITS)


def mptq_uniform_fallback(config: QuantConfig, fallback_gptq: bool = False) -> bool:
    """Whether Greedy MP under ``--method mptq`` tries the uniform fallback by default (rules R37 and R38).

    Args:
        config: the quantization config at the search's base widths (its protocol and activation width decide).
        fallback_gptq: ``--fallback-gptq`` was given; it asks for the fallback, so it turns it on.

    Returns:
        False at base widths up to :data:`MIXED_DEFAULT_MAX_BITS` in the standard protocol (R37) and
        :data:`FULL_MIXED_DEFAULT_MAX_BITS` in the full protocol (R38), where the searched assignment is
        kept, unless ``fallback_gptq``; True elsewhere.
    """
    return fallback_gptq or not _mixed_scope(config)


def mptq_gelu_token_shifts(config: QuantConfig) -> bool:
    """Whether ``--method mptq`` gives the GELU inputs token shifts by default for ``config`` (rules R33, R47).

    Args:
        config: the quantization config (its protocol decides).

    Returns:
        True in the full protocol, at every activation width (R33 up to 6 bits, R47 at 7 and 8),
        single-precision or with a mixed-precision budget; the standard protocol has no GELU-input grid.
    """
    return config.protocol == "full"


def _standard_up_to(config: QuantConfig, max_bits: int) -> bool:
    """The scope rules R30, R31 and R37 adopted their options in: standard protocol, at most ``max_bits`` activation bits."""
    return config.protocol == "standard" and config.a_bits <= max_bits


def _mixed_scope(config: QuantConfig) -> bool:
    """Where Greedy MP under ``--method mptq`` rotates and keeps its assignment: rules R37 (standard) and R38 (full)."""
    if config.protocol == "full":
        return config.a_bits <= FULL_MIXED_DEFAULT_MAX_BITS
    return _standard_up_to(config, MIXED_DEFAULT_MAX_BITS)


@dataclass
class MethodOptions:
    """Which methods run, and OPT-m's largest ratio exponent."""

    sq_b: bool = False
    opt_m: bool = False
    m_max: int | None = None  # None: max(4, bits - 1) per tensor (optm.default_m_max)
    optm_grid: str = "standard"  # OPT-m's two-region candidates: a key of optm.GRIDS
    # OPT-m also searches the full protocol's PTF residual-stream steps (optm.search_ptf): on since session
    # 11, chosen on held-out calibration folds by rule R9, written before its run (docs/methods.md, OPT-m).
    optm_ptf: bool = True
    # What that search minimizes, a name in optm.PTF_OBJECTIVES: "normalized" (the error as the next
    # LayerNorm sees it, to first order) since session 12, by rule R10 on held-out calibration folds,
    # written before its run (docs/methods.md, OPT-m); "tensor" is the grid's own squared error.
    optm_ptf_objective: str = "normalized"
    # Full protocol: how OPT-m clips GELU inputs, a name in optm.NONLIN_OBJECTIVES: "tensor" (r·[min, max]
    # on their own error) or "output" (both ends searched apart on the GELU output's error; session 16,
    # rule R19 in docs/methods.md decides the default)
    optm_nonlin_objective: str = "tensor"
    # Full protocol: how OPT-m clips softmax inputs, a name in optm.NONLIN_OBJECTIVES: "tensor" (their own
    # error) or "output" (the softmax output's error; session 31, rule R45 in docs/methods.md decides)
    optm_softmax_objective: str = "tensor"
    # OPT-m also tries the log2 grid on post-softmax values (optm.search_log2) and keeps it where its output
    # error is lower (vitq's addition, session 21); rule R28 in docs/methods.md decides the default
    optm_log2: bool = False
    sq_b_unnormed: bool = False  # SQ-b also on proj/fc2, as an explicit per-channel operation
    sq_b_gelu: bool = False  # SQ-b's scale-only form on fc2's post-GELU input (explicit per-channel scale)
    # vitq's addition: float-exact smoothing of q/k and v/proj inside attention, folded into qkv and proj
    # (methods/attn_smooth.py); decided by rule R18 on held-out calibration folds (docs/methods.md)
    attn_smooth: bool = False
    attn_smooth_parts: tuple = ("qk", "v")  # which of its two transforms run (a diagnostic)
    # vitq's addition: Hadamard rotations of fc2's input (online), of v/proj and of q/k (folded), kept per
    # layer where they lower its quantized output error (methods/rotation.py). Off in a bare MethodOptions;
    # `--method mptq` turns it on where rule R30 adopted it (mptq_rotates below, docs/methods.md).
    rotate: bool = False
    rotate_parts: tuple = ("fc2", "v", "qk")  # which rotations are searched (rotation.PARTS; "fc2", "v" until R30)
    # vitq's addition: static power-of-two factors on the token positions of fc2's input whose values are
    # massive (ViT-Tiny's four corner patches in block 7), kept where they lower its quantized output error
    # (methods/token_scale.py). Off in a bare MethodOptions; `--method mptq` turns it on where rules R31 and R33
    # adopted it (mptq_token_scales above, docs/methods.md).
    token_scale: bool = False
    gptq: bool = False  # GPTQ weight rounding after calibration (vitq's addition, not in the paper)
    gptq_max_bits: int = 5  # layers with wider weights keep round-to-nearest (docs/methods.md)
    # asymmetric calibration strength (GPTAQ's alpha; 0 = plain GPTQ): fit each layer to its float path's
    # output (gptq.apply_gptq); off: rules R39 and R42 in docs/methods.md found no gain
    gptq_asym: float = 0.0
    # GPTQ's diagonal damping as a fraction of mean(diag(H)); 0.1 and 0.001 failed rules R40 and R41
    gptq_damp: float = 0.01
    recon: bool = False  # block reconstruction of step sizes after GPTQ (vitq's addition)
    # It runs only when the config's default activation bits are at most this: 6 since session 8, chosen on
    # held-out calibration folds by a rule fixed before measuring; on eval968 it then lowered KL everywhere
    # but cost standard-protocol top-1 at W6A6 (docs/methods.md "Block reconstruction", docs/results.md).
    recon_max_bits: int = 6
    # Adam steps per stage and QDrop probability: the best held-out-calibration KL among the settings
    # that keep the Greedy MP pipeline under 5 minutes (benchmarks/recon_holdout.py; how it was chosen,
    # including what eval968 showed first: docs/methods.md "Block reconstruction").
    recon_iters: int = 50
    recon_drop: float = 0.0
    recon_ptf: bool = True  # also learn the PTF grids' step multipliers (full protocol's residual stream)
    recon_flip: bool = False  # also fit the mirrored calibration images
    recon_float_lr: float = 0.0  # > 0: also learn the stage's biases and LayerNorm affines at this rate
    # > 0: after the blocks, this many Adam steps on the whole model's logit KL from FP (recon.py); decided
    # by rule R15 on held-out calibration folds, written before its run (docs/methods.md).
    recon_e2e_iters: int = 0
    # Only layers with at most this many weight bits learn their weight scales in reconstruction (8 = all);
    # rule R23 in docs/methods.md decides the default.
    recon_wscale_max_bits: int = 8

    def recon_applies(self, config: QuantConfig) -> bool:
        return self.recon and config.a_bits <= self.recon_max_bits

    def recon_kwargs(self) -> dict:
        """The :func:`apply_block_recon` settings these options choose (one place for every caller)."""
        return {"iters": self.recon_iters, "drop_prob": self.recon_drop, "ptf_scales": self.recon_ptf,
                "flip": self.recon_flip, "float_lr": self.recon_float_lr, "e2e_iters": self.recon_e2e_iters,
                "weight_scale_max_bits": self.recon_wscale_max_bits}


@dataclass
class PipelineResult:
    model: nn.Module
    timing: dict = field(default_factory=dict)
    sqb: list | None = None
    optm: list | None = None
    gptq: dict | None = None
    recon: dict | None = None
    attn_smooth: list | None = None
    rotation: list | None = None
    token_scale: list | None = None


def run_pipeline(fp_model: nn.Module, calib: torch.Tensor, config: QuantConfig, options: MethodOptions,
                 progress: bool = False) -> PipelineResult:
    """SQ-b, attention smoothing, rotations and token scaling (on a copy of the float model), prepare + calibrate, then OPT-m, then GPTQ, then block
    reconstruction (only at ``options.recon_max_bits`` activation bits or fewer).

    SQ-b searches alpha at the config's *default* bit-widths (``config.w_bits``/``a_bits``), not the
    per-layer rules, so a mixed-precision config reproduces the same float model when it is reused.
    """
    timing: dict = {}
    model = copy.deepcopy(fp_model)
    sqb = optm = None
    if options.sq_b:
        t = time.perf_counter()
        uniform = QuantConfig(w_bits=config.w_bits, a_bits=config.a_bits)
        sqb = apply_sqb(model, calib, uniform, progress=progress, unnormed=options.sq_b_unnormed,
                         post_gelu=options.sq_b_gelu).to_dict()
        timing["sqb_s"] = time.perf_counter() - t
    attn = None
    if options.attn_smooth:
        t = time.perf_counter()
        attn = apply_attn_smooth(model, calib, QuantConfig(w_bits=config.w_bits, a_bits=config.a_bits),
                                 progress=progress, parts=options.attn_smooth_parts).to_dict()
        timing["attn_smooth_s"] = time.perf_counter() - t
    rotation = None
    if options.rotate:
        t = time.perf_counter()
        rotation = apply_rotation(model, calib, QuantConfig(w_bits=config.w_bits, a_bits=config.a_bits),
                                  seed=config.seed, progress=progress, parts=options.rotate_parts).to_dict()
        timing["rotation_s"] = time.perf_counter() - t
    token_scale = None
    if options.token_scale:
        t = time.perf_counter()
        token_scale = apply_token_scale(model, calib, QuantConfig(w_bits=config.w_bits, a_bits=config.a_bits),
                                        progress=progress).to_dict()
        timing["token_scale_s"] = time.perf_counter() - t
    t = time.perf_counter()
    q = prepare(model, config, inplace=True)
    calibrate(q, config, calib, progress=progress)
    timing["calibrate_s"] = time.perf_counter() - t
    if options.opt_m:
        t = time.perf_counter()
        optm = apply_optm(q, calib, m_max=options.m_max, progress=progress, grid=options.optm_grid,
                          ptf=options.optm_ptf, ptf_objective=options.optm_ptf_objective,
                          nonlin_objective=options.optm_nonlin_objective, log2=options.optm_log2,
                          softmax_objective=options.optm_softmax_objective).to_dict()
        timing["optm_s"] = time.perf_counter() - t
    gptq = None
    if options.gptq:
        t = time.perf_counter()
        gptq = apply_gptq(q, calib, max_bits=options.gptq_max_bits, asym=options.gptq_asym,
                          damp=options.gptq_damp, progress=progress).to_dict()
        timing["gptq_s"] = time.perf_counter() - t
    recon = None
    if options.recon_applies(config):
        t = time.perf_counter()
        # the config's seed (--seed) also seeds reconstruction's mini-batch order and QDrop draws
        recon = apply_block_recon(q, fp_model, calib, progress=progress, seed=config.seed,
                                  **options.recon_kwargs()).to_dict()
        timing["recon_s"] = time.perf_counter() - t
    return PipelineResult(q, timing, sqb, optm, gptq, recon, attn, rotation, token_scale)
