"""Many processes on ``torch.distributed``: ``torchrun --nproc-per-node N -m vitq quantize|eval ...``.

What is split and what is repeated:

- Evaluation: each process takes every N-th image (:func:`shard_dataset`) and the per-image values are
  gathered (:func:`gather_objects`), so every metric is computed over all the images, as one process would.
- The mixed-precision search: its probes (one model run per layer and candidate width, the search's cost) are
  split between the processes (:func:`split_map`) and gathered in order; every process then makes the same
  choice from the same numbers.
- Calibration and every pass that sets a grid run on all the calibration images in every process. They are
  deterministic and take a few dozen images, so each process builds the same grids as a single process would,
  byte for byte, with nothing to merge.

Only the first process (rank 0) prints and writes; the others compute. With one process (no torchrun) every
function here is the identity, so the API and the CLI need no other code path.
"""
from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


def init(device: torch.device | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), once.

    Args:
        device: the device this process computes on: ``nccl`` for CUDA, else ``gloo``.

    Returns:
        Whether more than one process runs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    return dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process prints and writes (rank 0)."""
    return rank() == 0


def gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` with one process."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def split_map(fn: Callable, items: Sequence) -> list:
    """``[fn(x) for x in items]``, each process computing every N-th item of a fixed shuffle of them; every
    process gets the full list.

    ``fn`` must not depend on which items ran before it in the same process (each item is measured from the
    same state), so the result equals one process's, value for value.
    """
    n, r = world_size(), rank()
    if n == 1:
        return [fn(x) for x in items]
    # Deal the items out in a fixed shuffled order: neighbours often cost alike in a pattern (a block's
    # layers alternate narrow and wide inputs), which taking every N-th item in order would hand to one process.
    order = list(range(len(items)))
    random.Random(len(items)).shuffle(order)
    mine = {i: fn(items[i]) for k, i in enumerate(order) if k % n == r}
    merged: dict = {}
    for part in gather_objects(mine):
        merged.update(part)
    return [merged[i] for i in range(len(items))]


def interleave(parts: list[list]) -> list:
    """Undo :func:`shard`: ``parts[r]`` holds items ``r, r + N, r + 2N, ...`` of the original list."""
    out = []
    for k in range(max((len(p) for p in parts), default=0)):
        out += [p[k] for p in parts if k < len(p)]
    return out


def shard(seq: Sequence) -> list:
    """This process's share of ``seq``: every N-th item from its rank (the whole list with one process)."""
    return list(seq[rank()::world_size()])


def shard_dataset(dataset):
    """This process's images of a :class:`~vitq.data.ImageNetFiles` (labels as resolved on all of them)."""
    if world_size() == 1:
        return dataset
    part = copy.copy(dataset)
    part.files, part.labels = shard(dataset.files), shard(dataset.labels)
    part.skipped = []
    return part

