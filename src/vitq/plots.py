"""The report's plots, each drawn from ``report.json``'s content (matplotlib, no display needed): bits per
layer, per-tensor sensitivity, time per pass, and the accelerator's EDP per layer and engine."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .quant.config import SHIFT_SCHEMES  # noqa: E402
from .report import per_layer_bits  # noqa: E402

W_COLOUR, A_COLOUR, SHIFT_COLOUR = "#1f77b4", "#ff7f0e", "#2ca02c"


def _short(name: str) -> str:
    """``blocks.3.attn.qkv`` -> ``b3.attn.qkv``: tick labels that fit."""
    return name.replace("blocks.", "b").replace("layers.", "l").replace(".input", "")


def bits_figure(report: dict, title: str):
    """Weight and activation bits of every quantized layer, as two rows of bars sharing the layer axis."""
    rows = per_layer_bits(report)
    x = list(range(len(rows)))
    fig, (aw, aa) = plt.subplots(2, 1, figsize=(max(9, 0.17 * len(rows) + 2), 5.2), sharex=True)
    aw.bar(x, [r["w_bits"] or 0 for r in rows], color=[SHIFT_COLOUR if r["w_scheme"] in SHIFT_SCHEMES else W_COLOUR
                                                       for r in rows])
    aa.bar(x, [r["a_bits"] or 0 for r in rows], color=A_COLOUR)
    for ax, label in ((aw, "weight bits"), (aa, "activation bits")):
        ax.set_ylabel(label)
        ax.set_ylim(0, 9)
        ax.set_yticks([2, 4, 6, 8])
        ax.grid(axis="y", alpha=0.3)
    aw.set_title(title + ("  (green: (A)PoT weights)" if any(r["w_scheme"] in SHIFT_SCHEMES for r in rows) else ""))
    aa.set_xticks(x)
    aa.set_xticklabels([_short(r["layer"]) for r in rows], rotation=90, fontsize=6)
    aa.set_xlabel("layer (model order; layers without weights are activation x activation matmuls)")
    fig.tight_layout()
    return fig


def sensitivity_figure(rows: list[dict], title: str, top: int = 30):
    """The ``top`` most sensitive tensors: probe KL with only that tensor at its lowest candidate width."""
    rows = sorted(rows, key=lambda r: -r["kl"][min(r["kl"], key=int)])[:top][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(rows) + 1.6))
    low = [min(r["kl"], key=int) for r in rows]
    ax.barh(range(len(rows)), [r["kl"][b] for r, b in zip(rows, low)],
            color=[W_COLOUR if r["kind"] == "W" else A_COLOUR for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['kind']} {_short(r['layer'])} @{b}b" for r, b in zip(rows, low)], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("KL from FP on the probe images, this tensor alone quantized (log scale)")
    ax.set_title(title + "\n(blue: weights, orange: activations; @: the width probed)", fontsize=10)
    fig.tight_layout()
    return fig


def timing_figure(seconds: dict[str, float], title: str):
    """Seconds per pass, longest first."""
    items = sorted(((k, v) for k, v in seconds.items() if v > 0), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(items) + 1.3))
    ax.barh(range(len(items)), [v for _, v in items], color=W_COLOUR)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels([k for k, _ in items], fontsize=8)
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.1f} s", va="center", fontsize=7)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max([v for _, v in items], default=1) * 1.2)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def edp_figure(layers: list[dict], title: str):
    """Per layer: weight bits, split by engine (the share of the layer's MACs on the multiply and on the
    shift-add engine), and the layer's share of the model's EDP."""
    x = list(range(len(layers)))
    bits = [r["w_bits"] or r["a_bits"] or 0 for r in layers]
    shift = [r.get("shift_share", 1.0 if r["engine"] == "shift" else 0.0) for r in layers]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(9, 0.17 * len(layers) + 2), 5.2), sharex=True)
    a1.bar(x, [b * (1 - s) for b, s in zip(bits, shift)], color=W_COLOUR, label="multiply engine")
    a1.bar(x, [b * s for b, s in zip(bits, shift)], bottom=[b * (1 - s) for b, s in zip(bits, shift)],
           color=SHIFT_COLOUR, label="shift-add engine")
    a1.set_ylabel("weight bits\n(matmul: act. bits)", fontsize=8)
    a1.set_ylim(0, 9)
    a1.set_title(title + "  (bar split by the share of the layer's MACs on each engine)")
    a1.legend(fontsize=7, loc="upper right")
    a2.bar(x, [100 * r["edp_share"] for r in layers], color=[SHIFT_COLOUR if s >= 0.5 else W_COLOUR for s in shift])
    a2.set_ylabel("share of EDP (%)", fontsize=8)
    a2.set_xticks(x)
    a2.set_xticklabels([_short(r["layer"]) for r in layers], rotation=90, fontsize=6)
    fig.tight_layout()
    return fig


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def report_figures(report: dict, name: str) -> dict[str, object]:
    """Every plot the report has data for: ``{file stem: figure}``."""
    figs = {"bits": bits_figure(report, f"{name}: bits per layer ({report.get('recipe', '')} recipe)")}
    mixed = report.get("mixed") or {}
    if mixed.get("sensitivity"):
        figs["sensitivity"] = sensitivity_figure(mixed["sensitivity"], f"{name}: most sensitive tensors")
    seconds = pass_seconds(report)
    if seconds:
        figs["timing"] = timing_figure(seconds, f"{name}: time per pass")
    if report.get("m2q"):
        figs["m2q"] = edp_figure(report["m2q"]["layers"], f"{name}: M2Q on the modelled accelerator")
    return figs


def pass_seconds(report: dict) -> dict[str, float]:
    """Seconds per pass from the report (single-precision pipeline or mixed-precision search), plus evaluation."""
    out = {}
    for k, v in (report.get("method_timing") or {}).items():
        out[k.removesuffix("_s")] = float(v)
    for k, v in ((report.get("mixed") or {}).get("timing") or {}).items():
        out[k.removesuffix("_s")] = float(v)
    if report.get("m2q"):
        out["m2q search"] = float(report["m2q"]["search_s"])
    if (report.get("timing") or {}).get("eval_s") is not None:
        out["evaluation (FP and quantized)"] = float(report["timing"]["eval_s"])
    return out
