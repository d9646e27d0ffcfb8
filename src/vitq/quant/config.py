"""QuantConfig: default bit-widths, scheme and granularity, plus per-layer rules matched by glob pattern.

A *layer* is anything that owns quantized tensors: a Linear or Conv2d (its ``weight`` and ``input``),
an attention matmul (its two operands, e.g. ``q`` and ``k``), or, in the ``full`` protocol, a
nonlinearity or a residual addition (its input). Layer names are module paths such as
``blocks.3.attn.qkv`` or ``blocks.3.attn.matmul_qk``; ``vitq quantize`` prints them all.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .observers import OBSERVERS

PROTOCOLS = ("standard", "full")
# weight schemes: uniform, power-of-two, additive power-of-two (APoT), and per output channel uniform or APoT
# ("mixed"); activations are uniform or (after OPT-m) two_region
SCHEMES = ("uniform", "pot", "apot", "mixed")
SHIFT_SCHEMES = ("pot", "apot")  # weight schemes whose products are shifts (and one add for APoT)
# weights; residual-stream activations may be "ptf"
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
# Config keys of deleted options, with the value that meant "off".
RETIRED = {"head_grids": False, "qkv_head_grids": False}


class ConfigError(ValueError):
    """A bad quantization option, naming the option or the layer pattern."""


@dataclass
class LayerRule:
    """Overrides for the layers whose name matches ``pattern`` (fnmatch glob). None keeps the default."""

    pattern: str
    w_bits: int | None = None
    a_bits: int | None = None
    w_scheme: str | None = None
    w_granularity: str | None = None
    w_apot_share: float | None = None


@dataclass
class TensorSpec:
    """How one tensor is quantized. ``apot_share`` (scheme ``mixed``): the fraction of output channels on
    the APoT grid; None: each channel takes the grid with the lower error."""

    bits: int
    scheme: str = "uniform"
    symmetric: bool = False
    granularity: str = "per_tensor"
    group_size: int = 64
    apot_share: float | None = None


@dataclass
class QuantConfig:
    """Quantization settings for a whole model.

    Attributes:
        w_bits / a_bits: default weight and activation bit-widths (2..8).
        protocol: ``standard`` (RepQ-ViT protocol: LayerNorm/Softmax in float, every linear/conv/matmul
            input quantized) or ``full`` (also the inputs of LayerNorm, Softmax, GELU and residual adds).
        observer: activation range observer, ``minmax``, ``percentile`` or ``mse``; weights use the same
            method per output channel. None: the recipe's choice (``mse`` under ``mptq`` and ``m2q``,
            vitq.recipes.DEFAULTS), ``minmax`` for the engine alone.
        mse_objective: ``tensor`` (error of the quantized tensor) or ``output`` (error of the layer output
            it feeds, for Linear inputs).
        percentile: the percentile of the ``percentile`` observer.
        w_granularity / w_scheme / group_size: weight quantization defaults. ``w_scheme``: ``uniform``,
            ``pot`` (power of two), ``apot`` (additive power of two, real-valued scale per channel) or
            ``mixed`` (each output channel uniform or APoT; per channel only).
        w_apot_share: ``mixed`` weights: the fraction of each layer's output channels on the APoT grid
            (those that lose least by it); None: each channel takes the grid with the lower error.
        first_layer_a_bits: bits of the image input of the patch embedding / stem (kept at 8).
        a_symmetric: per-tensor uniform activation grids are symmetric (signed, zero point 0), as TensorRT's
            int8 wants; the PTF grids of the full protocol stay asymmetric.
        residual_ptf: full protocol: quantize the residual stream of ViT/Swin (LayerNorm inputs and
            residual additions) per channel with power-of-two scale factors (FQ-ViT's PTF), since a few
            channels are hundreds of times larger than the rest. False: per tensor.
        residual_token_shift: each PTF grid (full protocol with ``residual_ptf``; ignored otherwise) also
            gets a static power-of-two factor per token position, so positions that carry massive
            activations (ViT-Tiny's corner patches) do not set the channels' ranges for every other token.
            On by default since session 17 (rule R20, docs/methods.md). The positions are calibrated, so
            the model then needs the input size it was calibrated at.
        gelu_token_shift: full protocol: each GELU input's per-tensor grid also gets a static power-of-two
            factor per token position, chosen like ``residual_token_shift``'s (vitq's addition, session 24;
            docs/methods.md "Token shifts of the GELU inputs"). ViT-Tiny's block 7 makes its massive
            activations there: four positions reach +215 where no other exceeds 5.2. None (the default):
            off in the engine, and the recipe decides in ``vitq.quantize`` (the mptq recipe turns it on in the
            full protocol: rules R33 and R47, ``vitq.recipes.DEFAULTS``).
        rules: per-layer overrides, applied in order (later rules win).
        seed: seed of every random choice (observer sampling; block reconstruction's batch order and QDrop).
    """

    w_bits: int = 8
    a_bits: int = 8
    protocol: str = "standard"
    observer: str | None = None
    mse_objective: str = "tensor"
    percentile: float = 99.99
    w_granularity: str = "per_channel"
    w_scheme: str = "uniform"
    w_apot_share: float | None = None
    group_size: int = 64
    first_layer_a_bits: int = 8
    a_symmetric: bool = False
    residual_ptf: bool = True
    residual_token_shift: bool = True
    gelu_token_shift: bool | None = None
    rules: list[LayerRule] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.rules, (list, tuple)):
            raise ConfigError(f"rules must be a list of objects with a 'pattern', got {type(self.rules).__name__}")
        self.rules = [r if isinstance(r, LayerRule) else _rule(i, r) for i, r in enumerate(self.rules)]
        self.validate()

    def validate(self) -> None:
        """Check every option.

        Raises:
            ConfigError: naming the bad option or rule.
        """
        _check_types(self, "")
        _bits("w_bits", self.w_bits)
        _bits("a_bits", self.a_bits)
        _bits("first_layer_a_bits", self.first_layer_a_bits)
        _choice("protocol", self.protocol, PROTOCOLS)
        if self.observer is not None:
            _choice("observer", self.observer, OBSERVERS)
        _choice("mse_objective", self.mse_objective, ("tensor", "output"))
        _choice("w_granularity", self.w_granularity, GRANULARITIES)
        _choice("w_scheme", self.w_scheme, SCHEMES)
        _share("w_apot_share", self.w_apot_share)
        if self.w_scheme == "mixed" and self.w_granularity != "per_channel":
            raise ConfigError(f"w_scheme=mixed chooses a grid per output channel: it needs w_granularity=per_channel, "
                              f"got {self.w_granularity}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.group_size < 1:
            raise ConfigError(f"group_size must be positive, got {self.group_size}")
        for i, r in enumerate(self.rules):
            _check_types(r, f"rules[{i}].")
            where = f"rule '{r.pattern}'"
            if r.w_bits is not None:
                _bits(f"{where} w_bits", r.w_bits)
            if r.a_bits is not None:
                _bits(f"{where} a_bits", r.a_bits)
            if r.w_scheme is not None:
                _choice(f"{where} w_scheme", r.w_scheme, SCHEMES)
            if r.w_granularity is not None:
                _choice(f"{where} w_granularity", r.w_granularity, GRANULARITIES)
            _share(f"{where} w_apot_share", r.w_apot_share)

    def layer_settings(self, layer: str) -> dict:
        """The effective ``w_bits``, ``a_bits``, ``w_scheme``, ``w_granularity`` of one layer."""
        out = dict(w_bits=self.w_bits, a_bits=self.a_bits, w_scheme=self.w_scheme, w_granularity=self.w_granularity,
                   w_apot_share=self.w_apot_share)
        for r in self.rules:
            if fnmatch.fnmatchcase(layer, r.pattern):
                for k in out:
                    v = getattr(r, k)
                    if v is not None:
                        out[k] = v
        return out

    def check_patterns(self, layer_names: list[str]) -> None:
        """Every rule must match at least one layer: a typo must not silently quantize nothing.

        Raises:
            ConfigError: naming the pattern that matches nothing.
        """
        for r in self.rules:
            if not any(fnmatch.fnmatchcase(n, r.pattern) for n in layer_names):
                raise ConfigError(
                    f"config rule pattern '{r.pattern}' matches no layer of this model "
                    f"(examples of layer names: {', '.join(layer_names[:4])})"
                )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        # options deleted after they measured worse (docs/lab/decisions.md): artifacts written before
        # carry them at their off value, which means nothing now; any other value cannot be rebuilt
        d = dict(d)
        for key, off in RETIRED.items():
            if key in d:
                if d[key] != off:
                    raise ConfigError(f"{key}={d[key]!r} was an option of an earlier vitq, removed after it "
                                      "measured worse (docs/lab/decisions.md); this config cannot be rebuilt")
                del d[key]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config option(s): {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from ..io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "QuantConfig":
        """Read a config JSON file (as written by :meth:`save` or by a mixed-precision search)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _check_types(obj, prefix: str) -> None:
    """Each field of a config dataclass must hold its annotated type (``int | None`` allows null)."""
    for f in fields(obj):
        if f.name == "rules":
            continue
        value = getattr(obj, f.name)
        ann = str(f.type).replace(" ", "")
        optional = ann.endswith("|None")
        base = ann.removesuffix("|None")
        if value is None and optional:
            continue
        ok = base in _TYPES and isinstance(value, _TYPES[base]) and not (base != "bool" and isinstance(value, bool))
        if ok and base == "float":
            ok = math.isfinite(value)
        if not ok:
            raise ConfigError(f"{prefix}{f.name} must be {_TYPE_WORDS.get(base, base)}"
                              f"{' or null' if optional else ''}, got {value!r}")


def _rule(i: int, r) -> LayerRule:
    """A LayerRule from its JSON object, with one-line errors naming the rule."""
    if not isinstance(r, dict):
        raise ConfigError(f"rules[{i}] must be an object with a 'pattern', got {r!r}")
    known = {f.name for f in fields(LayerRule)}
    unknown = sorted(set(r) - known)
    if unknown:
        raise ConfigError(f"rules[{i}] has unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if not isinstance(r.get("pattern"), str) or not r["pattern"]:
        raise ConfigError(f"rules[{i}] needs a 'pattern' string (a glob over layer names), got {r.get('pattern')!r}")
    return LayerRule(**r)


def _bits(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 8:
        raise ConfigError(f"{name} must be an integer from 2 to 8, got {value!r}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _share(name: str, value) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a fraction from 0 to 1 (or null), got {value!r}")
