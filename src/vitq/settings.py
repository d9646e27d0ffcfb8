"""The settings file: one YAML file holds the recipe, the quantization config, the budget, each pass's
settings and the mixed-precision search. ``vitq quantize --config FILE`` reads it, ``--set SECTION.FIELD=VALUE``
changes one field, and every ``vitq quantize --out DIR`` saves what it ran, every default filled in, as
``DIR/config.yaml``, so ``vitq quantize MODEL --config DIR/config.yaml`` rebuilds the same model::

    recipe: mptq              # minmax | mptq | m2q
    quant: {w_bits: 4, a_bits: 4, protocol: standard, observer: mse, seed: 0, rules: []}
    budget: {w_bits: 5, a_bits: 5}          # or size_mb, gbops; m2q: {edp: 0.5, hardware: {...}}
    sqb: {enabled: true}
    rotation: {enabled: true, parts: [fc2, v, qk]}
    token_scale: {enabled: true}
    optm: {enabled: true, m_max: null}
    gptq: {enabled: true, max_bits: 5}
    recon: {enabled: true, max_bits: 6, iters: 50, drop: 0.0}
    search: {w_candidates: [4, 5, 6, 8], search: knapsack, probe_images: 16, ...}

A pass field left out (or null where null is allowed) is the recipe's default (vitq.recipes.DEFAULTS). A
QuantConfig JSON file (``mixed_config.json``, ``QuantConfig.save``) is also accepted: it is the ``quant``
section alone. Reading never runs code (``yaml.safe_load``) and every field is checked before any work.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .methods.options import MethodOptions
from .quant.config import ConfigError, QuantConfig
from .recipes import RECIPES

# each pass's section: YAML field -> MethodOptions field
PASSES: dict[str, dict[str, str]] = {
    "sqb": {"enabled": "sq_b"},
    "rotation": {"enabled": "rotate", "parts": "rotate_parts"},
    "token_scale": {"enabled": "token_scale"},
    "optm": {"enabled": "opt_m", "m_max": "m_max"},
    "gptq": {"enabled": "gptq", "max_bits": "gptq_max_bits"},
    "recon": {"enabled": "recon", "max_bits": "recon_max_bits", "iters": "recon_iters", "drop": "recon_drop"},
}
BIT_BUDGET = ("w_bits", "a_bits", "size_mb", "gbops")
COST_BUDGET = ("edp", "energy", "latency")
SEARCH_FIELDS = ("w_candidates", "a_candidates", "search", "probe_images", "lower_per_step", "uniform_fallback",
                 "gptq_losses", "m2q_level")
SECTIONS = ("recipe", "quant", "budget", *PASSES, "search")
_OPTION_TYPES = typing.get_type_hints(MethodOptions)
_BUDGET_TYPES = {**{k: float for k in BIT_BUDGET + COST_BUDGET}, "hardware": (str, dict)}
_SEARCH_TYPES = {"w_candidates": tuple, "a_candidates": tuple, "search": str, "probe_images": int,
                 "lower_per_step": int, "uniform_fallback": bool, "gptq_losses": bool, "m2q_level": str}


@dataclass
class Settings:
    """What ``vitq quantize`` runs, as given: fields left out are the recipe's defaults."""

    recipe: str = "mptq"
    quant: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)
    passes: dict[str, dict] = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    source: str = "the settings"  # named in errors

    @classmethod
    def load(cls, path: str | Path) -> Settings:
        """Read a settings YAML file, or a QuantConfig JSON file as the ``quant`` section.

        Raises:
            ConfigError: a missing or unreadable file, an unknown section or field, or a value of the wrong type.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        if path.suffix.lower() == ".json":
            QuantConfig.load(path)  # checks it, naming the file
            return cls(quant=json.loads(path.read_text()), source=str(path))
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data if data is not None else {}, str(path))

    @classmethod
    def from_dict(cls, data, source: str = "the settings") -> Settings:
        """Settings from a mapping laid out as the YAML file. Raises ConfigError naming the bad key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must hold a mapping of sections ({', '.join(SECTIONS)})")
        out = cls(source=source)
        for section, values in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"{source}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
            if section == "recipe":
                out.set("recipe", values)
                continue
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section '{section}' must be a mapping")
            for key, value in values.items():
                out.set(f"{section}.{key}", value)
        return out

    def set(self, key: str, value) -> None:
        """Set one field, ``SECTION.FIELD`` (or ``recipe``), checking its name and type.

        Raises:
            ConfigError: naming the key.
        """
        where = f"{self.source}: '{key}'"
        if key == "recipe":
            if value not in RECIPES:
                raise ConfigError(f"{where} must be one of {', '.join(RECIPES)}, got {value!r}")
            self.recipe = value
            return
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"{where}: give SECTION.FIELD with SECTION one of {', '.join(SECTIONS)}")
        if section == "quant":
            known = {f.name for f in dataclasses.fields(QuantConfig)}
            if name not in known:
                raise ConfigError(f"{where}: unknown field (known: {', '.join(sorted(known))})")
            self.quant[name] = value  # QuantConfig checks the value when the plan is made
        elif section == "budget":
            self.budget[name] = _checked(where, value, _BUDGET_TYPES, name)
        elif section == "search":
            self.search[name] = _checked(where, value, _SEARCH_TYPES, name)
        else:
            option = PASSES[section].get(name)
            if option is None:
                raise ConfigError(f"{where}: unknown field (known: {', '.join(PASSES[section])})")
            want = _OPTION_TYPES[option]
            kind = bool if "bool" in str(want) else int if "int" in str(want) else float if "float" in str(
                want) else tuple
            self.passes.setdefault(section, {})[name] = _checked(where, value, {name: kind}, name,
                                                                 none_ok="None" in str(want))

    def apply(self, assignment: str) -> None:
        """Apply one ``--set SECTION.FIELD=VALUE`` (the value is read as YAML: ``true``, ``5``, ``[4, 8]``)."""
        key, sep, text = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes SECTION.FIELD=VALUE, got '{assignment}'")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        source, self.source = self.source, "--set"
        try:
            self.set(key.strip(), value)
        finally:
            self.source = source

    def quant_config(self) -> QuantConfig | None:
        """The QuantConfig given (None when no field is), widths from a bit budget where not given."""
        d = dict(self.quant)
        for key in ("w_bits", "a_bits"):
            v = self.budget.get(key)
            if key not in d and v is not None:
                d[key] = max(2, min(8, round(v)))
        if not d:
            return None
        if d.get("gelu_token_shift") is True and d.get("protocol", "standard") != "full":
            raise ConfigError(f"{self.source}: quant.gelu_token_shift sets the full protocol's GELU-input grids: "
                              "give it with --protocol full")
        try:
            return QuantConfig.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: quant: {exc}") from None

    def options(self) -> MethodOptions:
        """The pass settings given, as MethodOptions (None where the recipe decides)."""
        kw = {}
        for section, values in self.passes.items():
            for name, value in values.items():
                kw[PASSES[section][name]] = tuple(value) if isinstance(value, list) else value
        if kw.get("rotate") is None and "rotate_parts" in kw:
            kw["rotate"] = True  # choosing the rotations asks for them
        return MethodOptions(**kw)

    def plan(self, model=None):
        """Every default filled in and checked: a :class:`vitq.api.Plan` (see :func:`vitq.api.plan`)."""
        from .api import CostBudget, SearchOptions, plan
        from .methods.greedy_mp import Budget

        cost = [k for k in COST_BUDGET if self.budget.get(k) is not None]
        bits = [k for k in BIT_BUDGET if self.budget.get(k) is not None]
        if len(cost) > 1:
            raise ConfigError(f"{self.source}: give one cost budget, not {' and '.join(cost)}")
        if cost and bits:
            raise ConfigError(f"{self.source}: a cost budget ({cost[0]}) and a bit budget ({bits[0]}) cannot be "
                              "combined")
        if cost and self.recipe != "m2q":
            raise ConfigError(f"budget.{cost[0]} (--budget-{cost[0]}) needs the m2q recipe (--method m2q)")
        if self.budget.get("hardware") is not None and self.recipe != "m2q":
            raise ConfigError("budget.hardware (--hw) is the m2q recipe's accelerator: give it with --method m2q")
        budget = None
        if self.recipe == "m2q" and not bits:
            from .hardware import load_hardware

            metric = cost[0] if cost else "edp"
            budget = CostBudget(metric, self.budget.get(metric, 1.0), load_hardware(self.budget.get("hardware")))
        elif bits:
            budget = Budget(*(self.budget.get(k) for k in BIT_BUDGET))
        search = SearchOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.search.items()})
        for key in ("w_candidates", "a_candidates"):
            for b in getattr(search, key) or ():
                if isinstance(b, bool) or not isinstance(b, int):
                    raise ConfigError(f"{self.source}: search.{key} must be a list of bit-widths, got {b!r}")
        return plan(self.quant_config(), self.recipe, budget, self.options(), search, model=model)


