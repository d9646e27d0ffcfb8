"""``report.html``: the report a person reads, self-contained (plots embedded as PNG data, no scripts, no
network). Built from ``report.json``'s content alone, so any saved report can be rendered again."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from .io import atomic_path
from .report import per_layer_bits

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em} td,th{border:1px solid #ddd;padding:3px 8px}
th{background:#f3f3f3;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em;margin:1em 0}
.muted{color:#666;font-size:.85em} img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
details summary{cursor:pointer;margin:.5em 0}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _num(v, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _pm(v, se, fmt: str) -> str:
    return _num(v, fmt) + ("" if se is None else f" ± {format(se, fmt)}")


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class=n>{c}</td>" if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    return "\n".join(out) + "</table>"


def _summary(report: dict) -> str:
    fp, q = report.get("fp") or {}, report.get("quantized") or {}
    rows = [["top-1 (%)", _num(fp.get("top1")), _num(q.get("top1")),
             _pm(None if fp.get("top1") is None or q.get("top1") is None else q["top1"] - fp["top1"],
                 q.get("top1_delta_se"), "+.2f")],
            ["top-5 (%)", _num(fp.get("top5")), _num(q.get("top5")), ""],
            ["agreement with FP (%)", "100", _pm(q.get("agreement"), q.get("agreement_se"), ".2f"), ""],
            ["KL from FP", "0", _pm(q.get("kl"), q.get("kl_se"), ".4f"), ""],
            ["images/s (this CPU, fake-quant)", _num(fp.get("images_per_s"), ".1f"), _num(q.get("images_per_s"), ".1f"), ""]]
    acc = _table(["", "float", "quantized", "quantized - float (± SE)"], rows, {1, 2, 3})
    size = _table(["", "value"], [
        ["model size", f"{report['size_bytes'] / 1e6:.2f} MB (float {report['fp32_size_bytes'] / 1e6:.2f} MB)"
         if report.get("fp32_size_bytes") else f"{report['size_bytes'] / 1e6:.2f} MB"],
        ["average weight / activation bits", f"{report['avg_w_bits']:.2f} / {report['avg_a_bits']:.2f}"],
        ["BOPs per image", f"{report['bops'] / 1e9:.1f} G"],
        ["calibration images", _e((report.get("timing") or {}).get("calib_images", "-"))],
        ["evaluation images", _e(q.get("n_images", "-"))],
        ["quantize / evaluate time", f"{_num((report.get('timing') or {}).get('calibrate_s'), '.1f')} s / "
                                     f"{_num((report.get('timing') or {}).get('eval_s'), '.1f')} s"]], {1})
    return acc + size


def _layer_rows(report: dict) -> tuple[list[str], list[list]]:
    """The per-layer table: bits and schemes, and each pass's error before and after."""
    sqb = {r["name"]: r for r in report.get("sqb") or []}
    rot = {}
    for r in report.get("rotation") or []:
        rot.setdefault(r["name"], []).append(r)
    optm = {}
    for c in report.get("optm") or []:
        optm.setdefault(c["name"].rsplit(".", 1)[0], c)
    gptq = {r["name"]: r for r in (report.get("gptq") or {}).get("layers", [])}
    header = ["layer", "W bits", "W scheme", "A bits", "A grid", "SQ-b MSE before -> after (alpha)",
              "rotation MSE before -> after", "OPT-m error m=0 -> chosen", "GPTQ error RTN -> GPTQ"]
    rows = []
    for r in per_layer_bits(report):
        name = r["layer"]
        s = sqb.get(name)
        ro = [x for x in rot.get(name, []) if x["rotated"]]
        o = optm.get(name)
        g = gptq.get(name)
        grid = r["a_scheme"] or ""
        if r["a_granularity"] and r["a_granularity"] != "per_tensor":
            grid += f" ({r['a_granularity']})"
        rows.append([_e(name), _e(r["w_bits"] or "-"), _e(r["w_scheme"] or "-"), _e(r["a_bits"] or "-"), _e(grid),
                     f"{s['mse_before']:.3g} -> {s['mse_after']:.3g} ({s['alpha']})" if s else "",
                     "; ".join(f"{x['kind']}: {x['mse_before']:.3g} -> {x['mse_rotated']:.3g}" for x in ro),
                     f"{o['error_m0']:.3g} -> {o['error']:.3g}" + (f" (m={o['m']})" if o["scheme"] == "two_region"
                                                                   else "") if o else "",
                     f"{g['err_rtn']:.3g} -> {g['err_gptq']:.3g}" if g else ""])
    return header, rows


