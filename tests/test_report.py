import csv
import io

from vitq.report import sensitivity_csv


def test_sensitivity_csv_sorts_by_the_lowest_width_and_leaves_missing_widths_empty():
    rows = [{"layer": "blocks.0.attn.qkv", "kind": "W", "elements": 10, "kl": {"4": 0.01, "8": 0.001}},
            {"layer": "blocks.0.mlp.fc2", "kind": "A", "elements": 20, "kl": {"3": 0.5, "4": 0.2, "8": 0.0}}]
    table = list(csv.reader(io.StringIO(sensitivity_csv(rows))))
    assert table[0] == ["layer", "kind", "elements", "kl_w3", "kl_w4", "kl_w8"]
    assert table[1] == ["blocks.0.mlp.fc2", "A", "20", "0.5", "0.2", "0"]  # 0.5 at its lowest width ranks first
    assert table[2] == ["blocks.0.attn.qkv", "W", "10", "", "0.01", "0.001"]


def test_summary_line_shows_standard_errors_only_when_the_report_has_them():
    from vitq.report import summary_line

    report = {"model": "m", "protocol": "standard", "avg_w_bits": 4.0, "avg_a_bits": 4.0, "size_bytes": 1e6,
              "bops": 1e9, "fp": {"top1": 80.0},
              "quantized": {"top1": 78.0, "agreement": 90.0, "kl": 0.05}}
    assert "se(" not in summary_line(report)  # a report written before the standard errors
    report["quantized"].update(top1_delta_se=0.71, agreement_se=0.8, kl_se=0.004)
    line = summary_line(report)
    assert "(drop +2.00)" in line and "se(drop/agreement/kl)=0.71/0.80/0.0040" in line


def test_report_html_without_matplotlib_has_the_tables_and_says_why_no_plots(monkeypatch, tmp_path):
    import sys

    from vitq.report_html import write_html

    report = {"model": "m", "recipe": "minmax", "protocol": "standard", "config": {"w_bits": 8, "a_bits": 8},
              "fp": {"top1": 80.0}, "quantized": {"top1": 79.0, "top1_delta_se": 0.5, "agreement": 97.0,
                                                   "agreement_se": 0.6, "kl": 0.01, "kl_se": 0.001},
              "size_bytes": 6e6, "avg_w_bits": 8.0, "avg_a_bits": 8.0, "bops": 1e9,
              "layers": [{"name": "head.weight", "layer": "head", "kind": "weight", "bits": 8, "scheme": "uniform",
                          "granularity": "per_channel"}]}
    for mod in [m for m in list(sys.modules) if m == "matplotlib" or m.startswith("matplotlib.") or m == "vitq.plots"]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    write_html(report, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "pip install 'vitq[plots]'" in page and "79.00" in page and "head" in page
    assert not list(tmp_path.glob("*.png"))