def _checked(where: str, value, types: dict, name: str, none_ok: bool = True):
    if name not in types:
        raise ConfigError(f"{where}: unknown field (known: {', '.join(types)})")
    want = types[name]
    if value is None:
        if none_ok:
            return None
        raise ConfigError(f"{where} must not be empty")
    if want is tuple:
        if isinstance(value, str):
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]  # "4,8" -> [4, 8]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # "8" -> [8]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{where} must be a non-empty list, got {value!r}")
        return list(value)
    if want in (float, int) and isinstance(value, str):
        try:  # YAML reads 1e6 as a string
            value = want(value)
        except ValueError:
            pass
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
        raise ConfigError(f"{where} must be {names.replace('dict', 'a mapping').replace('str', 'a path')}, "
                          f"got {value!r}")
    return value


def plan_to_dict(p) -> dict:
    """A :class:`vitq.api.Plan` as the settings mapping (every default filled in): what ``config.yaml`` holds."""
    from .api import CostBudget

    o = p.options
    passes = {section: {name: (list(getattr(o, opt)) if isinstance(getattr(o, opt), tuple) else getattr(o, opt))
                        for name, opt in fields.items()} for section, fields in PASSES.items()}
    budget: dict = {}
    if isinstance(p.budget, CostBudget):
        budget = {p.budget.metric: p.budget.fraction}
        if p.budget.hardware is not None:
            budget["hardware"] = p.budget.hardware.to_dict()
    elif p.budget is not None:
        budget = {k: getattr(p.budget, k) for k in BIT_BUDGET if getattr(p.budget, k) is not None}
    search = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(p.search).items()}
    quant = copy.deepcopy(p.config.to_dict())
    return {"recipe": p.recipe, "quant": quant, "budget": budget, **passes, "search": search}


def dump(data: dict) -> str:
    """The settings mapping as YAML, sections in their documented order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def settings_key(option: str) -> str:
    """The settings key of a :data:`vitq.recipes.DEFAULTS` option: ``options.sq_b`` -> ``sqb.enabled``,
    ``config.observer`` -> ``quant.observer``, ``search.x`` -> ``search.x``."""
    where, name = option.split(".", 1)
    if where == "config":
        return f"quant.{name}"
    if where == "options":
        return next(f"{section}.{key}" for section, keys in PASSES.items() for key, opt in keys.items() if opt == name)
    return option


def defaults_table() -> str:
    """The recipes' defaults (vitq.recipes.DEFAULTS) as a Markdown table, under their settings keys."""
    from .recipes import DEFAULTS

    rows = ["| setting | recipes | why | decided by |", "|---|---|---|---|"]
    rows += [f"| `{settings_key(d.option)}` | {', '.join(d.recipes)} | {d.reason} | {d.record} |" for d in DEFAULTS]
    return "\n".join(rows)
