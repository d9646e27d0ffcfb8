"""The packed artifact: one safetensors file with weights as real integers (``vitq export --format vitq``).

Every quantized weight is stored as its integer codes, bit-packed: widths of 4 bits or fewer share a
byte (``8 // bits`` codes per byte: two 4-bit or 3-bit codes, four 2-bit codes), wider ones take one
byte each. Uniform codes are stored as ``code - qmin`` (unsigned); power-of-two codes as
``sign << (bits - 1) | exponent code``. Scales, zero points, every quantizer parameter and every
unquantized tensor (biases, norms, embeddings) stay in fp32; the zero points (all 0) and clip ranges of
symmetric weight grids are left out and re-derived from the scales on load. Tensors of at most
``SMALL_NUMEL`` values (the per-tensor parameters of every activation quantizer, several hundred of them)
are concatenated per dtype into one ``__small__.<dtype>`` tensor, because safetensors' per-tensor index
entry (about 100 bytes of JSON each) would otherwise outweigh their data. The safetensors metadata holds
the format tag, the vitq version and, under ``meta`` (``meta_encoding: zlib+base64``), the JSON
description the folder artifact keeps in ``config.json`` plus the packed tensors' shapes and the names in
each ``__small__`` tensor. Format 2 (these two size measures) replaced format 1 in vitq 0.1's development;
format-1 files are refused with a message that says so.

Loading decodes the codes with the same arithmetic the simulation uses, so the rebuilt model's outputs
are bit-identical to the simulated model's (tested).
"""
from __future__ import annotations

import base64
import json
import math
import zlib
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..artifact import ArtifactError, artifact_files, rebuild
from ..io import atomic_path, save_safetensors
from ..quant import quantizers as Q
from ..quant.engine import weight_layers
from ..quant.layers import TensorQuantizer

FORMAT = "vitq-packed/2"
SMALL_NUMEL = 16  # tensors this small go into the shared __small__.<dtype> tensors
META_ENCODING = "zlib+base64"


def encode_meta(meta: dict) -> str:
    """The JSON description, compressed (it repeats layer names hundreds of times)."""
    raw = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def decode_meta(text: str) -> dict:
    """Inverse of :func:`encode_meta`."""
    return json.loads(zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True)))


