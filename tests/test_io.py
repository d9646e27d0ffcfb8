"""vitq.io: strict JSON and byte-reproducible safetensors files."""
import torch
from safetensors import safe_open

from vitq.io import save_safetensors


def test_safetensors_files_are_byte_reproducible(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.int8)}
    meta = {"format": "f", "model": "m", "binding": "0" * 64, "z": "y", "vitq_version": "1"}
    blobs = []
    for i in range(6):  # safetensors itself orders the metadata keys differently from run to run
        save_safetensors(tensors, tmp_path / f"{i}.safetensors", meta)
        blobs.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(set(blobs)) == 1
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("b"), tensors["b"])
