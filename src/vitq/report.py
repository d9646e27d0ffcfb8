"""The quantization report: what was quantized how, and what it cost in accuracy, size and time."""
from __future__ import annotations

from dataclasses import asdict

from torch import nn

from .evaluation import EvalResult
from .quant.engine import QuantizedTensor, model_stats, tensor_table


def format_table(rows: list[QuantizedTensor]) -> str:
    """A fixed-width text table of every quantized tensor."""
    header = f"{'tensor':<42} {'kind':<10} {'bits':>4} {'scheme':<8} {'granularity':<11} {'range':>23}"
    lines = [header, "-" * len(header)]
    for r in rows:
        rng = f"[{r.range_min:+.4g}, {r.range_max:+.4g}]"
        lines.append(f"{r.name:<42} {r.kind:<10} {r.bits:>4} {r.scheme:<8} {r.granularity:<11} {rng:>23}")
    return "\n".join(lines)


def build_report(model: nn.Module, *, model_name: str, checkpoint: str | None, random_init: bool,
                 fp: EvalResult | None, quantized: EvalResult | None, timing: dict, extra: dict | None = None) -> dict:
    """Assemble ``report.json``: model, protocol, fp/quantized accuracy, bits, size, BOPs, timing, layers."""
    config = model.vitq_config
    report = {
        "model": model_name,
        "checkpoint": checkpoint,
        "random_init": random_init,
        "protocol": config.protocol,
        "config": config.to_dict(),
        "fp": _acc(fp),
        "quantized": _acc(quantized),
        **model_stats(model),
        "timing": timing,
        "layers": [asdict(r) for r in tensor_table(model)],
        "versions": package_versions(),
    }
    if random_init:
        report["warning"] = "random-init weights: accuracy numbers are meaningless; structure and cost are real"
    if extra:
        report.update(extra)
    return report


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a result depends on."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("vitq", "torch", "timm", "numpy", "safetensors", "onnx", "onnxruntime"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _acc(r: EvalResult | None) -> dict | None:
    if r is None:
        return None
    keys = ("n_images", "top1", "top5", "agreement", "kl", "images_per_s", "n_bad_images", "top1_delta_se",
            "agreement_se", "kl_se")
    return {k: getattr(r, k) for k in keys}


def summary_line(report: dict) -> str:
    """One line with the headline numbers."""
    q, fp = report.get("quantized"), report.get("fp")
    parts = [f"{report['model']} {report['protocol']}"]
    if fp and q and q.get("top1") is None:  # images without labels
        parts.append(f"top1=n/a (no labels) agreement={q['agreement']:.2f} kl={q['kl']:.4f}")
        if q.get("agreement_se") is not None:
            parts.append(f"se(agreement/kl)={q['agreement_se']:.2f}/{q['kl_se']:.4f}")
    elif fp and q:
        parts.append(f"fp.top1={fp['top1']:.2f} q.top1={q['top1']:.2f} (drop {fp['top1'] - q['top1']:+.2f}) "
                     f"agreement={q['agreement']:.2f} kl={q['kl']:.4f}")
        if q.get("top1_delta_se") is not None:  # absent in reports written before the standard errors
            parts.append(f"se(drop/agreement/kl)={q['top1_delta_se']:.2f}/{q['agreement_se']:.2f}/{q['kl_se']:.4f}")
    parts.append(f"avg_w_bits={report['avg_w_bits']:.2f} avg_a_bits={report['avg_a_bits']:.2f} "
                 f"size={report['size_bytes'] / 1e6:.2f}MB bops={report['bops'] / 1e9:.1f}G")
    return " ".join(parts)


def by_sensitivity(rows: list[dict]) -> list[dict]:
    """Per-tensor sensitivity rows (``GreedyResult.sensitivity``), most sensitive first: by the KL at each
    row's lowest width."""
    return sorted(rows, key=lambda r: -r["kl"][min(r["kl"], key=int)])


def sensitivity_csv(rows: list[dict]) -> str:
    """A CSV of per-tensor sensitivities, most sensitive first (at each row's lowest width).

    Args:
        rows: ``{"layer", "kind", "elements", "kl": {bits: KL}}`` per tensor, as in
            ``GreedyResult.sensitivity``.

    Returns:
        The text: one column per width found in any row (``kl_w4`` ...), empty where a row lacks it.
    """
    widths = sorted({int(b) for r in rows for b in r["kl"]})
    lines = [",".join(["layer", "kind", "elements", *(f"kl_w{b}" for b in widths)])]
    for r in by_sensitivity(rows):
        cells = [f"{r['kl'][str(b)]:.6g}" if str(b) in r["kl"] else "" for b in widths]
        lines.append(",".join([r["layer"], r["kind"], str(r["elements"]), *cells]))
    return "\n".join(lines) + "\n"


def per_layer_bits(report: dict) -> list[dict]:
    """One row per quantized layer, in model order: ``{"layer", "w_bits", "w_scheme", "a_bits", "a_scheme"}``
    (weights from the layer's weight quantizer, activations from its first input quantizer)."""
    rows: dict[str, dict] = {}
    for t in report.get("layers", []):
        row = rows.setdefault(t["layer"], {"layer": t["layer"], "w_bits": None, "w_scheme": None, "a_bits": None,
                                           "a_scheme": None, "a_granularity": None})
        if t["kind"] == "weight":
            row["w_bits"], row["w_scheme"] = t["bits"], t["scheme"]
        elif row["a_bits"] is None:
            row["a_bits"], row["a_scheme"], row["a_granularity"] = t["bits"], t["scheme"], t["granularity"]
    return list(rows.values())
