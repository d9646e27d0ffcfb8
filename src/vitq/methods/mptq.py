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
from .gptq import apply_gptq
from .optm import apply_optm
from .recon import apply_block_recon
from .rotation import apply_rotation
from .sqb import apply_sqb
from .token_scale import apply_token_scale
from .options import MethodOptions  # noqa: F401  (its home before options.py; many callers import it here)


@dataclass
class PipelineResult:
    model: nn.Module
    timing: dict = field(default_factory=dict)
    sqb: list | None = None
    optm: list | None = None
    gptq: dict | None = None
    recon: dict | None = None
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
        sqb = apply_sqb(model, calib, uniform, progress=progress).to_dict()
        timing["sqb_s"] = time.perf_counter() - t
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
        optm = apply_optm(q, calib, m_max=options.m_max, progress=progress).to_dict()
        timing["optm_s"] = time.perf_counter() - t
    gptq = None
    if options.gptq:
        t = time.perf_counter()
        gptq = apply_gptq(q, calib, max_bits=options.gptq_max_bits, progress=progress).to_dict()
        timing["gptq_s"] = time.perf_counter() - t
    recon = None
    if options.recon_applies(config):
        t = time.perf_counter()
        # the config's seed (--seed) also seeds reconstruction's mini-batch order and QDrop draws
        recon = apply_block_recon(q, fp_model, calib, progress=progress, seed=config.seed,
                                  **options.recon_kwargs()).to_dict()
        timing["recon_s"] = time.perf_counter() - t
    return PipelineResult(q, timing, sqb, optm, gptq, recon, rotation, token_scale)
