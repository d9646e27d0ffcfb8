"""Classification evaluation: top-1/top-5, throughput, and agreement / KL against a reference model."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Batch
from .device import model_device
from .distributed import gather_objects, interleave, world_size
from .finite import NonFiniteError, nonfinite_message


@dataclass
class EvalResult:
    """What one evaluation measured.

    ``images_per_s`` counts only the evaluated model's forward passes (not image decoding and not the
    reference model), so it compares models fairly; ``wall_s`` is the whole loop.
    ``agreement`` (% of images where top-1 equals the reference's top-1) and ``kl`` (mean
    KL(reference || model) of the softmax outputs, in nats) are None without a reference.

    Standard errors over images (None without a reference, or with fewer than 2 images), so that a
    difference can be read against the noise of the image sample (docs/design.md "Uncertainty"):
    ``top1_delta_se`` is the *paired* standard error of ``top1 - reference top1`` in points (both are
    measured on the same images, so only the images where exactly one of the two is right count),
    ``agreement_se`` that of ``agreement`` in points, ``kl_se`` that of ``kl``. 1.96 SE is a 95 % interval.
    ``ref_top1`` is the reference's top-1 on the same images.
    ``per_image`` (only when asked for): lists over the images in evaluation order, ``"correct"`` (0/1,
    top-1), ``"ref_correct"``, ``"agree"`` (0/1) and ``"kl"``, for paired comparisons between models.
    """

    model: str = ""
    checkpoint: str | None = None
    n_images: int = 0
    n_bad_images: int = 0
    top1: float | None = 0.0  # None: the images have no labels (agreement and KL still measured)
    top5: float | None = 0.0
    images_per_s: float = 0.0
    wall_s: float = 0.0
    agreement: float | None = None
    kl: float | None = None
    random_init: bool = False
    ref_top1: float | None = None
    top1_delta_se: float | None = None
    agreement_se: float | None = None
    kl_se: float | None = None
    per_image: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["per_image"] is None:
            d.pop("per_image")
        return d

    def summary(self) -> str:
        acc = "top1=n/a (no labels)" if self.top1 is None else f"top1={self.top1:.2f} top5={self.top5:.2f}"
        s = f"{acc} n={self.n_images} images/s={self.images_per_s:.1f}"
        if self.agreement is not None:
            s += f" agreement={self.agreement:.2f} kl={self.kl:.4f}"
            if self.agreement_se is not None:
                s += (" (SE: " + ("" if self.top1_delta_se is None else f"top1-ref {self.top1_delta_se:.2f}, ")
                      + f"agreement {self.agreement_se:.2f}, kl {self.kl_se:.4f})")
        if self.n_bad_images:
            s += f" skipped_bad_images={self.n_bad_images}"
        if self.random_init:
            s += " (RANDOM-INIT weights: accuracy is meaningless)"
        return s

    def save(self, path) -> None:
        from .io import atomic_write_json, output_json

        atomic_write_json(path, output_json(self.to_dict(), "eval"))


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


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)).

    Args:
        values: one number per image; for a paired difference, the per-image differences.

    Returns:
        ``(mean, se)``; ``se`` is None for fewer than 2 values.

    Raises:
        ValueError: on an empty sequence.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_se needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of ``b - a`` over paired per-image values (the same images, same order).

    Pairing removes the variation both models share (an image hard for one is usually hard for the
    other), so the error of a difference is usually far below either model's own error.

    Args:
        a, b: one value per image each (e.g. 0/1 top-1 correctness, or KL), equally long.

    Returns:
        ``(mean, se)`` as :func:`mean_se` of the per-image differences.

    Raises:
        ValueError: when the two sequences differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    return mean_se([y - x for x, y in zip(a, b)])


class _Tally:
    """Running top-1/top-5 counts, agreement and KL for one model, and the per-image values behind them."""

    def __init__(self):
        self.n = self.c5 = 0
        self.kl_sum = 0.0  # summed per batch as before kl_i existed, so the reported mean KL keeps its last digits
        self.model_s = 0.0
        self.correct: list[int] = []
        self.labelled = True  # every image so far had a label (>= 0)
        self.agree_i: list[int] = []
        self.kl_i: list[float] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor | None) -> None:
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.labelled = self.labelled and bool((labels >= 0).all())
        self.correct += (top5[:, 0] == labels).int().tolist()
        self.c5 += (top5 == labels[:, None]).any(dim=1).sum().item()
        if ref is not None:
            kl = kl_from_reference(ref, logits)
            self.kl_sum += kl.sum().item()
            self.agree_i += (ref.argmax(1) == top5[:, 0]).int().tolist()
            self.kl_i += kl.tolist()
        self.n += len(labels)

    @classmethod
    def merge(cls, parts: list[_Tally]) -> _Tally:
        """One tally over every process's images (each process evaluated every N-th image, in order)."""
        t = cls()
        t.n, t.c5 = sum(p.n for p in parts), sum(p.c5 for p in parts)
        t.model_s = max(p.model_s for p in parts)  # the processes run side by side
        t.labelled = all(p.labelled for p in parts)
        t.correct = interleave([p.correct for p in parts])
        t.agree_i, t.kl_i = interleave([p.agree_i for p in parts]), interleave([p.kl_i for p in parts])
        t.kl_sum = math.fsum(t.kl_i)
        return t

    def result(self, name: str, n_bad: int, wall_s: float, ref: _Tally | None, per_image: bool) -> EvalResult:
        if self.n == 0:
            raise ValueError("evaluation saw no images (empty dataset, or every image was unreadable)")
        labelled = self.labelled and (ref is None or ref.labelled)
        r = EvalResult(
            model=name, n_images=self.n, n_bad_images=n_bad,
            top1=100.0 * sum(self.correct) / self.n if labelled else None,
            top5=100.0 * self.c5 / self.n if labelled else None,
            images_per_s=self.n / self.model_s if self.model_s > 0 else 0.0,
            wall_s=wall_s, agreement=100.0 * sum(self.agree_i) / self.n if ref else None,
            kl=self.kl_sum / self.n if ref else None,
        )
        if ref is not None:
            if labelled:
                r.ref_top1 = 100.0 * sum(ref.correct) / ref.n
                r.top1_delta_se = paired_difference([100.0 * c for c in ref.correct],
                                                    [100.0 * c for c in self.correct])[1]
            r.agreement_se = mean_se([100.0 * a for a in self.agree_i])[1]
            r.kl_se = mean_se(self.kl_i)[1]
        if per_image:
            r.per_image = {"correct": self.correct if labelled else None, "agree": self.agree_i if ref else None,
                           "kl": self.kl_i if ref else None, "ref_correct": ref.correct if ref else None}
        return r


