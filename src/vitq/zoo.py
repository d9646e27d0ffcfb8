"""Model zoo and any other timm model: pinned tags, eval transforms, checkpoint loading, the classifier size.

The zoo is the list of pinned, measured models: every entry pins a timm *tag*
(``deit_tiny_patch16_224.fb_in1k``), because the tag decides both the weights and the evaluation transform.
Any other timm name is accepted too (:func:`get_entry`); its family is found from the model's modules by
the adapters (``vitq.adapters.adapter_for``), which refuse an architecture none of them covers. Every
evaluation transform is timm's own pretrained config of the name (:meth:`EvalTransform.from_timm`).

Checkpoint resolution order (see :func:`resolve_checkpoint`):
  1. an explicit path given by the caller;
  2. ``$VITQ_ASSETS/models/<name without tag>.safetensors`` or ``<name with tag>.safetensors``;
  3. timm's own download (works only with internet access).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import timm
from torch import nn

FAMILIES = ("vit", "deit", "swin", "efficientvit", "cnn")


class ZooError(ValueError):
    """A model name, checkpoint or weight file problem, with a message that names it."""


@dataclass(frozen=True)
class EvalTransform:
    """The evaluation preprocessing of one pretrained tag (timm's ``pretrained_cfg`` fields)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    crop_pct: float = 0.9
    crop_mode: str = "center"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_timm(cls, name: str) -> EvalTransform:
        """timm's pretrained data config of ``name`` (with or without a tag; no download).

        Raises:
            ZooError: timm knows no such model.
        """
        from timm.models import get_pretrained_cfg

        c = get_pretrained_cfg(name) if timm.is_model(name.split(".")[0]) else None
        if c is None:
            raise ZooError(f"timm has no pretrained config for '{name}'")
        return cls(input_size=tuple(c.input_size), interpolation=c.interpolation or "bicubic",
                   crop_pct=float(c.crop_pct or 0.875), crop_mode=c.crop_mode or "center",
                   mean=tuple(float(v) for v in c.mean), std=tuple(float(v) for v in c.std))


@dataclass(frozen=True)
class ZooEntry:
    """One supported model."""

    short: str
    timm_name: str  # with the pinned tag (any timm name outside the zoo)
    family: str  # the zoo's; "" outside the zoo (the adapter found from the model's modules says)
    transform: EvalTransform = field(default_factory=EvalTransform)
    pinned: bool = True  # a zoo entry (measured), not any timm name

    @property
    def arch(self) -> str:
        """timm architecture name without the tag."""
        return self.timm_name.split(".")[0]


def _e(short: str, name: str, family: str) -> ZooEntry:
    return ZooEntry(short, name, family, EvalTransform.from_timm(name))


ZOO: dict[str, ZooEntry] = {
    e.short: e
    for e in [
        _e("deit_tiny", "deit_tiny_patch16_224.fb_in1k", "deit"),
        _e("deit_small", "deit_small_patch16_224.fb_in1k", "deit"),
        _e("deit_base", "deit_base_patch16_224.fb_in1k", "deit"),
        # AugReg in21k->in1k fine-tunes, not timm's default augreg2 tag: the shared ViT-Tiny is this one.
        _e("vit_tiny", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "vit"),
        _e("vit_small", "vit_small_patch16_224.augreg_in21k_ft_in1k", "vit"),
        _e("vit_base", "vit_base_patch16_224.augreg_in21k_ft_in1k", "vit"),
        _e("swin_tiny", "swin_tiny_patch4_window7_224.ms_in1k", "swin"),
        _e("swin_small", "swin_small_patch4_window7_224.ms_in1k", "swin"),
        _e("efficientvit_b0", "efficientvit_b0.r224_in1k", "efficientvit"),
        _e("efficientvit_b1", "efficientvit_b1.r224_in1k", "efficientvit"),
        _e("efficientvit_b2", "efficientvit_b2.r224_in1k", "efficientvit"),
        _e("tf_efficientnet_lite0", "tf_efficientnet_lite0.in1k", "cnn"),
    ]
}


def get_entry(name: str) -> ZooEntry:
    """Look a model up by zoo short name, timm name with tag, or timm name without tag; any other timm model
    name gives an entry outside the zoo (``pinned=False``, transform from timm's config).

    Raises:
        ZooError: a name timm does not know either; the message suggests the closest known names.
    """
    if name in ZOO:
        return ZOO[name]
    for e in ZOO.values():
        if name in (e.timm_name, e.arch):
            return e
    if timm.is_model(name.split(".")[0]):
        return ZooEntry(name, name, "", EvalTransform.from_timm(name), pinned=False)
    known = list(ZOO) + [e.timm_name for e in ZOO.values()]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5) or timm.list_models(f"*{name[:6]}*")[:3]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ZooError(f"unknown model '{name}': neither in vitq's zoo nor a timm model.{hint} Run `vitq models` for the "
                   "zoo (measured models); any timm model of a supported family works by its timm name.")


