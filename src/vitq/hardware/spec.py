"""The accelerator description: typed constants loaded from ``accelerator.yaml`` (defaults, with sources)
and optionally merged with a user's YAML file."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import yaml

SCHEDULES = ("pipeline", "sequential")


class HardwareError(ValueError):
    """A bad accelerator description, naming the file and the key."""


@dataclass(frozen=True)
class EnergySpec:
    mult_pj_8x8: float
    add_pj_32: float
    acc_bits: int
    shift_vs_add: float
    sram_pj_per_64b: float
    dram_pj_per_64b: float
    div_bits: int


@dataclass(frozen=True)
class EngineSpec:
    freq_hz: float
    mac_units: int
    mac_precision_scalable: bool
    shift_units: int


@dataclass(frozen=True)
class MemorySpec:
    weight_buffer_kib: float
    act_buffer_kib: float
    dram_gb_per_s: float


@dataclass(frozen=True)
class HardwareSpec:
    """Everything the cost model needs. See ``accelerator.yaml`` for meanings and sources."""

    energy: EnergySpec
    engines: EngineSpec
    memory: MemorySpec
    schedule: str = "pipeline"

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"energy": EnergySpec, "engines": EngineSpec, "memory": MemorySpec}


def _read_yaml(path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise HardwareError(f"hardware file '{path}' does not exist") from None
    except yaml.YAMLError as exc:
        raise HardwareError(f"hardware file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HardwareError(f"hardware file '{path}' must hold a mapping of sections, not {type(data).__name__}")
    return data


def default_hardware_path() -> Path:
    return Path(str(resources.files("vitq.hardware") / "accelerator.yaml"))


def load_hardware(path: str | Path | dict | None = None) -> HardwareSpec:
    """The default accelerator, with the values of ``path`` (a partial YAML file, or the same as a mapping,
    e.g. ``HardwareSpec.to_dict()``) merged over it.

    Raises:
        HardwareError: unreadable file, unknown section or key, or a value of the wrong type/range.
    """
    merged = _read_yaml(default_hardware_path())
    if path is not None:
        given = copy.deepcopy(path) if isinstance(path, dict) else _read_yaml(path)
        if isinstance(path, dict):
            path = "the settings' budget.hardware"
        for section, values in given.items():
            if section == "schedule":
                merged["schedule"] = values
                continue
            if section not in _SECTIONS:
                raise HardwareError(f"hardware file '{path}': unknown section '{section}' "
                                    f"(known: {', '.join([*_SECTIONS, 'schedule'])})")
            if not isinstance(values, dict):
                raise HardwareError(f"hardware file '{path}': section '{section}' must be a mapping")
            known = {f.name for f in fields(_SECTIONS[section])}
            for key, value in values.items():
                if key not in known:
                    raise HardwareError(f"hardware file '{path}': unknown key '{section}.{key}' "
                                        f"(known: {', '.join(sorted(known))})")
                merged[section][key] = value
    where = path or default_hardware_path()
    parts = {}
    for section, cls in _SECTIONS.items():
        values = {}
        for f in fields(cls):
            v = merged[section][f.name]
            want = {"float": float, "int": int, "bool": bool}[f.type]
            if want is bool:
                if not isinstance(v, bool):
                    raise HardwareError(f"hardware file '{where}': '{section}.{f.name}' must be true or false")
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                    raise HardwareError(f"hardware file '{where}': '{section}.{f.name}' must be a positive number, got {v!r}")
                v = want(v)
            values[f.name] = v
        parts[section] = cls(**values)
    if merged.get("schedule") not in SCHEDULES:
        raise HardwareError(f"hardware file '{where}': schedule must be one of {SCHEDULES}, got {merged.get('schedule')!r}")
    return HardwareSpec(schedule=merged["schedule"], **parts)
