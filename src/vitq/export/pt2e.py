"""PyTorch integer path: ``vitq export DIR --format pt2e`` writes a ``torch.export`` program (``.pt2``)
that carries vitq's scales and runs oneDNN int8 kernels on x86 once compiled.

The program is traced from the same module tree as the ONNX export (``qdq_modules``), with torch's
``quantized_decomposed`` quantize/dequantize ops for every pair and the weights of every layer whose grid
fits int8 held as int8 codes with their per-channel step. That is the graph PT2E's ``convert_pt2e`` makes, so
``torch.compile`` with freezing and the x86 Inductor passes (registered by ``torchao``'s X86InductorQuantizer
module) fuse each pair + GEMM/convolution + pair into ``onednn.qlinear_pointwise`` / ``qconv_pointwise``.
Grids with no QDQ form (power-of-two activations) run the simulation's own float operations: still the scored
model, without an integer kernel there. Uncompiled (``program.module()``), the program computes the same
values with float kernels.

After writing, the program is compiled and run on the check images; the report gives its top-1 agreement with
the simulation and how many GEMMs and convolutions Inductor lowered to int8 kernels (0 when ``torchao`` is
not installed: the file is still written and checked uncompiled).

Reading a ``.pt2`` back (:func:`load_pt2e`) refuses any archive entry that would be unpickled: weights and
constants must be raw tensor bytes, and the sample inputs must load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..io import atomic_path
from ..quant.engine import all_quantizers
from .check import agreement_with_simulation
from .qdq_modules import _decomposed, activation_exact, export_copy

PT2E_FORMAT = "vitq-pt2e/1"
META_FILE = "vitq.json"


class Pt2eError(ValueError):
    """A ``.pt2`` file that vitq did not write, or that would run code when read."""


@dataclass
class Pt2eReport:
    path: str
    simulated: list[str] = field(default_factory=list)  # quantizers run as float ops (no QDQ form)
    int8_linear: int = 0  # GEMMs Inductor lowered to oneDNN int8 kernels
    int8_conv: int = 0
    layers: int = 0  # quantized GEMMs and convolutions in the model
    compiled: bool = False  # False when torchao (the x86 Inductor passes) is not installed
    compile_s: float = 0.0
    file_bytes: int = 0
    check: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def have_x86_passes() -> bool:
    """Whether the x86 Inductor int8 passes can be registered (``torchao`` installed, oneDNN available)."""
    return importlib.util.find_spec("torchao") is not None and torch.backends.mkldnn.is_available()


def to_program(model: nn.Module, input_size: tuple[int, int, int], max_batch: int = 1024):
    """``model`` (calibrated) as a ``torch.export`` program with a dynamic batch (module docstring).

    Returns:
        (ExportedProgram, names of the quantizers run as the simulation's float operations)
    """
    simulate = {q.name for q in all_quantizers(model) if not q.is_weight and activation_exact(q)}
    m = export_copy(model, simulate=simulate, decomposed=True)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        ep = torch.export.export(m, (torch.zeros(2, *input_size),), dynamic_shapes=({0: batch},))
    for node in ep.graph.nodes:  # source lines of the tracing machine: a third of the file, no use to a reader
        node.meta.pop("stack_trace", None)
    ep._example_inputs = None  # zeros, 1.2 MB at 224 x 224
    return ep, sorted(simulate)


def compile_program(program, counts: dict | None = None):
    """``program`` compiled by Inductor with freezing and the x86 int8 passes; ``counts`` receives how many
    GEMMs (``linear``) and convolutions (``conv``) became int8 kernels on the first call. Without torchao the
    program's module runs uncompiled (same values, float kernels).

    Returns:
        a callable taking an image batch.
    """
    module = program.module()
    if not have_x86_passes():
        return module
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (registers the passes)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = torch.compile(module)

    def run(x: torch.Tensor) -> torch.Tensor:
        # the graph cache would skip the passes and their counts; freezing makes weights constants to prepack
        with torch._inductor.config.patch(freezing=True, fx_graph_cache=False), torch.no_grad():
            if counts is not None and not counts:
                counters.clear()
                y = compiled(x)
                counts["linear"] = int(counters["inductor"]["qlinear_weight_prepack_matcher_count"])
                counts["conv"] = int(counters["inductor"]["qconv_weight_prepack_matcher_count"])
                return y
            return compiled(x)

    return run


def export_pt2e(model: nn.Module, input_size: tuple[int, int, int], out: str | Path,
                provenance: dict[str, str] | None = None, check_images: torch.Tensor | None = None) -> Pt2eReport:
    """Write ``model`` (calibrated) as a ``torch.export`` program atomically, compile it and check it.

    Args:
        model: the quantized model.
        input_size: ``(C, H, W)`` of one image.
        out: the ``.pt2`` file.
        provenance: string pairs (model, checkpoint, random_init) for the file's ``vitq.json``.
        check_images: images to run the compiled program on; its top-1 agreement with the simulation goes
            into the report and the file's ``vitq.json``.
    """
    from ..quant.layers import QuantConv2d, QuantLinear

    ep, simulated = to_program(model, input_size)
    report = Pt2eReport(str(out), simulated=simulated,
                        layers=sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in model.modules()))
    counts: dict = {}
    run = compile_program(ep, counts)
    report.compiled = have_x86_passes()
    t0 = time.perf_counter()
    with torch.no_grad():
        run(torch.zeros(1, *input_size))
    report.compile_s = time.perf_counter() - t0
    report.int8_linear, report.int8_conv = counts.get("linear", 0), counts.get("conv", 0)
    if check_images is not None:
        report.check = agreement_with_simulation(run, model, check_images)
    meta = {"vitq_format": PT2E_FORMAT, "vitq_version": __version__, "vitq_simulated": simulated,
            "vitq_int8_layers": f"{report.int8_linear + report.int8_conv}/{report.layers}",
            **({"vitq_check_images": report.check["images"], "vitq_check_agreement": round(report.check["agreement"], 2)}
               if report.check else {}), **(provenance or {})}
    with atomic_path(out) as tmp:
        buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2 or a buffer, not the temporary name
        torch.export.save(ep, buffer, extra_files={META_FILE: json.dumps(meta, sort_keys=True)})
        Path(tmp).write_bytes(buffer.getvalue())
        report.file_bytes = os.path.getsize(tmp)
    return report


class Pt2eModel(nn.Module):
    """A vitq ``.pt2`` file as a model: read without unpickling (:func:`load_pt2e`), compiled with the x86
    int8 passes (:func:`compile_program`), on the CPU; images in, logits out."""

    def __init__(self, path: str | Path):
        super().__init__()
        program, self.meta = load_pt2e(path)
        self.path, self.run = str(path), compile_program(program)
        self.register_buffer("_device_marker", torch.zeros(0), persistent=False)  # evaluate() feeds it CPU tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x.detach().cpu().float().contiguous())


def is_vitq_pt2e(path: str | Path) -> bool:
    """True for a ``.pt2`` file that vitq exported."""
    return bool(pt2e_metadata(path))


def pt2e_metadata(path: str | Path) -> dict:
    """The ``vitq.json`` of a ``.pt2`` file vitq wrote (empty for any other file)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{META_FILE}")]
            meta = json.loads(z.read(names[0])) if len(names) == 1 else {}
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        return {}
    return meta if isinstance(meta, dict) and meta.get("vitq_format") == PT2E_FORMAT else {}


def _check_no_pickles(path: Path) -> None:
    """Refuse an archive that ``torch.export.load`` would unpickle anything from (module docstring)."""
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if name.endswith("_config.json") and "/data/" in name:
                config = json.loads(z.read(name)).get("config", {})
                for key, entry in (config.items() if isinstance(config, dict) else ()):
                    if not isinstance(entry, dict) or entry.get("use_pickle") or not str(
                            entry.get("path_name", "")).startswith(("weight_", "tensor_")):
                        raise Pt2eError(f"'{path}': entry {key!r} of {base} is not raw tensor bytes; not loaded")
            elif "/sample_inputs/" in name and (blob := z.read(name)):  # vitq writes none: empty
                try:
                    torch.load(io.BytesIO(blob), weights_only=True)
                except Exception as e:  # any failure means torch.export.load would unpickle it freely
                    raise Pt2eError(f"'{path}': {base} does not load as plain tensors ({e}); not loaded") from None


def load_pt2e(path: str | Path):
    """A ``.pt2`` file vitq wrote, read without unpickling anything (module docstring).

    Returns:
        (ExportedProgram, its ``vitq.json`` metadata)

    Raises:
        Pt2eError: not a vitq ``.pt2`` file, or one that would run code when read.
    """
    path = Path(path)
    meta = pt2e_metadata(path)
    if not meta:
        raise Pt2eError(f"'{path}' is not a .pt2 file written by `vitq export --format pt2e` (no vitq.json)")
    _check_no_pickles(path)
    _decomposed()  # the quantize/dequantize ops the graph names must be registered to read it
    return torch.export.load(str(path)), meta
