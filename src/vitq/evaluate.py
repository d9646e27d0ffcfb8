"""Classification evaluation: top-1/top-5, throughput, and agreement / KL against a reference model."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Batch


@dataclass
class EvalResult:
    """What one evaluation measured.

    ``images_per_s`` counts only the evaluated model's forward passes (not image decoding and not the
    reference model), so it compares models fairly; ``wall_s`` is the whole loop.
    ``agreement`` (% of images where top-1 equals the reference's top-1) and ``kl`` (mean
    KL(reference || model) of the softmax outputs, in nats) are None without a reference.
    """

    model: str = ""
    checkpoint: str | None = None
    n_images: int = 0
    n_bad_images: int = 0
    top1: float = 0.0
    top5: float = 0.0
    images_per_s: float = 0.0
    wall_s: float = 0.0
    agreement: float | None = None
    kl: float | None = None
    random_init: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = f"top1={self.top1:.2f} top5={self.top5:.2f} n={self.n_images} images/s={self.images_per_s:.1f}"
        if self.agreement is not None:
            s += f" agreement={self.agreement:.2f} kl={self.kl:.4f}"
        if self.n_bad_images:
            s += f" skipped_bad_images={self.n_bad_images}"
        if self.random_init:
            s += " (RANDOM-INIT weights: accuracy is meaningless)"
        return s

    def save(self, path) -> None:
        from .io import atomic_write_json

        atomic_write_json(path, self.to_dict())


def _batches(data) -> Iterable[Batch]:
    """Accept a DataLoader of Batch, an iterable of (images, labels), or a single (images, labels) pair."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
        for i in range(0, len(images), 32):
            yield Batch(images[i:i + 32], labels[i:i + 32])
        return
    for b in data:
        if isinstance(b, Batch):
            yield b
        else:
            yield Batch(b[0], b[1])


class _Tally:
    """Running top-1/top-5 counts, agreement and KL for one model."""

    def __init__(self):
        self.n = self.c1 = self.c5 = self.agree = 0
        self.kl_sum = 0.0
        self.model_s = 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor | None) -> None:
        top5 = logits.topk(5, dim=1).indices
        self.c1 += (top5[:, 0] == labels).sum().item()
        self.c5 += (top5 == labels[:, None]).any(dim=1).sum().item()
        if ref is not None:
            self.agree += (ref.argmax(1) == top5[:, 0]).sum().item()
            self.kl_sum += kl_from_reference(ref, logits).sum().item()
        self.n += len(labels)

    def result(self, name: str, n_bad: int, wall_s: float, has_ref: bool) -> EvalResult:
        if self.n == 0:
            raise ValueError("evaluation saw no images (empty dataset, or every image was unreadable)")
        return EvalResult(
            model=name, n_images=self.n, n_bad_images=n_bad, top1=100.0 * self.c1 / self.n,
            top5=100.0 * self.c5 / self.n, images_per_s=self.n / self.model_s if self.model_s > 0 else 0.0,
            wall_s=wall_s, agreement=100.0 * self.agree / self.n if has_ref else None,
            kl=self.kl_sum / self.n if has_ref else None,
        )


@torch.inference_mode()
def evaluate(model: nn.Module, data, reference: nn.Module | None = None, name: str = "",
             progress: bool = True) -> EvalResult:
    """Evaluate ``model`` on labelled images.

    Args:
        model: any classifier returning logits.
        data: a DataLoader yielding :class:`~vitq.data.Batch`, an iterable of ``(images, labels)``,
            or one ``(images, labels)`` tensor pair.
        reference: optional model (usually the FP original) for agreement and KL.
        name: model name written into the result.
        progress: show a tqdm bar.

    Returns:
        An :class:`EvalResult`.
    """
    if reference is None:
        return evaluate_many({name: model}, data, progress=progress)[name]
    results = evaluate_many({"__reference__": reference, name: model}, data, reference="__reference__",
                            progress=progress)
    return results[name]


@torch.inference_mode()
def evaluate_many(models: dict[str, nn.Module], data, reference: str | None = None,
                  progress: bool = True) -> dict[str, EvalResult]:
    """Evaluate several models in one pass over ``data`` (each image is decoded once).

    Args:
        models: name -> model.
        data: as for :func:`evaluate`.
        reference: the name (a key of ``models``) of the model the others are compared with.
        progress: show a tqdm bar.

    Returns:
        name -> :class:`EvalResult`; the reference's own agreement/KL are None.
    """
    if reference is not None and reference not in models:
        raise ValueError(f"reference '{reference}' is not one of the evaluated models")
    for m in models.values():
        m.eval()
    tallies = {k: _Tally() for k in models}
    order = ([reference] if reference else []) + [k for k in models if k != reference]
    n_bad = 0
    t0 = time.perf_counter()
    bar = tqdm(desc="eval", unit="img", disable=not progress, leave=False)
    for b in _batches(data):
        n_bad += b.n_bad
        if b.images.numel() == 0:
            continue
        ref_logits = None
        for key in order:
            t = time.perf_counter()
            logits = models[key](b.images).float()
            tallies[key].model_s += time.perf_counter() - t
            if key == reference:
                ref_logits = logits
            tallies[key].add(logits, b.labels, None if key == reference else ref_logits)
        bar.update(len(b.labels))
    bar.close()
    wall = time.perf_counter() - t0
    return {k: tallies[k].result(k, n_bad, wall, reference is not None and k != reference) for k in models}


def kl_from_reference(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-image KL(softmax(ref) || softmax(logits)) in nats."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=1)
    logp = F.log_softmax(logits.float(), dim=1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(dim=1)
