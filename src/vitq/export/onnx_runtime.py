"""An exported ONNX file as a model: ONNX Runtime behind an ``nn.Module``, so ``vitq eval model.onnx`` and the
export's own check evaluate it with the same code as any PyTorch model."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class OnnxModel(nn.Module):
    """Runs an ONNX file with ONNX Runtime on the CPU (all graph optimizations); images in, logits out.

    Args:
        path: the ``.onnx`` file (its first input takes the images, its first output gives the logits).
        threads: intra-op threads (0: ONNX Runtime's default).
    """

    def __init__(self, path: str | Path, threads: int = 0):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.register_buffer("_device_marker", torch.zeros(0), persistent=False)  # evaluate() feeds it CPU tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().contiguous().numpy()})[0]
        return torch.from_numpy(out)
