"""The reloadable quantized-model artifact: ``DIR/model.safetensors`` + ``DIR/config.json``.

``model.safetensors`` holds the prepared model's full state: the (float, possibly rewritten) weights
and every quantizer's parameters (scale, zero point, clip range). ``config.json`` holds what is needed
to rebuild the same structure: the model's timm name, the QuantConfig, and calibration counters used by
the report (values per image of each activation, MACs per layer). Reloading never recalibrates.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .finite import check_state_finite
from .io import dumps, save_safetensors
from .quant.config import ConfigError, QuantConfig, TensorSpec
from .quant.engine import all_quantizers, compute_layers, prepare, weight_layers
from .zoo import ZooError, create_model, get_entry

FORMAT = "vitq-fakequant/1"
log = logging.getLogger(__name__)


class ArtifactError(ValueError):
    """An unreadable, corrupted or incompatible artifact, naming the file."""


def is_artifact(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def artifact_files(model: nn.Module, meta: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON metadata that describe a calibrated model."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = dict(meta)
    meta.update(
        format=FORMAT,
        vitq_version=__version__,
        quant_config=model.vitq_config.to_dict(),
        calib_images=int(getattr(model, "vitq_calib_images", 0)),
        elements={q.name: int(q.elements) for q in all_quantizers(model) if not q.is_weight},
        # Methods (OPT-m, searches) may change single tensors' specs beyond what the config says.
        specs={q.name: asdict(q.spec) for q in all_quantizers(model)},
        macs={m.layer_name: int(m.macs) for m in compute_layers(model)},
    )
    return state, meta


def binding(meta: dict) -> str:
    """A digest of what must agree between ``config.json`` and ``model.safetensors``: the model, its
    constructor options, the QuantConfig and every tensor's spec. Stored in the tensors' header, so an
    edit of one file without the other is refused on load."""
    keys = ("model", "model_kwargs", "quant_config", "specs")
    text = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def save_artifact(model: nn.Module, folder: Path, meta: dict) -> None:
    """Write ``model.safetensors``, ``config.json`` and the vitq marker into an (already temporary) folder."""
    from .output import write_marker

    state, meta = artifact_files(model, meta)
    save_safetensors(state, folder / "model.safetensors",
                     metadata={"format": FORMAT, "model": str(meta.get("model")), "binding": binding(meta)})
    (folder / "config.json").write_text(dumps(meta))
    write_marker(folder, "quantize")


def load_artifact(folder: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a quantized model from an artifact folder, ready to evaluate (no recalibration).

    Raises:
        ArtifactError: missing or corrupted files, another format version, or tensors that do not fit.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, st_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise ArtifactError(f"artifact file missing: {p}")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"artifact {cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"artifact {cfg_path} has format {found!r}; this vitq {__version__} reads {FORMAT!r}")
    validate_meta(meta, cfg_path)
    try:
        state = load_file(str(st_path))
        with safe_open(str(st_path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"artifact {st_path} is corrupted or unreadable: {exc}") from exc
    if "binding" not in header:
        log.warning("artifact %s was written before vitq recorded a digest of its config; its config.json "
                    "cannot be checked against its tensors", folder)
    elif header.get("model") != meta["model"]:
        raise ArtifactError(f"artifact {cfg_path} names model {meta['model']!r}, but {st_path} holds "
                            f"{header.get('model')!r}: the files do not belong together")
    elif header["binding"] != binding(meta):
        raise ArtifactError(f"artifact {cfg_path} does not match {st_path}: its model, quant_config or specs "
                            "were changed after vitq wrote them; re-run `vitq quantize`")
    return rebuild(meta, state, cfg_path, st_path)


def rebuild(meta: dict, state: dict[str, torch.Tensor], cfg_path, st_path) -> tuple[nn.Module, dict]:
    """Build the prepared model that ``meta`` describes and load ``state`` into it (no calibration).

    Raises:
        ArtifactError: an unknown model, or tensors that do not fit it (naming the files).
    """
    validate_meta(meta, cfg_path)
    try:
        entry = get_entry(meta["model"])
    except (KeyError, ZooError) as exc:
        raise ArtifactError(f"artifact {cfg_path} names no known model: {exc}") from exc
    try:
        config = QuantConfig.from_dict(meta["quant_config"])
    except ConfigError as exc:
        raise ArtifactError(f"artifact {cfg_path}: quant_config: {exc}") from None
    # model_kwargs: timm constructor options the model was built with (e.g. num_classes, img_size).
    model = prepare(create_model(entry, **meta.get("model_kwargs", {})), config, inplace=True)
    from .methods.rotation import restore_rotations

    restore_rotations(model, state)  # online Hadamard rotations of fc2's input (the rotation pass)
    from .methods.token_scale import restore_token_scales

    restore_token_scales(model, state)  # static token-position factors on fc2's input (token scaling)
    modules = dict(model.named_modules())
    for key in state:  # SQ-b and GPTQ give bias-free Linears (Swin's patch merging) a bias
        owner = modules.get(key.rsplit(".", 1)[0]) if key.endswith(".bias") else None
        if isinstance(owner, (nn.Linear, nn.Conv2d)) and owner.bias is None:
            owner.bias = nn.Parameter(torch.zeros_like(state[key]))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ArtifactError(f"artifact {st_path} does not fit {entry.timm_name}: {exc}") from exc
    if missing or unexpected:
        raise ArtifactError(f"artifact {st_path} does not fit {entry.timm_name}: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.vitq_calib_images = meta.get("calib_images", 1)
    specs = meta["specs"]
    names = {q.name for q in all_quantizers(model)}
    if set(specs) != names:
        extra, absent = sorted(set(specs) - names), sorted(names - set(specs))
        raise ArtifactError(f"artifact {cfg_path}: specs do not fit {entry.timm_name}: "
                            + (f"unknown tensor(s) {', '.join(extra[:3])}" if extra else "")
                            + ("; " if extra and absent else "")
                            + (f"missing tensor(s) {', '.join(absent[:3])}" if absent else ""))
    for q in all_quantizers(model):
        if q.name in specs:
            q.spec = TensorSpec(**specs[q.name])
        q.mode = "quant"
        if not q.is_weight:
            q.elements = meta.get("elements", {}).get(q.name, 0)
    macs = meta.get("macs", {})
    for m in compute_layers(model):
        m.macs = macs.get(m.layer_name, 0)
    for m in weight_layers(model):
        m.refresh()
    check_state_finite(model, f"artifact {st_path}")
    return model.eval(), meta


SPEC_SCHEMES = ("uniform", "pot", "apot", "mixed", "two_region")
SPEC_GRANULARITIES = ("per_tensor", "per_channel", "per_group", "ptf")


def _field(cfg_path, key: str, value, kind, what: str) -> None:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ArtifactError(f"artifact {cfg_path}: {key} must be {what}, got {value!r}")


def validate_meta(meta: dict, cfg_path) -> None:
    """Check every field of an artifact's ``config.json`` before it is used.

    Raises:
        ArtifactError: naming the file, the key and what it must hold.
    """
    for key in ("model", "quant_config", "specs"):
        if key not in meta:
            raise ArtifactError(f"artifact {cfg_path}: required key '{key}' is missing")
    _field(cfg_path, "model", meta["model"], str, "a model name")
    _field(cfg_path, "quant_config", meta["quant_config"], dict, "an object")
    _field(cfg_path, "specs", meta["specs"], dict, "an object of tensor name -> spec")
    try:
        QuantConfig.from_dict(meta["quant_config"])
    except ConfigError as exc:
        raise ArtifactError(f"artifact {cfg_path}: quant_config: {exc}") from None
    _field(cfg_path, "model_kwargs", meta.get("model_kwargs", {}), dict, "an object")
    _field(cfg_path, "random_init", meta.get("random_init", False), bool, "true or false")
    if meta.get("checkpoint") is not None:
        _field(cfg_path, "checkpoint", meta["checkpoint"], str, "a path or null")
    _field(cfg_path, "calib_images", meta.get("calib_images", 1), int, "an integer")
    for table in ("elements", "macs"):
        values = meta.get(table, {})
        _field(cfg_path, table, values, dict, "an object of name -> integer")
        for k, v in values.items():
            _field(cfg_path, f"{table}.{k}", v, int, "an integer")
    known = {f.name for f in fields(TensorSpec)}
    for name, spec in meta["specs"].items():
        where = f"specs.{name}"
        _field(cfg_path, where, spec, dict, "an object")
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ArtifactError(f"artifact {cfg_path}: {where} has unknown key(s) {', '.join(unknown)} "
                                f"(known: {', '.join(sorted(known))})")
        if "bits" not in spec:
            raise ArtifactError(f"artifact {cfg_path}: {where} has no 'bits'")
        bits = spec["bits"]
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
            raise ArtifactError(f"artifact {cfg_path}: {where}.bits must be an integer from 2 to 8, got {bits!r}")
        for key, choices in (("scheme", SPEC_SCHEMES), ("granularity", SPEC_GRANULARITIES)):
            if key in spec and spec[key] not in choices:
                raise ArtifactError(f"artifact {cfg_path}: {where}.{key} must be one of {', '.join(choices)}, "
                                    f"got {spec[key]!r}")
        if "symmetric" in spec:
            _field(cfg_path, f"{where}.symmetric", spec["symmetric"], bool, "true or false")
        if "group_size" in spec:
            _field(cfg_path, f"{where}.group_size", spec["group_size"], int, "an integer")
            if spec["group_size"] < 1:
                raise ArtifactError(f"artifact {cfg_path}: {where}.group_size must be positive")
        share = spec.get("apot_share")
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1):
            raise ArtifactError(f"artifact {cfg_path}: {where}.apot_share must be a fraction from 0 to 1 or null, "
                                f"got {share!r}")
