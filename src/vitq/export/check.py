"""An exported model's agreement with the simulation it was exported from (ONNX Runtime or a compiled PT2E
program against vitq's fake-quant model)."""
from __future__ import annotations

import torch
from torch import nn

from ..device import model_device


def agreement_with_simulation(run, model: nn.Module, images: torch.Tensor, batch: int = 32) -> dict:
    """Run ``run`` (images -> logits, on the CPU) and the simulation on ``images``: top-1 agreement (%) and
    the largest logit difference."""
    agree, diff = 0, 0.0
    with torch.no_grad():
        for x in images.split(batch):
            a, b = run(x).float(), model(x.to(model_device(model))).float().cpu()
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            diff = max(diff, float((a - b).abs().max()))
    return {"images": len(images), "agreement": 100.0 * agree / max(1, len(images)), "max_logit_diff": diff}
