"""Your own model on your own data: a DeiT-Tiny with a fine-tuned 2-class head, quantized and evaluated from the
command line on two class folders.

The head is a linear probe on the real DeiT-Tiny's features (logistic regression on the training half), for
"dog" (ImageNet classes 151-268) against "other" (as many other classes, seeded); each of the shared images
is one class, so each folder holds half of its class's images: ``train/{dog,other}`` calibrates and
``test/{dog,other}`` evaluates. The folders are links to ``../shared/assets`` in ``--work`` (nothing is
copied); the checkpoint is written there too. Then, as a user would:

    vitq quantize deit_tiny --checkpoint WORK/deit_tiny_dog.safetensors --calib WORK/train --eval WORK/test ...
    vitq eval WORK/q-w8a8 --data WORK/test

    python benchmarks/custom_head.py --work /tmp/vitq-two-class
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vitq.data import imagenet_synsets, load_tensors, make_dataset
from vitq.zoo import load_model

DOGS = range(151, 269)  # ImageNet-1k class indices of the dog breeds


def build_folders(assets: Path, work: Path, seed: int) -> None:
    images = sorted((assets / "imagenet-sample").iterdir())
    synsets = imagenet_synsets()
    by_class = {"dog": [p for p in images if synsets.index(p.name.split("_")[0]) in DOGS]}
    others = [p for p in images if synsets.index(p.name.split("_")[0]) not in DOGS]
    by_class["other"] = sorted(random.Random(seed).sample(others, len(by_class["dog"])))
    for cls, files in by_class.items():
        for i, src in enumerate(files):
            dst = work / ("train" if i % 2 == 0 else "test") / cls / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(src)


def fit_head(work: Path) -> Path:
    """The real DeiT-Tiny with a 2-class linear head fitted on train/ (its features stay as they are)."""
    loaded = load_model("deit_tiny")
    model = loaded.model
    x, y = load_tensors(make_dataset(work / "train", loaded.entry.transform, labels="folders"), workers=0)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.manual_seed(0)
    head = torch.nn.Linear(feats.shape[1], 2)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(feats), y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    state.update({"head.weight": head.weight.detach().contiguous(), "head.bias": head.bias.detach().contiguous()})
    path = work / "deit_tiny_dog.safetensors"
    save_file(state, str(path))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--work", default="/tmp/vitq-two-class", help="where the linked folders, checkpoint and results go")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    assets, work = Path(args.assets).resolve(), Path(args.work)
    marker = work / ".vitq-custom-head"  # what this script writes there is its own to replace, nothing else
    if work.exists() and not marker.is_file():
        ap.error(f"--work {work} exists and was not made by this script; give a new folder")
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.environ["VITQ_ASSETS"] = str(assets)
    build_folders(assets, work, args.seed)
    ckpt = fit_head(work)
    print(f"# custom head: {sum(1 for _ in (work / 'train').rglob('*.JPEG'))} training and "
          f"{sum(1 for _ in (work / 'test').rglob('*.JPEG'))} test images, checkpoint {ckpt}", flush=True)
    for bits in (8, 4):
        out = work / f"q-w{bits}a{bits}"
        cmd = ["vitq", "quantize", "deit_tiny", "--checkpoint", str(ckpt), "--calib", str(work / "train"),
               "--eval", str(work / "test"), "--w-bits", str(bits), "--a-bits", str(bits), "-q", "--overwrite",
               "--out", str(out)]
        print("$ " + " ".join(cmd).replace(str(work), "WORK"), flush=True)
        subprocess.run(cmd, check=True)
        cmd = ["vitq", "eval", str(out), "--data", str(work / "test"), "-q"]
        print("$ " + " ".join(cmd).replace(str(work), "WORK"), flush=True)
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