def merge_small(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """Concatenate the tensors of at most ``SMALL_NUMEL`` values per dtype; returns the new state and index."""
    out, index, parts = {}, {}, {}
    for k in sorted(state):
        v = state[k]
        if v.numel() <= SMALL_NUMEL and not k.endswith(".__packed__"):
            dt = str(v.dtype).removeprefix("torch.")
            index.setdefault(dt, []).append([k, list(v.shape)])
            parts.setdefault(dt, []).append(v.reshape(-1))
        else:
            out[k] = v
    for dt, vs in parts.items():
        out[f"__small__.{dt}"] = torch.cat(vs)
    return out, index


def split_small(state: dict[str, torch.Tensor], index: dict[str, list], path) -> None:
    """Inverse of :func:`merge_small`, in place; a size mismatch is an :class:`ArtifactError`."""
    for dt, entries in index.items():
        flat = state.pop(f"__small__.{dt}", None)
        need = sum(math.prod(shape) for _, shape in entries)
        if flat is None or flat.numel() != need:
            raise ArtifactError(f"{path}: the shared '__small__.{dt}' tensor is missing or has the wrong size")
        at = 0
        for name, shape in entries:
            n = math.prod(shape)
            state[name] = flat[at:at + n].reshape(shape).clone()
            at += n


def codes_per_byte(bits: int) -> int:
    """How many codes share a byte: ``8 // bits`` up to 4 bits, else one."""
    return 8 // bits if bits <= 4 else 1


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2^bits) into a flat uint8 tensor, low bits first."""
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    per = codes_per_byte(bits)
    if per == 1:
        return flat.to(torch.uint8)
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as int64."""
    per = codes_per_byte(bits)
    d = data.to(torch.int64)
    if per == 1:
        return d[:n]
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return ((d[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:n]


def _view(q: TensorQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The weight as the quantizer sees it and the shape its (per-channel/group) parameters broadcast to."""
    v, axis = q._weight_view(w)
    shape = [-1] + [1] * (v.dim() - 1) if axis is not None else []
    return v, shape


def encode_weight(q: TensorQuantizer, w: torch.Tensor) -> torch.Tensor:
    """Unsigned integer codes of ``w`` under the calibrated weight quantizer ``q`` (shape of ``w``)."""
    v, shape = _view(q, w.detach())
    bits = q.spec.bits
    if q.spec.scheme == "pot":
        sign, code = Q.quantize_pot(v, q.scale.reshape(shape), bits, signed=True)
        return ((sign < 0).to(torch.int64) << (bits - 1) | code.to(torch.int64)).reshape(w.shape)
    qmin, _ = q._qrange()
    scale, zp = (q.scale.reshape(shape), q.zero_point.reshape(shape)) if shape else (q.scale, q.zero_point)
    y = Q.quantize_uniform(v, scale, zp, *q._qrange()) - qmin  # clamp(round(x / s) + z) - qmin
    mask = _apot_rows(q, shape)
    if mask is not None:  # APoT codes: sign bit above the level's index (< 2^(bits-1))
        sign, idx = Q.quantize_apot(v, scale, bits)
        y = torch.where(mask, ((sign < 0).to(torch.int64) << (bits - 1)) | idx.to(torch.int64), y.to(torch.int64))
    return y.to(torch.int64).reshape(w.shape)


def _apot_rows(q: TensorQuantizer, shape) -> torch.Tensor | None:
    """Which rows of the weight view are APoT (all for ``apot``, the chosen channels for ``mixed``), or None."""
    if q.spec.scheme == "apot":
        return torch.ones(shape or [], dtype=torch.bool, device=q.scale.device).expand(*(shape or []))
    mask = q.apot_mask if q.spec.scheme == "mixed" else None
    return None if mask is None else mask.reshape(shape)


def decode_weight(q: TensorQuantizer, codes: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Real weight values of stored codes, computed exactly as the simulation computes them."""
    bits = q.spec.bits
    codes = codes.reshape(shape)
    v, pshape = _view(q, codes)
    if q.spec.scheme == "pot":
        sign = torch.where((v >> (bits - 1)) & 1 == 1, -1.0, 1.0)
        code = v & (2 ** (bits - 1) - 1)
        out = Q.dequantize_pot(sign, code, q.scale.reshape(pshape))
    else:
        qmin, _ = q._qrange()
        scale, zp = (q.scale.reshape(pshape), q.zero_point.reshape(pshape)) if pshape else (q.scale, q.zero_point)
        # The simulation computes (clamp(round(x/s), qmin - z, qmax - z)) * s; code + qmin - z is that integer.
        out = ((v + qmin).to(torch.float32) - zp) * scale
        mask = _apot_rows(q, pshape)
        if mask is not None:
            sign = torch.where((v >> (bits - 1)) & 1 == 1, -1.0, 1.0)
            level = Q.apot_levels(bits, v.device)[(v & (2 ** (bits - 1) - 1)).clamp_max(2 ** (bits - 1) - 1)]
            out = torch.where(mask, sign * level * scale, out)
    return out.reshape(shape)


def export_packed(model: nn.Module, meta: dict, out: str | Path) -> dict:
    """Write ``model`` (calibrated, quantizers on) as a packed safetensors file, atomically.

    Returns:
        sizes: ``file_bytes``, ``fp32_bytes`` (the float model's parameters), ``ratio``, and the number of
        packed weight tensors.
    """
    state, meta = artifact_files(model, meta)
    packed = {}
    for m in weight_layers(model):
        if m.w_quant.mode != "quant":
            continue
        key = f"{m.layer_name}.weight" if m.layer_name else "weight"
        codes = encode_weight(m.w_quant, m.weight)
        state.pop(key)
        # Not needed to run: weight zero points are 0 (symmetric grids) and the clip range follows
        # from the scale; both are re-derived on load (a quarter of the non-weight bytes of DeiT-Tiny).
        if m.w_quant.spec.symmetric and bool((m.w_quant.zero_point == 0).all()):
            for buf in ("zero_point", "range_min", "range_max"):
                state.pop(f"{m.layer_name}.w_quant.{buf}", None)
        state[f"{key}.__packed__"] = pack_bits(codes, m.w_quant.spec.bits)
        packed[key] = {"shape": list(m.weight.shape), "bits": m.w_quant.spec.bits, "scheme": m.w_quant.spec.scheme}
    state, small = merge_small(state)
    meta = {**meta, "format": FORMAT, "packed": packed, "small": small}
    with atomic_path(out) as tmp:
        save_safetensors(state, tmp, metadata={"format": FORMAT, "vitq_version": __version__,
                                             "meta_encoding": META_ENCODING, "meta": encode_meta(meta)})
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    size = Path(out).stat().st_size
    return {"file_bytes": size, "fp32_bytes": fp32, "ratio": fp32 / size, "packed_tensors": len(packed)}


def is_packed(path: str | Path) -> bool:
    """Whether ``path`` is a file that claims to be a vitq packed artifact (by its safetensors header)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return False
    return str(header.get("__metadata__", {}).get("format", "")).startswith("vitq-packed")


def load_packed(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the quantized model from a packed file (no calibration).

    Raises:
        ArtifactError: a missing, corrupted or truncated file, another format version, or tensors that do
            not fit the model.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"packed artifact not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ArtifactError(f"{path} has format {header.get('format')!r} (vitq {header.get('vitq_version')}); "
                                    f"this vitq {__version__} reads {FORMAT!r}")
            state = {k: f.get_tensor(k) for k in f.keys()}
        if header.get("meta_encoding") != META_ENCODING:
            raise ArtifactError(f"{path}: unknown metadata encoding {header.get('meta_encoding')!r}")
        meta = decode_meta(header["meta"])
    except ArtifactError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, zlib.error) as exc:
        raise ArtifactError(f"{path} is corrupted or not a vitq packed artifact: {exc}") from exc
    split_small(state, meta.get("small", {}), path)
    packed = meta.get("packed", {})
    weights = {k[: -len(".__packed__")]: state.pop(k) for k in list(state) if k.endswith(".__packed__")}
    if set(weights) != set(packed):
        raise ArtifactError(f"{path}: packed tensors {sorted(set(weights) ^ set(packed))[:3]} lack a description")
    # Float placeholders so that the state dict is complete; replaced by the decoded values below.
    for k, info in packed.items():
        state[k] = torch.zeros(info["shape"])
        prefix = k[: -len("weight")] + "w_quant."
        scale = state.get(prefix + "scale")
        if scale is not None and prefix + "zero_point" not in state:
            top = torch.exp2(scale) if info["scheme"] == "pot" else scale * (2 ** (info["bits"] - 1) - 1)
            state[prefix + "zero_point"] = torch.zeros_like(scale)
            state[prefix + "range_min"], state[prefix + "range_max"] = -top, top
    model, meta = rebuild(meta, state, path, path)  # sets every quantizer's spec and parameters
    for m in weight_layers(model):
        key = f"{m.layer_name}.weight"
        if key in packed:
            info = packed[key]
            n = math.prod(info["shape"])
            expected = math.ceil(n / codes_per_byte(info["bits"]))
            if weights[key].numel() != expected or info["bits"] != m.w_quant.spec.bits:
                raise ArtifactError(f"{path}: packed weight '{key}' has {weights[key].numel()} bytes, "
                                    f"expected {expected} for {info['bits']}-bit codes")
            codes = unpack_bits(weights[key], info["bits"], n)
            with torch.no_grad():
                m.weight.copy_(decode_weight(m.w_quant, codes, m.weight.shape))
            m.refresh()
    return model.eval(), meta
