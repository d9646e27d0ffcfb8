"""Named recipes and the one table of their defaults.

A recipe is what ``vitq.quantize(..., recipe=NAME)`` runs:

* ``minmax``: the engine alone (prepare, calibrate with the config's observer): the baseline;
* ``mptq``: MPTQ-ViT with vitq's additions: SQ-b, Hadamard rotations, token scaling, OPT-m, GPTQ and
  block reconstruction, and Greedy MP when a bit or size budget is given;
* ``m2q``: M2-ViT's scheme (uniform / additive power-of-two, per output channel) and precision search under an
  accelerator cost budget, on SQ-b, OPT-m and GPTQ where asked;
* ``m2q-paper``: M2-ViT's own fixed recipe, no search (``vitq.methods.m2q.paper_config``): depthwise W4
  uniform, linears and 1x1 convs W8 with each output channel uniform or APoT, activations 8 bits.

Every default that depends on the protocol, the bit-widths or the budget is one row of :data:`DEFAULTS`,
with its reason and the decision record (docs/methods.md) that chose it; ``vitq.settings.defaults_table()``
prints them under their settings keys. An option the caller sets
(not None) is never changed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .methods.mptq import MethodOptions
from .quant.config import ConfigError, QuantConfig

RECIPES = ("minmax", "mptq", "m2q", "m2q-paper")

# Widths below which the mptq recipe adopted an option; each was decided by a rule written before its runs.
ROTATE_DEFAULT_MAX_BITS = 6  # R30: single precision, standard protocol
TOKEN_SCALE_DEFAULT_MAX_BITS = 6  # R31: single precision, standard protocol
MIXED_DEFAULT_MAX_BITS = 6  # R37: Greedy MP (or a saved mixed config), standard protocol
FULL_MIXED_DEFAULT_MAX_BITS = 5  # R38: Greedy MP, full protocol (its 6-bit cell missed the KL criterion)


def _standard_up_to(config: QuantConfig, max_bits: int) -> bool:
    return config.protocol == "standard" and config.a_bits <= max_bits


def _mixed_scope(config: QuantConfig) -> bool:
    """Where Greedy MP under mptq rotates and keeps its searched assignment: R37 (standard), R38 (full)."""
    if config.protocol == "full":
        return config.a_bits <= FULL_MIXED_DEFAULT_MAX_BITS
    return _standard_up_to(config, MIXED_DEFAULT_MAX_BITS)


def mptq_rotates(config: QuantConfig, single: bool = True) -> bool:
    """Rotation by default: single precision in the standard protocol at <= 6 activation bits (R30);
    mixed precision within :func:`_mixed_scope` (R37, R38)."""
    return _standard_up_to(config, ROTATE_DEFAULT_MAX_BITS) if single else _mixed_scope(config)


def mptq_token_scales(config: QuantConfig, single: bool = True) -> bool:
    """Token scaling by default: in the full protocol wherever the GELU inputs have token shifts (R33); in
    the standard protocol at <= 6 activation bits (R31 single precision, R37 mixed)."""
    if config.protocol == "full":
        return bool(config.gelu_token_shift)
    return _standard_up_to(config, TOKEN_SCALE_DEFAULT_MAX_BITS if single else MIXED_DEFAULT_MAX_BITS)


def mptq_gelu_token_shifts(config: QuantConfig) -> bool:
    """GELU-input token shifts by default: in the full protocol at every width (R33 up to 6 bits, R47 at 7-8)."""
    return config.protocol == "full"


def mptq_uniform_fallback(config: QuantConfig) -> bool:
    """The uniform fallback after Greedy MP: off within :func:`_mixed_scope` (R37, R38), on elsewhere."""
    return not _mixed_scope(config)


@dataclass(frozen=True)
class Default:
    """One recipe default: ``value(config, mixed)`` for ``option`` of the MethodOptions (``options.*``),
    the QuantConfig (``config.*``) or the search (``search.*``), where ``applies(recipe)``."""

    option: str
    recipes: tuple[str, ...]
    value: Callable[[QuantConfig, bool], Any]
    reason: str
    record: str
    other: Any = False  # the value under the other recipes


DEFAULTS: tuple[Default, ...] = (
    Default("config.observer", ("mptq", "m2q", "m2q-paper"), lambda c, mixed: "mse",
            "ranges by the least squared error (the engine alone: min-max)", "docs/methods.md, Observers",
            other="minmax"),
    Default("options.sq_b", ("mptq", "m2q"), lambda c, mixed: True,
            "SmoothQuant with bias shift, folded into LayerNorm: free at inference", "docs/methods.md, SQ-b"),
    Default("options.opt_m", ("mptq", "m2q"), lambda c, mixed: True,
            "two-region grids for post-GELU/softmax values", "docs/methods.md, OPT-m"),
    Default("options.gptq", ("mptq", "m2q"), lambda c, mixed: True,
            "GPTQ rounding for layers of <= 5 weight bits (6 failed R21)", "docs/methods.md, GPTQ; R21"),
    Default("options.recon", ("mptq",), lambda c, mixed: True,
            "block reconstruction at <= 6 activation bits (R1, R2)", "docs/methods.md, Block reconstruction"),
    Default("config.gelu_token_shift", ("mptq",), lambda c, mixed: mptq_gelu_token_shifts(c),
            "full protocol: GELU inputs get per-token power-of-two factors", "R33, R47"),
    Default("options.rotate", ("mptq",), lambda c, mixed: mptq_rotates(c, single=not mixed),
            "Hadamard rotations where they lower each layer's error", "R30, R37, R38"),
    Default("options.token_scale", ("mptq",), lambda c, mixed: mptq_token_scales(c, single=not mixed),
            "per-token factors on fc2's massive positions", "R31, R33, R37"),
)


def resolve(recipe: str, config: QuantConfig, options: MethodOptions, mixed: bool) -> tuple[QuantConfig, MethodOptions]:
    """Fill every option left as None in ``config`` and ``options`` from :data:`DEFAULTS` for ``recipe``.

    Args:
        recipe: one of :data:`RECIPES`.
        config: the quantization config; ``gelu_token_shift=None`` means "the recipe decides".
        options: method options; a None field means "the recipe decides" (the ``minmax`` and ``m2q``
            recipes then leave it off).
        mixed: a mixed-precision budget is given, or ``config`` is a saved mixed assignment (it has rules).

    Returns:
        The config and options with no None left where a default exists.

    Raises:
        ConfigError: an unknown recipe, or methods the recipe does not take.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    cfg_changes, opt_changes = {}, {}
    for d in DEFAULTS:
        where, name = d.option.split(".", 1)
        current = getattr(config if where == "config" else options, name)
        if current is not None:
            continue
        target = cfg_changes if where == "config" else opt_changes
        # later rows see the earlier rows' values (token scaling follows the GELU token shifts)
        view = dataclasses.replace(config, **cfg_changes) if cfg_changes else config
        target[name] = d.value(view, mixed) if recipe in d.recipes else d.other
    config = dataclasses.replace(config, **cfg_changes) if cfg_changes else config
    options = dataclasses.replace(options, **opt_changes) if opt_changes else options
    if recipe == "m2q":
        on = [f for f in ("recon", "rotate", "token_scale") if getattr(options, f)]
        if on:
            raise ConfigError(f"the m2q recipe does not take {', '.join(on)} (M2-ViT's search runs on SQ-b, OPT-m "
                              "and GPTQ at most: the accelerator has no online rotation, and block "
                              "reconstruction learns uniform grids only)")
    return config, options