@torch.inference_mode()
def evaluate(model: nn.Module, data, reference: nn.Module | None = None, name: str = "",
             progress: bool = True, per_image: bool = False) -> EvalResult:
    """Evaluate ``model`` on images (labelled: top-1 and top-5; label -1: agreement and KL only).

    Args:
        model: any classifier returning logits.
        data: a DataLoader yielding :class:`~vitq.data.Batch`, an iterable of ``(images, labels)``,
            or one ``(images, labels)`` tensor pair.
        reference: optional model (usually the FP original) for agreement and KL.
        name: model name written into the result.
        progress: show a tqdm bar.
        per_image: keep the per-image values in ``EvalResult.per_image``.

    Returns:
        An :class:`EvalResult`.
    """
    if reference is None:
        return evaluate_many({name: model}, data, progress=progress, per_image=per_image)[name]
    results = evaluate_many({"__reference__": reference, name: model}, data, reference="__reference__",
                            progress=progress, per_image=per_image)
    return results[name]


@torch.inference_mode()
def evaluate_many(models: dict[str, nn.Module], data, reference: str | None = None,
                  progress: bool = True, per_image: bool = False) -> dict[str, EvalResult]:
    """Evaluate several models in one pass over ``data`` (each image is decoded once).

    Args:
        models: name -> model.
        data: as for :func:`evaluate`.
        reference: the name (a key of ``models``) of the model the others are compared with.
        progress: show a tqdm bar.
        per_image: keep the per-image values in each ``EvalResult.per_image``.

    Under torchrun (``vitq.distributed``), each process passes its own share of the images
    (``distributed.shard_dataset``); the per-image values are gathered, so every process returns the metrics
    of all the images.

    Returns:
        name -> :class:`EvalResult`; the reference's own agreement/KL (and their errors) are None.
    """
    if reference is not None and reference not in models:
        raise ValueError(f"reference '{reference}' is not one of the evaluated models")
    for m in models.values():
        m.eval()
    device = model_device(next(iter(models.values())))
    tallies = {k: _Tally() for k in models}
    order = ([reference] if reference else []) + [k for k in models if k != reference]
    n_bad = 0
    t0 = time.perf_counter()
    bar = tqdm(desc="eval", unit="img", disable=None if progress else True, leave=False)
    for b in _batches(data):
        n_bad += b.n_bad
        if b.images.numel() == 0:
            continue
        images, labels = b.images.to(device, non_blocking=True), b.labels.to(device, non_blocking=True)
        ref_logits = None
        for key in order:
            t = time.perf_counter()
            logits = models[key](images).float()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the kernels run asynchronously: time them, not their launch
            tallies[key].model_s += time.perf_counter() - t
            if not torch.isfinite(logits).all():
                raise NonFiniteError(nonfinite_message(models[key], images, f"model '{key}'" if key else "the model"))
            if key == reference:
                ref_logits = logits
            tallies[key].add(logits, labels, None if key == reference else ref_logits)
        bar.update(len(b.labels))
    bar.close()
    wall = time.perf_counter() - t0
    if world_size() > 1:  # under torchrun each process saw its share of the images (distributed.shard_dataset)
        parts = gather_objects((tallies, n_bad, wall))
        tallies = {k: _Tally.merge([p[0][k] for p in parts]) for k in models}
        n_bad, wall = sum(p[1] for p in parts), max(p[2] for p in parts)
    ref = tallies[reference] if reference is not None else None
    return {k: tallies[k].result(k, n_bad, wall, ref if k != reference else None, per_image) for k in models}


def kl_from_reference(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-image KL(softmax(ref) || softmax(logits)) in nats."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=1)
    logp = F.log_softmax(logits.float(), dim=1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(dim=1)
