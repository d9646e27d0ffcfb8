import json

import pytest
import torch

from vitq.cli import main
from vitq.methods.mptq import MethodOptions

from conftest import write_images

SYN = ["n01440764", "n01443537", "n01484850", "n15075141", "n02085620", "n02099601"]


@pytest.fixture
def images(tmp_path):
    write_images(tmp_path / "img", SYN, size=64)
    return tmp_path / "img"


@pytest.fixture
def images12(tmp_path):
    """Twelve images: enough to tell a 16-image probe default from an 8-image one."""
    write_images(tmp_path / "img12", SYN * 2, size=64)
    return tmp_path / "img12"


def test_models_lists_zoo(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "deit_tiny_patch16_224.fb_in1k" in out and "efficientvit_b1.r224_in1k" in out


@pytest.mark.parametrize("argv,needle", [
    (["eval", "deit_tiy", "--data", "."], "Did you mean: deit_tiny"),
    (["eval", "deit_tiny", "--random-init", "--data", "/no/such/dir"], "data directory not found: /no/such/dir"),
    (["eval", "deit_tiny", "--checkpoint", "/no/ck.safetensors", "--data", "."], "checkpoint file not found"),
])
def test_errors_are_one_line_and_nonzero(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.startswith("vitq: error:") and len(err.splitlines()) == 1


def test_empty_dataset_and_bad_list(tmp_path, images, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", "deit_tiny", "--random-init", "--data", str(tmp_path / "empty")]) == 2
    assert "no images found" in capsys.readouterr().err
    lst = tmp_path / "l.txt"
    lst.write_text("n09999999_missing.JPEG\n")
    assert main(["eval", "deit_tiny", "--random-init", "--data", str(images), "--list", str(lst)]) == 2
    assert "n09999999_missing.JPEG" in capsys.readouterr().err


def test_eval_writes_json(tmp_path, images, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "deit_tiny", "--random-init", "--data", str(images), "--workers", "0", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("top1=") and "n=6" in line and "RANDOM-INIT" in line
    r = json.loads(out.read_text())
    assert {"model", "checkpoint", "n_images", "top1", "top5", "images_per_s"} <= set(r) and r["n_images"] == 6


def test_quantize_then_eval_artifact_gives_identical_result(tmp_path, images, capsys):
    out = tmp_path / "q"
    args = [*_quantize_args(images, 2), "--w-bits", "4", "--a-bits", "4", "--set", "quant.observer=percentile",
            "--out", str(out), "--protocol", "full", "-v"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.attn.matmul_qk.q" in printed and "protocol=full" in printed  # -v: the per-tensor table
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "protocol", "avg_w_bits", "avg_a_bits", "size_bytes", "bops", "layers", "timing"):
        assert key in report
    for key in ("top1", "top5", "agreement", "kl", "top1_delta_se", "agreement_se", "kl_se"):
        assert key in report["quantized"]
    assert report["quantized"]["kl_se"] > 0 and "se(drop/agreement/kl)=" in printed
    assert "top1" in report["fp"] and "calibrate_s" in report["timing"] and "eval_s" in report["timing"]
    assert report["random_init"] and report["avg_w_bits"] == 4.0 and report["protocol"] == "full"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert report["command"][:2] == ["vitq", "quantize"] and report["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    page = (out / "report.html").read_text()
    # self-contained: plots embedded, nothing fetched
    assert page.count("data:image/png;base64,") >= 2 and "http://" not in page and "https://" not in page
    assert f"{report['quantized']['top1']:.2f}" in page and "Random-init weights" in page
    assert "blocks.11.mlp.fc2" in page and (out / "bits.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    res = tmp_path / "e.json"
    assert main(["eval", str(out), "--data", str(images), "--workers", "0", "--out", str(res)]) == 0
    again = json.loads(res.read_text())
    assert again["top1"] == report["quantized"]["top1"] and again["top5"] == report["quantized"]["top5"]
    # packed integer artifact: W4 DeiT-Tiny 6.5x smaller than fp32 or better (the fp32 position
    # embedding, biases and scales keep it below the 7.5x, see docs/results.md), same results
    packed = tmp_path / "deit_w4.safetensors"
    capsys.readouterr()
    assert main(["export", str(out), "--format", "vitq", "--out", str(packed)]) == 0
    assert "x smaller" in capsys.readouterr().out
    assert 5.72e6 * 4 / packed.stat().st_size >= 6.5
    assert main(["eval", str(packed), "--data", str(images), "--workers", "0", "--out", str(res), "--overwrite"]) == 0
    packed_res = json.loads(res.read_text())
    assert packed_res["top1"] == report["quantized"]["top1"] and packed_res["top5"] == report["quantized"]["top5"]
    assert main(["export", str(images), "--out", str(packed)]) == 2
    assert "not a folder written by `vitq quantize`" in capsys.readouterr().err
    # ONNX: checked against the scored model on the artifact's own calibration images, then evaluated as a file
    model_onnx = tmp_path / "deit.onnx"
    assert main(["export", str(out), "--format", "onnx", "--out", str(model_onnx)]) == 0
    printed = capsys.readouterr().out
    assert "check: the file agrees with the scored model on" in printed and "of 2 images" in printed
    assert main(["eval", str(model_onnx), "--data", str(images), "--workers", "0", "--out", str(res),
                 "--overwrite"]) == 0
    onnx_res = json.loads(res.read_text())
    assert onnx_res["n_images"] == 6 and onnx_res["agreement"] is None  # random-init: no float reference to rebuild
    # PT2E: a torch.export program on oneDNN int8 kernels, checked the same way, then evaluated as a file
    program = tmp_path / "deit.pt2"
    assert main(["export", str(out), "--format", "pt2e", "--out", str(program)]) == 0
    printed = capsys.readouterr().out
    assert "50/50 GEMMs and convolutions run as oneDNN int8 kernels" in printed
    assert "check: the program agrees with the scored model on" in printed and "of 2 images" in printed
    assert main(["export", str(out), "--format", "pt2e", "--target", "tensorrt", "--out", str(program)]) == 2
    assert "--target and --allow-approx are for --format onnx" in capsys.readouterr().err
    bogus = tmp_path / "bogus.pt2"  # `vitq eval FILE.pt2` runs the program (tests/export/test_pt2e.py)
    bogus.write_bytes(b"PK")
    assert main(["eval", str(bogus), "--data", str(images), "--workers", "0"]) == 2
    assert "is not a .pt2 file written by `vitq export --format pt2e`" in capsys.readouterr().err


def test_config_pattern_error_names_pattern(tmp_path, images, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rules": [{"pattern": "blocks.77.*", "w_bits": 4}]}))
    args = [*_quantize_args(images, 2), "--config", str(cfg), "--out", str(tmp_path / "q")]
    assert main(args) == 2
    assert "blocks.77.*" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_mixed_precision_search_then_config_reuse_gives_same_bits_and_result(tmp_path, images12, capsys):
    images = images12
    common = ["deit_tiny", "--random-init", "--method", "minmax", "--calib", str(images), "--calib-size", "10", "--eval", str(images), "--allow-overlap", "--limit", "4",
              "--w-bits", "6", "--a-bits", "6", "--workers", "0", "-q"]
    out = tmp_path / "mp"
    assert main(["quantize", *common, "--budget-w", "7", "--budget-a", "7",
                 "--set", "search.w_candidates=6,8", "--set", "search.a_candidates=6,8", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    # the A budget leaves out the 8-bit image input (2 % of DeiT-Tiny's activation values); the report counts it
    assert report["avg_w_bits"] <= 7 and report["avg_a_bits"] <= 7.05 and report["mixed"]["search_s"] > 0
    assert 0 < sum(report["mixed"]["timing"].values()) <= report["mixed"]["search_s"]
    assert report["mixed"]["search"] == "knapsack"  # the default for bit budgets since rule R11
    assert report["mixed"]["probe_images"] == 10  # default 16 (rule R13), at most the calibration images
    assert report["mixed"]["gptq_losses"] is False  # no GPTQ, so no GPTQ-aware losses
    assert (out / "bits.png").read_bytes()[:4] == b"\x89PNG" and (out / "mixed_config.json").is_file()
    again = tmp_path / "again"
    assert main(["quantize", *common, "--config", str(out / "mixed_config.json"), "--out", str(again)]) == 0
    r2 = json.loads((again / "report.json").read_text())
    bits = lambda r: [(row["name"], row["bits"], row["scheme"]) for row in r["layers"]]  # noqa: E731
    assert bits(r2) == bits(report)
    assert r2["quantized"] == {**report["quantized"], "images_per_s": r2["quantized"]["images_per_s"]}
    # config.yaml holds the recipe, the budget and every setting: the search runs again to the same model
    rebuilt = tmp_path / "rebuilt"
    data = common[:common.index("--w-bits")] + ["--workers", "0", "-q"]
    data = [a for a in data if a not in ("--method", "minmax")]
    assert main(["quantize", *data, "--config", str(out / "config.yaml"), "--out", str(rebuilt)]) == 0
    assert (rebuilt / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (rebuilt / "config.yaml").read_text() == (out / "config.yaml").read_text()
    assert json.loads((rebuilt / "report.json").read_text())["mixed"]["search"] == "knapsack"
    assert "sensitivity" in (rebuilt / "report.html").read_text()


@pytest.mark.parametrize("extra,needle", [
    (["--set", "search.search=knapsack"], "search.search=knapsack searches a mixed-precision assignment: give a budget"),
    (["--method", "m2q", "--set", "search.search=knapsack"], "search.search=knapsack is for Greedy MP"),
    (["--set", "budget.gbops=1", "--set", "search.search=knapsack"], "average-bit and size budgets only"),
    (["--method", "mptq", "--set", "rotation.parts=fc2,kq"], "rotation.parts takes a list of fc2, v, qk"),
    (["--set", "search.serch=knapsack"], "'search.serch': unknown field"),
    (["--set", "gptq.enabled=maybe"], "'gptq.enabled' must be bool"),
    (["--set", "sqb"], "--set takes SECTION.FIELD=VALUE"),
    (["--set", "rotations.enabled=true"], "give SECTION.FIELD with SECTION one of"),
    (["--set", "quant.w_bits=9"], "w_bits must be"),
])
def test_mp_search_errors(tmp_path, images, extra, needle, capsys):
    argv = ["quantize", "deit_tiny", "--random-init", "--method", "minmax", "--calib", str(images), "--calib-size", "2", "--eval",
            str(images), "--allow-overlap", "--workers", "0", "-q", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_knapsack_search_from_the_cli_meets_the_budget(tmp_path, images, capsys):
    out = tmp_path / "mp"
    assert main(["quantize", "deit_tiny", "--random-init", "--method", "minmax", "--calib", str(images), "--calib-size", "2", "--eval",
                 str(images), "--allow-overlap", "--w-bits", "6", "--a-bits", "6", "--workers", "0",
                 "--budget-w", "7", "--budget-a", "7", "--set", "search.w_candidates=6,8", "--set", "search.a_candidates=6,8",
                 "--set", "search.search=knapsack", "--set", "search.uniform_fallback=false", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mixed"]["search"] == "knapsack" and report["avg_w_bits"] <= 7 and report["avg_a_bits"] <= 7.05
    assert {row["w_bits"] for row in report["mixed"]["layers"] if row["w_bits"]} == {6, 8}
    csv_rows = (out / "sensitivity.csv").read_text().splitlines()
    assert csv_rows[0] == "layer,kind,elements,kl_w6,kl_w8" and len(csv_rows) == 1 + len(report["mixed"]["sensitivity"])
    assert "most sensitive (probe KL alone at the lowest candidate)" in capsys.readouterr().out


def test_bit_budget_sets_the_base_widths_so_reconstruction_runs(tmp_path, images, capsys):
    # Regression: without --w-bits/--a-bits the base widths stayed 8, so a 5-bit search skipped reconstruction
    out = tmp_path / "mp"
    assert main(["quantize", "deit_tiny", "--random-init", "--method", "minmax", "--calib", str(images), "--calib-size", "2", "--eval",
                 str(images), "--allow-overlap", "--limit", "2", "--workers", "0", "--set", "recon.enabled=true", "--set", "recon.iters=1",
                 "--budget-w", "5", "--budget-a", "5", "--set", "search.w_candidates=4,6", "--set", "search.a_candidates=4,6",
                 "--out", str(out)]) == 0
    assert "W5A5" in capsys.readouterr().out.splitlines()[0]  # the base widths come from the budget
    report = json.loads((out / "report.json").read_text())
    assert report["recon"]["settings"]["iters"] == 1 and report["recon"]["stages"] and report["avg_w_bits"] <= 5


@pytest.mark.parametrize("flag,expected", [([], True), (["--set", "search.gptq_losses=false"], False)])
def test_gptq_aware_knapsack_losses_are_the_default_with_gptq(tmp_path, images, flag, expected):
    # rule R17 (docs/methods.md): on wherever it applies, i.e. the knapsack search with GPTQ on
    out = tmp_path / "mp"
    assert main(["quantize", "deit_tiny", "--random-init", "--method", "minmax", "--calib", str(images), "--calib-size", "2", "--eval",
                 str(images), "--allow-overlap", "--limit", "2", "--workers", "0", "-q", "--set", "gptq.enabled=true",
                 "--budget-w", "5", "--budget-a", "8", "--set", "search.w_candidates=4,6", "--set", "search.a_candidates=8",
                 *flag, "--out", str(out)]) == 0
    mixed = json.loads((out / "report.json").read_text())["mixed"]
    assert mixed["search"] == "knapsack" and mixed["gptq_losses"] is expected
    # the uniform fallback's scores: the searched assignment's and each uniform width's probe KL
    assert set(mixed["fallback_scores"]) == {"searched", "uniform"}


def test_bops_budget_defaults_to_the_greedy_search(tmp_path, images12, capsys):
    images = images12
    out = tmp_path / "mp"
    assert main(["quantize", "deit_tiny", "--random-init", "--method", "minmax", "--calib", str(images), "--calib-size", "10", "--eval",
                 str(images), "--allow-overlap", "--limit", "2", "--w-bits", "6", "--a-bits", "6", "--workers", "0", "-q",
                 "--set", "budget.gbops=1e6", "--set", "search.w_candidates=6,8", "--set", "search.a_candidates=6,8",
                 "--out", str(out)]) == 0
    mixed = json.loads((out / "report.json").read_text())["mixed"]
    assert mixed["search"] == "greedy" and mixed["probe_images"] == 8  # the greedy loop keeps 8 probe images
    assert mixed["gptq_losses"] is False  # GPTQ-aware losses are the knapsack's


def test_cost_command_json_and_errors(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert main(["cost", "efficientvit_b0", "--random-init", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random-init" in printed and "total:" in printed and "LiteMLA" not in printed
    r = json.loads(out.read_text())
    assert {"energy_j", "latency_s", "edp", "baseline", "edp_saving", "layers"} <= set(r)
    assert r["edp_saving"] == pytest.approx(0.0)  # INT8 everywhere is the baseline
    assert any(layer["op"] == "div" for layer in r["layers"])
    assert main(["cost", "efficientvit_b0", "--random-init", "--w-bits", "4", "--w-scheme", "pot",
                 "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["edp_saving"] > 0.2
    bad = tmp_path / "hw.yaml"
    bad.write_text("engines: {mac_units: zero}\n")
    capsys.readouterr()
    assert main(["cost", "efficientvit_b0", "--random-init", "--hw", str(bad)]) == 2
    assert "engines.mac_units" in capsys.readouterr().err


def test_m2q_quantize_writes_report_plot_and_config(tmp_path, images, capsys):
    out = tmp_path / "m2q"
    # min-max ranges: the recipe's MSE observer costs 30 s here and this test is about the plumbing
    args = [*_quantize_args(images, 2, "efficientvit_b0"), "--method", "m2q", "--budget-edp", "0.7",
            "--set", "quant.observer=minmax", "--out", str(out), "-q"]
    assert main(args) == 0
    r = json.loads((out / "report.json").read_text())
    m = r["m2q"]
    assert m["cost"]["edp"] <= 0.7 * m["baseline"]["edp"] * (1 + 1e-9)
    assert {"layer", "scheme", "w_bits", "a_bits", "engine", "macs", "energy_j", "latency_s", "edp_share",
            "mse_uniform", "mse_pot", "shift_share"} <= set(m["layers"][0])
    # the default channel split: both engines work, each split layer's share is its channels' share
    assert 0 < m["shift_mac_share"] < 1 and any(r["engine"] == "split" for r in m["layers"])
    assert (out / "m2q.png").stat().st_size > 0 and (out / "mixed_config.json").is_file()
    capsys.readouterr()
    # the artifact's cost is the one the search reported
    assert main(["cost", str(out), "--out", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["edp"] == pytest.approx(m["cost"]["edp"])
    two = [a for a in args if a != "-q"] + ["--set", "budget.energy=0.5", "--overwrite"]
    assert main(two) == 2
    assert "give one cost budget, not edp and energy" in capsys.readouterr().err
    # M2-ViT's own recipe: no search, and no budget
    paper = [*_quantize_args(images, 2, "efficientvit_b0"), "--method", "m2q-paper", "--set", "quant.observer=minmax",
             "--out", str(tmp_path / "paper"), "-q"]
    assert main(paper + ["--budget-edp", "0.5"]) == 2
    assert "budget.edp (--budget-edp) needs the m2q recipe" in capsys.readouterr().err
    assert main(paper) == 0
    capsys.readouterr()
    assert main(["cost", str(tmp_path / "paper")]) == 0
    printed = capsys.readouterr().out
    # depthwise at 4-bit uniform; the 1x1 convs' grids are mixed (random weights: the 8-bit uniform grid has the
    # lower error in every channel, so they run on the MAC engine)
    assert " dwconv  mac    uniform   4  8" in printed and " mixed     8  8" in printed


def test_gptq_weights_are_saved_on_the_grid_and_reload(tmp_path, images, capsys):
    from vitq.artifact import load_artifact
    from vitq.quant.engine import weight_layers

    out = tmp_path / "g"
    common = [*_quantize_args(images, 6), "--w-bits", "4", "--a-bits", "8", "-q"]
    assert main([*common, "--set", "gptq.enabled=true", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    done = {row["name"] for row in report["gptq"]["layers"]}  # 6 x 197 tokens: enough rows for qkv/proj/fc1
    assert report["methods"]["gptq"] and "blocks.0.attn.qkv" in done and "head" in report["gptq"]["skipped"]
    model, _ = load_artifact(out)
    original = dict(load_model_fp().named_parameters())
    for m in weight_layers(model):
        w = m.weight.detach()
        if m.layer_name in done:  # re-rounded weights lie on the grid and differ from the float ones
            assert torch.allclose(m.w_quant.fake_quant(w), w, atol=1e-6) and not torch.equal(w, original[m.layer_name + ".weight"])


def test_recon_runs_at_low_bits_is_reported_and_reloads(tmp_path, images, capsys):
    from vitq.artifact import load_artifact

    out = tmp_path / "r"
    common = [*_quantize_args(images, 6), "--w-bits", "4", "--a-bits", "4", "-q"]
    assert main([*common, "--set", "recon.enabled=true", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["methods"]["recon"] and [s["name"] for s in report["recon"]["stages"]][0] == "stem"
    assert report["recon"]["settings"]["iters"] == MethodOptions.recon_iters
    model, _ = load_artifact(out)
    for m in model.modules():  # learned scales come back as ordinary parameters, nothing left learnable
        assert getattr(m, "log_scale", None) is None and getattr(m, "w_log_scale", None) is None
    capsys.readouterr()
    assert main([*common, "--method", "m2q", "--set", "recon.enabled=true", "--out", str(tmp_path / "y")]) == 2
    assert "the m2q recipe does not take recon" in capsys.readouterr().err
    assert main([*common, "--set", "recon.enabled=true", "--set", "recon.drop=1.5", "--out", str(tmp_path / "z")]) == 2
    assert "recon.drop" in capsys.readouterr().err
    # token shifts refine the full protocol's residual-stream grids
    assert main([*common, "--protocol", "full", "--set", "quant.residual_token_shift=false", "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "report.json").read_text())["config"]["residual_token_shift"] is False
    # ... and --gelu-token-shift its GELU-input grids
    assert main([*common, "--set", "quant.gelu_token_shift=true", "--out", str(tmp_path / "z")]) == 2
    assert "quant.gelu_token_shift" in capsys.readouterr().err
    assert main([*common, "--protocol", "full", "--set", "quant.gelu_token_shift=true", "--out", str(tmp_path / "u")]) == 0
    assert json.loads((tmp_path / "u" / "report.json").read_text())["config"]["gelu_token_shift"] is True
    assert main([*common, "--set", "recon.enabled=true", "--set", "recon.iters=0", "--out", str(tmp_path / "w")]) == 2
    assert "recon.iters" in capsys.readouterr().err
    assert main([*common, "--set", "recon.enabled=true", "--set", "recon.max_bits=9", "--out", str(tmp_path / "v")]) == 2
    assert "recon.max_bits" in capsys.readouterr().err
    assert not (tmp_path / "z").exists() and not (tmp_path / "w").exists() and not (tmp_path / "v").exists()
    # at 6 bits reconstruction runs unless recon.max_bits stops it
    six = [*_quantize_args(images, 6), "--w-bits", "6", "--a-bits", "6", "-q", "--set", "recon.enabled=true"]
    assert main([*six, "--set", "recon.max_bits=5", "--out", str(tmp_path / "s5")]) == 0
    assert "recon" not in json.loads((tmp_path / "s5" / "report.json").read_text())


def _quantize_args(images, calib_size: int, model: str = "deit_tiny") -> list[str]:
    """``vitq quantize`` on a random-init model, calibrating on ``calib_size`` of ``images`` and
    evaluating on all of them, in-process (no data-loader workers)."""
    return ["quantize", model, "--random-init", "--method", "minmax", "--calib", str(images), "--calib-size", str(calib_size),
            "--eval", str(images), "--allow-overlap", "--workers", "0"]


def load_model_fp():
    from vitq.zoo import load_model

    return load_model("deit_tiny", random_init=True).model


class _Stop(Exception):
    """Raised by a stand-in pipeline once the CLI has resolved its options."""


def _resolved(images, monkeypatch, tmp_path, extra: list[str]) -> dict:
    """The ``config``, ``options`` and keyword arguments ``vitq quantize --method mptq *extra`` hands to its
    pipeline or Greedy MP (neither is run)."""
    import vitq.api as api

    seen = {}

    def stand_in(model, calib, config, options, *args, **kwargs):
        seen.update(config=config, options=options, kwargs=kwargs)
        raise _Stop

    monkeypatch.setattr(api, "run_pipeline", stand_in)
    monkeypatch.setattr(api, "greedy_mp", stand_in)
    with pytest.raises(_Stop):
        main([*_quantize_args(images, 2), "--method", "mptq", *extra, "--out", str(tmp_path / "q")])
    return seen


def _resolved_options(images, monkeypatch, tmp_path, extra: list[str]):
    """The MethodOptions ``vitq quantize --method mptq *extra`` hands to its pipeline (which is not run)."""
    return _resolved(images, monkeypatch, tmp_path, extra)["options"]


@pytest.mark.parametrize("extra, expect", [
    (["--w-bits", "4", "--a-bits", "4"], True),  # rule R30: standard protocol, <= 6 activation bits
    (["--w-bits", "6", "--a-bits", "6"], True),
    (["--w-bits", "8", "--a-bits", "8"], False),
    (["--w-bits", "4", "--a-bits", "4", "--protocol", "full"], False),  # never decided in the full protocol
    (["--w-bits", "4", "--a-bits", "4", "--set", "rotation.enabled=false"], False),
    (["--budget-w", "5", "--budget-a", "5"], True),  # rule R37: standard Greedy MP, base widths <= 6
    (["--budget-w", "6", "--budget-a", "6"], True),
    (["--budget-w", "8", "--budget-a", "8"], False),
    (["--budget-w", "5", "--budget-a", "5", "--protocol", "full"], True),  # rule R38: full Greedy MP, base <= 5
    (["--budget-w", "6", "--budget-a", "6", "--protocol", "full"], False),
    (["--budget-w", "8", "--budget-a", "8", "--protocol", "full"], False),
    (["--budget-w", "5", "--budget-a", "5", "--protocol", "full", "--set", "rotation.enabled=false"], False),
    (["--budget-w", "5", "--budget-a", "5", "--set", "rotation.enabled=false"], False),
    (["--w-bits", "8", "--a-bits", "8", "--set", "rotation.enabled=true"], True),  # asked for
])
def test_method_mptq_rotates_by_default_only_where_rules_r30_r37_r38_adopted_it(images, monkeypatch, tmp_path, extra, expect):
    options = _resolved_options(images, monkeypatch, tmp_path, extra)
    assert options.rotate == expect
    assert options.rotate_parts == ("fc2", "v", "qk")  # the parts R30 adopted are the default parts


@pytest.mark.parametrize("extra, expect", [
    (["--budget-w", "5", "--budget-a", "5"], False),  # rule R37: standard Greedy MP keeps its assignment ...
    (["--budget-w", "6", "--budget-a", "6"], False),
    (["--budget-w", "8", "--budget-a", "8"], True),  # ... at base widths <= 6 only
    (["--budget-w", "5", "--budget-a", "5", "--protocol", "full"], False),  # rule R38: full Greedy MP, base <= 5
    (["--budget-w", "6", "--budget-a", "6", "--protocol", "full"], True),
    (["--budget-w", "8", "--budget-a", "8", "--protocol", "full"], True),
    (["--budget-w", "5", "--budget-a", "5", "--set", "search.uniform_fallback=true"], True),  # asked for
    (["--budget-w", "8", "--budget-a", "8", "--set", "search.uniform_fallback=false"], False),
])
def test_uniform_fallback_by_default_only_where_rules_r37_r38_left_it(images, monkeypatch, tmp_path, extra, expect):
    assert _resolved(images, monkeypatch, tmp_path, extra)["kwargs"]["uniform_fallback"] == expect


@pytest.mark.parametrize("protocol, bits, rotate, token_scale", [
    ("standard", 5, True, True), ("standard", 6, True, True), ("standard", 8, False, False),
    ("full", 5, True, True), ("full", 6, False, True), ("full", 8, False, True)])
def test_a_saved_greedy_config_gets_the_options_its_search_had(images, monkeypatch, tmp_path, protocol, bits, rotate,
                                                              token_scale):
    # rules R37 and R38: re-running a config that Greedy MP saved (base widths from its budget) must rotate and
    # scale tokens as the search did, or the reloaded model would not be the searched one
    searched = _resolved(images, monkeypatch, tmp_path,
                         ["--budget-w", str(bits), "--budget-a", str(bits), "--protocol", protocol])
    path = tmp_path / "config.json"
    # a search saves its base fields and one rule per layer; a config with rules is a mixed assignment
    import dataclasses

    from vitq.quant import LayerRule

    dataclasses.replace(searched["config"], rules=[LayerRule("head", w_bits=bits)]).save(path)
    options = _resolved_options(images, monkeypatch, tmp_path, ["--config", str(path)])
    assert options.rotate == searched["options"].rotate == rotate
    assert options.token_scale == searched["options"].token_scale == token_scale


@pytest.mark.parametrize("extra, expect", [
    (["--w-bits", "4", "--a-bits", "4"], True),  # rule R31: standard protocol, <= 6 activation bits
    (["--w-bits", "6", "--a-bits", "6"], True),
    (["--w-bits", "8", "--a-bits", "8"], False),
    (["--w-bits", "4", "--a-bits", "4", "--set", "token_scale.enabled=false"], False),
    (["--budget-w", "5", "--budget-a", "5"], True),  # rule R37: standard Greedy MP, base widths <= 6
    (["--budget-w", "6", "--budget-a", "6"], True),
    (["--budget-w", "8", "--budget-a", "8"], False),
    (["--budget-w", "5", "--budget-a", "5", "--set", "token_scale.enabled=false"], False),
    (["--budget-w", "8", "--budget-a", "8", "--set", "token_scale.enabled=true"], True),  # asked for
    (["--w-bits", "8", "--a-bits", "8", "--set", "token_scale.enabled=true"], True),
    # rule R33: in the full protocol together with the GELU inputs' token shifts, with a budget too
    (["--w-bits", "4", "--a-bits", "4", "--protocol", "full"], True),
    (["--w-bits", "6", "--a-bits", "6", "--protocol", "full"], True),
    (["--w-bits", "8", "--a-bits", "8", "--protocol", "full"], True),  # rule R47: at every width
    (["--budget-w", "5", "--budget-a", "5", "--protocol", "full"], True),
    (["--budget-w", "8", "--budget-a", "8", "--protocol", "full"], True),
    (["--w-bits", "4", "--a-bits", "4", "--protocol", "full", "--set", "quant.gelu_token_shift=false"], False),
    (["--w-bits", "8", "--a-bits", "8", "--protocol", "full", "--set", "quant.gelu_token_shift=false"], False),
    (["--w-bits", "4", "--a-bits", "4", "--protocol", "full", "--set", "token_scale.enabled=false"], False),
])
def test_token_scale_by_default_only_where_rules_adopted_it(images, monkeypatch, tmp_path, extra, expect):
    assert _resolved_options(images, monkeypatch, tmp_path, extra).token_scale == expect


@pytest.mark.parametrize("extra, expect", [
    (["--w-bits", "4", "--a-bits", "4", "--protocol", "full"], True),  # rule R33: full protocol, <= 6 bits
    (["--w-bits", "6", "--a-bits", "6", "--protocol", "full"], True),
    (["--w-bits", "8", "--a-bits", "8", "--protocol", "full"], True),  # rule R47: 7 and 8 bits too
    (["--w-bits", "7", "--a-bits", "7", "--protocol", "full"], True),
    (["--budget-w", "5", "--budget-a", "5", "--protocol", "full"], True),  # with a budget too
    (["--budget-w", "8", "--budget-a", "8", "--protocol", "full"], True),
    (["--w-bits", "4", "--a-bits", "4"], False),  # no GELU-input grid in the standard protocol
    (["--w-bits", "8", "--a-bits", "8"], False),
    (["--w-bits", "4", "--a-bits", "4", "--protocol", "full", "--set", "quant.gelu_token_shift=false"], False),
    (["--w-bits", "8", "--a-bits", "8", "--protocol", "full", "--set", "quant.gelu_token_shift=false"], False),
])
def test_gelu_token_shift_by_default_only_where_rules_r33_r47_adopted_it(images, monkeypatch, tmp_path, extra, expect):
    assert _resolved(images, monkeypatch, tmp_path, extra)["config"].gelu_token_shift == expect


def test_m2q_refuses_token_scale(images, tmp_path, capsys):
    assert main([*_quantize_args(images, 2), "--method", "m2q", "--set", "token_scale.enabled=true", "--out", str(tmp_path / "q")]) == 2
    assert "the m2q recipe does not take token_scale" in capsys.readouterr().err


def test_a_two_class_checkpoint_quantizes_and_evaluates_on_two_class_folders(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    from conftest import write_images

    for cls in ("dog", "cat"):
        write_images(tmp_path / "pets" / cls, ["a", "b", "c"], size=48, seed=len(cls))
    torch.manual_seed(0)
    ft = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=2)
    save_file({k: v.contiguous() for k, v in ft.state_dict().items()}, str(tmp_path / "ft.safetensors"))
    out = tmp_path / "q"
    assert main(["quantize", "deit_tiny", "--checkpoint", str(tmp_path / "ft.safetensors"), "--method", "minmax",
                 "--calib", str(tmp_path / "pets"), "--calib-size", "2", "--eval", str(tmp_path / "pets"),
                 "--workers", "0", "-q", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["labels"] == "folders" and report["quantized"]["n_images"] == 4  # 2 calibrate
    assert report["layers"][-1]["name"].startswith("head") and 0 <= report["quantized"]["top1"] <= 100
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(tmp_path / "pets"), "--workers", "0"]) == 0  # the artifact: 2 classes
    assert "n=6" in capsys.readouterr().out
    assert main(["eval", str(out), "--data", str(tmp_path / "pets"), "--labels", "none", "--workers", "0"]) == 0
    assert "top1=n/a (no labels)" in capsys.readouterr().out
    assert main(["quantize", "eva02_tiny_patch14_224", "--random-init", "--calib", str(tmp_path / "pets"), "--eval",
                 str(tmp_path / "pets"), "--out", str(tmp_path / "l")]) == 2
    err = capsys.readouterr().err
    assert "model 'eva02_tiny_patch14_224'" in err and "no vitq adapter" in err and not (tmp_path / "l").exists()