def assets_dir() -> Path | None:
    """The shared assets folder from ``$VITQ_ASSETS``, or None when unset."""
    value = os.environ.get("VITQ_ASSETS")
    return Path(value) if value else None


def candidate_checkpoints(entry: ZooEntry) -> list[Path]:
    """Local files tried, in order, when no explicit checkpoint is given."""
    root = assets_dir()
    if root is None:
        return []
    return [root / "models" / f"{entry.arch}.safetensors", root / "models" / f"{entry.timm_name}.safetensors"]


def resolve_checkpoint(entry: ZooEntry, checkpoint: str | os.PathLike | None) -> Path | None:
    """Find the weight file for ``entry``; None means "let timm download".

    Raises:
        ZooError: an explicit checkpoint that does not exist.
    """
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ZooError(f"checkpoint file not found: {path}")
        return path
    for path in candidate_checkpoints(entry):
        if path.is_file():
            return path
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors, or a .pth/.pt with an optional ``model``/``state_dict`` wrapper.

    .pth files are read with ``weights_only=True``: a checkpoint never runs code.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix in (".pth", ".pt", ".bin"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            for key in ("model", "state_dict", "model_state_dict"):
                if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
            if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                raise ZooError(f"checkpoint {path} does not hold a state dict of tensors")
            return obj
    except ZooError:
        raise
    except Exception as exc:  # corrupt file, wrong format: say which file
        raise ZooError(f"cannot read checkpoint {path}: {exc}") from exc
    raise ZooError(f"checkpoint {path}: unsupported extension '{suffix}' (use .safetensors, .pth or .pt)")


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` and fail loudly on any missing, unexpected or mis-shaped key.

    Raises:
        ZooError: listing the first few problems of each kind.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:5])}")
        raise ZooError(f"checkpoint {source} does not fit the model: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)


@dataclass
class LoadedModel:
    """A model with where its weights came from; ``random_init`` is carried into every report."""

    model: nn.Module
    entry: ZooEntry
    checkpoint: str | None
    random_init: bool
    model_kwargs: dict = field(default_factory=dict)  # timm constructor options (num_classes); artifacts keep them


def create_model(entry: ZooEntry, **kwargs) -> nn.Module:
    """Build the architecture of ``entry`` with random weights (no download)."""
    return timm.create_model(entry.timm_name, pretrained=False, **kwargs)


def classifier_size(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The number of classes of the checkpoint's classifier (timm's ``pretrained_cfg["classifier"]`` names it),
    or None when the state has no such weight."""
    names = model.pretrained_cfg.get("classifier") or ()
    for name in (names,) if isinstance(names, str) else names:
        w = state.get(f"{name}.weight")
        if w is not None and w.dim() >= 1:
            return int(w.shape[0])
    return None


def load_model(name: str, checkpoint: str | os.PathLike | None = None, random_init: bool = False,
               num_classes: int | None = None) -> LoadedModel:
    """Build a zoo or timm model and load its weights.

    Args:
        name: zoo short name, or timm name with or without tag.
        checkpoint: explicit weight file; otherwise ``$VITQ_ASSETS/models`` is searched, then timm downloads.
        random_init: build with random weights, only when asked (never a fallback).
        num_classes: the classifier's size; default: the checkpoint's (a fine-tuned head), else timm's.

    Raises:
        ZooError: unknown model, unreadable or non-fitting checkpoint, or no weights to be had.
    """
    entry = get_entry(name)
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
        raise ZooError(f"--num-classes must be a positive integer, got {num_classes}")
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    if random_init:
        if checkpoint is not None:
            raise ZooError("--random-init and --checkpoint exclude each other")
        torch.manual_seed(0)  # random init is still reproducible
        return LoadedModel(create_model(entry, **kwargs).eval(), entry, None, True, kwargs)
    path = resolve_checkpoint(entry, checkpoint)
    if path is not None:
        state = read_state_dict(path)
        model = create_model(entry, **kwargs)
        found = classifier_size(model, state)
        if num_classes is None and found is not None and found != model.num_classes:
            kwargs = {"num_classes": found}  # a fine-tuned head: build the model to fit it
            model = create_model(entry, **kwargs)
        load_strict(model, state, str(path))
        from .finite import check_state_finite

        check_state_finite(model, f"checkpoint {path}")
        return LoadedModel(model.eval(), entry, str(path), False, kwargs)
    tried = [str(p) for p in candidate_checkpoints(entry)]
    try:
        model = timm.create_model(entry.timm_name, pretrained=True, **kwargs)
    except Exception as exc:
        where = f"tried: {', '.join(tried)}; " if tried else "VITQ_ASSETS is not set; "
        raise ZooError(
            f"no weights for {entry.timm_name}: {where}timm's download failed ({type(exc).__name__}). "
            f"Pass --checkpoint PATH (.safetensors or .pth), or --random-init for structure-only work."
        ) from exc
    return LoadedModel(model.eval(), entry, f"timm:{entry.timm_name}", False, kwargs)
