"""Shared fixtures: tiny random-init models of every family, synthetic image folders, the real assets."""
from __future__ import annotations

import os
from pathlib import Path

# Tests never reach a model hub: set before timm/huggingface_hub read it, so a missing checkpoint fails
# at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import timm
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("VITQ_ASSETS", REPO.parent / "shared" / "assets"))

# Tiny configs of each family (random init): small enough for fast tests, same module structure.
TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2)), 64),
    "efficientvit": ("efficientvit_b0", {}, 64),
    "cnn": ("tf_efficientnet_lite0", {}, 64),
}


def tiny_model(family: str, seed: int = 0):
    """A random-init tiny model of ``family`` and its input size."""
    name, kwargs, size = TINY[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    # Random-init BatchNorm has identity statistics; give it real ones so folding is really tested.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model, size


def tiny_vit_with_massive_position(n: int = 4, family: str = "vit", position: int = 2, channel: int = 3):
    """A tiny ViT/DeiT whose residual stream has one massive value at a fixed token position (as ViT-Tiny's
    corner patches, docs/lab/results-log.md Session 17), and ``n`` images for it."""
    model, size = tiny_model(family)
    with torch.no_grad():
        model.pos_embed[:, position, channel] += 300.0
    return model, tiny_images(size, n=n)


def tiny_images(size: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def write_images(folder: Path, synsets: list[str], layout: str = "flat", size: int = 40, seed: int = 0) -> list[str]:
    """Write small random JPEGs in the flat (synset-prefixed names) or synset-folder layout."""
    rng = np.random.default_rng(seed)
    names = []
    for i, s in enumerate(synsets):
        rel = f"{s}_img{i}.JPEG" if layout == "flat" else f"{s}/img{i}.JPEG"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size + 7, 3), dtype=np.uint8)).save(path, "JPEG")
        names.append(rel)
    return names


@pytest.fixture
def assets() -> Path:
    if not (ASSETS / "models" / "deit_tiny_patch16_224.safetensors").is_file():
        pytest.skip(f"real assets not found at {ASSETS} (set VITQ_ASSETS or place ../shared/assets beside the repo)")
    return ASSETS
