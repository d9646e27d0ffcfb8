"""Classification evaluation: top-1/top-5, throughput, and agreement / KL against a reference model."""
from __future__ import annotations

import json
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
        from .io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))


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


@torch.inference_mode()
def evaluate(model: nn.Module, data, reference: nn.Module | None = None, name: str = "",
             progress: bool = True, reference_logits: list[torch.Tensor] | None = None) -> EvalResult:
    """Evaluate ``model`` on labelled images.

    Args:
        model: any classifier returning logits.
        data: a DataLoader yielding :class:`~vitq.data.Batch`, an iterable of ``(images, labels)``,
            or one ``(images, labels)`` tensor pair.
        reference: optional model (usually the FP original) for agreement and KL.
        name: model name written into the result.
        progress: show a tqdm bar.
        reference_logits: precomputed reference logits per batch (same batching as ``data``),
            used instead of running ``reference``.

    Returns:
        An :class:`EvalResult`.
    """
    model.eval()
    if reference is not None:
        reference.eval()
    n = n_bad = c1 = c5 = agree = 0
    kl_sum = 0.0
    model_s = 0.0
    t0 = time.perf_counter()
    bar = tqdm(desc=f"eval {name}".strip(), unit="img", disable=not progress, leave=False)
    for bi, b in enumerate(_batches(data)):
        n_bad += b.n_bad
        if b.images.numel() == 0:
            continue
        t = time.perf_counter()
        logits = model(b.images).float()
        model_s += time.perf_counter() - t
        top5 = logits.topk(5, dim=1).indices
        c1 += (top5[:, 0] == b.labels).sum().item()
        c5 += (top5 == b.labels[:, None]).any(dim=1).sum().item()
        ref = reference_logits[bi] if reference_logits is not None else (
            reference(b.images).float() if reference is not None else None)
        if ref is not None:
            agree += (ref.argmax(1) == top5[:, 0]).sum().item()
            kl_sum += kl_from_reference(ref, logits).sum().item()
        n += len(b.labels)
        bar.update(len(b.labels))
    bar.close()
    if n == 0:
        raise ValueError("evaluation saw no images (empty dataset, or every image was unreadable)")
    has_ref = reference is not None or reference_logits is not None
    return EvalResult(
        model=name, n_images=n, n_bad_images=n_bad, top1=100.0 * c1 / n, top5=100.0 * c5 / n,
        images_per_s=n / model_s if model_s > 0 else 0.0, wall_s=time.perf_counter() - t0,
        agreement=100.0 * agree / n if has_ref else None, kl=kl_sum / n if has_ref else None,
    )


def kl_from_reference(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-image KL(softmax(ref) || softmax(logits)) in nats."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=1)
    logp = F.log_softmax(logits.float(), dim=1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(dim=1)