def _recon(report: dict) -> str:
    rec = report.get("recon")
    if not rec or not rec.get("stages"):
        return ""
    rows = [[_e(s["name"]), s["params"], f"{s['loss_before']:.4g}", f"{s['loss_after']:.4g}"] for s in rec["stages"]]
    return ("<h3>Block reconstruction</h3><p class=muted>Output error of each block against the float block "
            "on the calibration images, before and after its step sizes were tuned.</p>"
            + _table(["stage", "learned scalars", "error before", "error after"], rows, {1, 2, 3}))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render(report: dict, figures: dict[str, bytes] | None = None) -> str:
    """The HTML text of a report (``figures``: PNG bytes per plot; drawn from the report when None)."""
    name = report.get("model", "model")
    if figures is None:
        figures = draw(report)
    cfg = report.get("config") or {}
    bits = (f"mixed precision, W {report['avg_w_bits']:.2f} / A {report['avg_a_bits']:.2f} bits on average"
            if cfg.get("rules") else f"W{cfg.get('w_bits')}A{cfg.get('a_bits')}")
    title = f"vitq: {name}, {report.get('recipe', '')} {bits} ({report.get('protocol')} protocol)"
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>{_e(title)}</title><style>{_CSS}</style>"
             "</head><body>", f"<h1>{_e(title)}</h1>"]
    if report.get("random_init"):
        parts.append("<div class=warn><b>Random-init weights.</b> Structure, size and cost are real; the accuracy "
                     "numbers mean nothing.</div>")
    if (report.get("data") or {}).get("overlap_images"):
        parts.append(f"<div class=warn>{report['data']['overlap_images']} calibration image(s) are also in the "
                     "evaluation set (--allow-overlap): the accuracy is flattered.</div>")
    parts.append("<h2>Summary</h2><p class=muted>Float and quantized model on the same evaluation images; "
                 "standard errors over images (paired for the difference).</p>" + _summary(report))
    if "bits" in figures:
        parts.append("<h2>Bits per layer</h2>" + _img(figures["bits"], "bits per layer"))
    elif not figures:
        parts.append("<p class=muted>No plots: matplotlib is not installed (pip install 'vitq[plots]').</p>")
    mixed = report.get("mixed")
    if mixed:
        parts.append(f"<h2>Mixed precision</h2><p>Budget {_e(mixed.get('budget'))}, {_e(mixed.get('search'))} "
                     f"search on {_e(mixed.get('probe_images'))} probe images, calibration KL "
                     f"{_num(mixed.get('kl_calib'), '.4f')}"
                     + (f"; the uniform {mixed['uniform_fallback']}-bit model scored better and was kept"
                        if mixed.get("uniform_fallback") else "") + ".</p>")
        if "sensitivity" in figures:
            parts.append(_img(figures["sensitivity"], "sensitivity"))
    m2 = report.get("m2q")
    if m2:
        shift = sum(r["engine"] in ("shift", "split") for r in m2["layers"])
        share = m2.get("shift_mac_share", 0.0)
        parts.append(f"<h2>Accelerator cost (M2Q)</h2><p>{_e(m2['metric'])} budget {m2['budget']} x INT8; EDP "
                     f"saving against INT8 {100 * m2['edp_saving']:.1f} %; {shift} of {len(m2['layers'])} layers "
                     f"use the shift-add engine, which runs {100 * share:.1f} % of the MACs (MAC engine "
                     f"{100 * (1 - share):.1f} %).</p>")
        if "m2q" in figures:
            parts.append(_img(figures["m2q"], "EDP per layer"))
    if "timing" in figures:
        parts.append("<h2>Time per pass</h2>" + _img(figures["timing"], "time per pass"))
    header, rows = _layer_rows(report)
    keep = [i for i in range(len(header)) if i < 5 or any(r[i] for r in rows)]  # passes that ran
    header, rows = [header[i] for i in keep], [[r[i] for i in keep] for r in rows]
    parts.append("<h2>Per layer</h2><p class=muted>Errors are each pass's own objective on the calibration "
                 "images (docs/methods.md): lower is better; empty where the pass did not touch the layer.</p>"
                 + _table(header, rows) + _recon(report))
    settings = report.get("settings")
    if settings:
        from .settings import dump

        parts.append("<h2>Settings</h2><details><summary>config.yaml (rebuilds this model with "
                     "<code>vitq quantize MODEL --config config.yaml</code>)</summary><pre>"
                     + _e(dump(settings)) + "</pre></details>")
    foot = [f"command: <code>{_e(' '.join(report['command']))}</code>"] if report.get("command") else []
    if report.get("versions"):
        foot.append("versions: " + _e(", ".join(f"{k} {v}" for k, v in report["versions"].items())))
    foot.append(f"checkpoint: {_e(report.get('checkpoint'))}")
    parts.append("<h2>Provenance</h2><p class=muted>" + "<br>".join(foot) + "</p></body></html>")
    return "\n".join(parts)


def draw(report: dict) -> dict[str, bytes]:
    """Every plot the report has data for, as PNG bytes; none without matplotlib (the ``plots`` extra)."""
    try:
        from .plots import png_bytes, report_figures
    except ImportError:
        return {}
    return {k: png_bytes(f) for k, f in report_figures(report, report.get("model", "model")).items()}


def write_html(report: dict, folder: Path) -> None:
    """Write ``folder/report.html`` and its plots as PNG files beside it (``bits.png``, ...)."""
    pngs = draw(report)
    for stem, png in pngs.items():
        with atomic_path(Path(folder) / f"{stem}.png") as tmp:
            tmp.write_bytes(png)
    with atomic_path(Path(folder) / "report.html") as tmp:
        tmp.write_text(render(report, pngs))

