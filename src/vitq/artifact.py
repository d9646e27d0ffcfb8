"""The reloadable quantized-model artifact: ``DIR/model.safetensors`` + ``DIR/config.json``.

``model.safetensors`` holds the prepared model's full state: the (float, possibly rewritten) weights
and every quantizer's parameters (scale, zero point, clip range). ``config.json`` holds what is needed
to rebuild the same structure: the model's timm name, the QuantConfig, and calibration counters used by
the report (values per image of each activation, MACs per layer). Reloading never recalibrates.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .quant.config import QuantConfig, TensorSpec
from .quant.engine import all_quantizers, compute_layers, prepare, weight_layers
from .zoo import ZooError, create_model, get_entry

FORMAT = "vitq-fakequant/1"


class ArtifactError(ValueError):
    """An unreadable, corrupted or incompatible artifact, naming the file."""


def is_artifact(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def artifact_files(model: nn.Module, meta: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON metadata that describe a calibrated model."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
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


def write_dir_atomically(out: str | Path, write) -> Path:
    """Build a result folder under a temporary name, then move it onto ``out``.

    ``write(tmp_dir)`` fills the folder. An interruption leaves any previous ``out`` untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_artifact(model: nn.Module, folder: Path, meta: dict) -> None:
    """Write ``model.safetensors`` and ``config.json`` into an (already temporary) folder."""
    from safetensors.torch import save_file

    state, meta = artifact_files(model, meta)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    (folder / "config.json").write_text(json.dumps(meta, indent=2))


def load_artifact(folder: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a quantized model from an artifact folder, ready to evaluate (no recalibration).

    Raises:
        ArtifactError: missing or corrupted files, another format version, or tensors that do not fit.
    """
    from safetensors import SafetensorError
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
    if meta.get("format") != FORMAT:
        raise ArtifactError(
            f"artifact {cfg_path} has format {meta.get('format')!r} (vitq {meta.get('vitq_version')}); "
            f"this vitq {__version__} reads {FORMAT!r}")
    try:
        state = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"artifact {st_path} is corrupted or unreadable: {exc}") from exc
    return rebuild(meta, state, cfg_path, st_path)


def rebuild(meta: dict, state: dict[str, torch.Tensor], cfg_path, st_path) -> tuple[nn.Module, dict]:
    """Build the prepared model that ``meta`` describes and load ``state`` into it (no calibration).

    Raises:
        ArtifactError: an unknown model, or tensors that do not fit it (naming the files).
    """
    try:
        entry = get_entry(meta["model"])
    except (KeyError, ZooError) as exc:
        raise ArtifactError(f"artifact {cfg_path} names no known model: {exc}") from exc
    config = QuantConfig.from_dict(meta["quant_config"])
    # model_kwargs: timm constructor options the model was built with (e.g. num_classes, img_size).
    model = prepare(create_model(entry, **meta.get("model_kwargs", {})), config, inplace=True)
    from .methods.sqb import restore_channel_affines

    restore_channel_affines(model, state)  # SQ-b's explicit per-channel operations (--sq-b-unnormed)
    from .methods.rotation import restore_rotations

    restore_rotations(model, state)  # online Hadamard rotations of fc2's input (--rotate)
    from .methods.token_scale import restore_token_scales

    restore_token_scales(model, state)  # static token-position factors on fc2's input (--token-scale)
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
    specs = meta.get("specs", {})
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
    return model.eval(), meta
