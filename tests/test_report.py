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
