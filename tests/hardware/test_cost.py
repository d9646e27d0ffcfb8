"""The cost model against values computed by hand for a two-layer toy network."""
import pytest
import torch
from torch import nn

from vitq.hardware import estimate, extract_workloads, int8_baseline, layer_cost, load_hardware
from vitq.hardware.workload import Workload
from vitq.quant import QuantConfig
from vitq.quant.config import LayerRule
from vitq.quant.engine import prepare

# Defaults from accelerator.yaml, written out so that the test does not reuse the code under test.
MULT_8x8, ADD_32, SRAM_BIT, DRAM_BIT = 0.2, 0.1, 20.0 / 64, 2000.0 / 64
FREQ, UNITS, DRAM_BPS = 500e6, 1024, 25.6e9


def toy():
    """1x1 conv 3->4 on a 2x2 image (48 MACs, 12 weights), then a linear 16->3 (48 MACs, 48 weights)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(16, 3)).eval()


def toy_workloads(linear_rule: LayerRule):
    q = prepare(toy(), QuantConfig(w_bits=8, a_bits=8, rules=[linear_rule]))
    return extract_workloads(q, (3, 2, 2))


def test_shapes_of_the_toy():
    conv, lin = toy_workloads(LayerRule("2", w_bits=4, w_scheme="pot"))
    assert (conv.op, conv.macs, conv.weight_elems, conv.in_elems, conv.out_elems) == ("conv", 48, 12, (12,), 16)
    assert (lin.op, lin.macs, lin.weight_elems, lin.in_elems, lin.out_elems) == ("linear", 48, 48, (16,), 3)
    assert (conv.engine, lin.engine) == ("mac", "shift")


def test_energy_latency_edp_by_hand():
    conv, lin = toy_workloads(LayerRule("2", w_bits=4, w_scheme="pot"))
    hw = load_hardware()
    # conv, W8A8 uniform on the MAC engine
    c = layer_cost(conv, hw)
    assert c.compute_pj == pytest.approx(48 * (MULT_8x8 + ADD_32))  # 14.4 pJ
    assert c.sram_bits == 12 * 8 + 12 * 8 + 16 * 8  # weights, input (one tile), output
    assert c.dram_bits == 12 * 8  # only the weights; activations fit on chip
    assert c.sram_pj == pytest.approx(320 * SRAM_BIT) and c.dram_pj == pytest.approx(96 * DRAM_BIT)
    assert c.compute_s == pytest.approx(48 / (UNITS * FREQ))
    assert c.dram_s == pytest.approx(96 / 8 / DRAM_BPS)
    # linear, W4 PoT x A8 on the shift-add engine: shifted operand 8 + (2^3 - 2) = 14 bits wide
    s = layer_cost(lin, hw)
    assert s.compute_pj == pytest.approx(48 * (ADD_32 * 14 / 32 + ADD_32))  # 6.9 pJ
    assert s.sram_bits == 48 * 4 + 16 * 8 + 3 * 8 and s.dram_bits == 48 * 4
    assert s.compute_s == pytest.approx(48 / (UNITS * FREQ))
    total = estimate([conv, lin], hw)
    energy_pj = 14.4 + 320 * SRAM_BIT + 96 * DRAM_BIT + 6.9 + 344 * SRAM_BIT + 192 * DRAM_BIT
    assert total.energy_j == pytest.approx(energy_pj * 1e-12)
    # both layers are DRAM-bound, so the DRAM interface is the busiest resource
    latency = (96 + 192) / 8 / DRAM_BPS
    assert total.latency_s == pytest.approx(latency)
    assert total.edp == pytest.approx(energy_pj * 1e-12 * latency)
    assert sum(c.edp_share for c in total.layers) == pytest.approx(1.0)


def test_pipeline_overlaps_the_engines(tmp_path):
    conv, lin = toy_workloads(LayerRule("2", w_bits=4, w_scheme="pot"))
    fast = tmp_path / "fast_dram.yaml"
    fast.write_text("memory: {dram_gb_per_s: 1.0e+9}\n")
    pipe = estimate([conv, lin], load_hardware(fast))
    assert pipe.latency_s == pytest.approx(48 / (UNITS * FREQ))  # the two engines work at once
    seq_file = tmp_path / "seq.yaml"
    seq_file.write_text("memory: {dram_gb_per_s: 1.0e+9}\nschedule: sequential\n")
    seq = estimate([conv, lin], load_hardware(seq_file))
    assert seq.latency_s == pytest.approx(2 * 48 / (UNITS * FREQ))
    assert seq.energy_j == pytest.approx(pipe.energy_j)


def test_precision_scalable_mac_engine_and_tiling(tmp_path):
    hw = load_hardware()
    w = Workload("l", "linear", macs=1000, weight_elems=10, in_elems=(100,), out_elems=100, w_bits=4, a_bits=8)
    assert layer_cost(w, hw).compute_s == pytest.approx(1000 / (UNITS * 2 * FREQ))  # 4x8: 2 products per unit
    assert layer_cost(w.with_bits(4, 4), hw).compute_s == pytest.approx(1000 / (UNITS * 4 * FREQ))
    assert layer_cost(w.with_bits(4, 4), hw).compute_pj == pytest.approx(1000 * (MULT_8x8 * 16 / 64 + ADD_32))
    # weights of 3 buffer-fulls: the input is streamed from SRAM three times
    small = tmp_path / "small.yaml"
    small.write_text("memory: {weight_buffer_kib: 1}\n")
    big = Workload("l", "linear", macs=1, weight_elems=3 * 1024, in_elems=(100,), out_elems=1, w_bits=8, a_bits=8)
    c = layer_cost(big, load_hardware(small))
    assert c.sram_bits == 3 * 1024 * 8 + 3 * 100 * 8 + 8


def test_int8_baseline_resets_bits_and_schemes():
    wl = toy_workloads(LayerRule("2", w_bits=4, w_scheme="pot"))
    base = int8_baseline(wl)
    assert all((w.w_bits, w.a_bits, w.scheme, w.engine) == (8, 8, "uniform", "mac") for w in base)
    assert estimate(base, load_hardware()).edp > estimate(wl, load_hardware()).edp


def test_a_layer_split_between_the_engines_takes_the_longer_part_and_the_sum_of_energies(tmp_path):
    fast = tmp_path / "fast_dram.yaml"
    fast.write_text("memory: {dram_gb_per_s: 1.0e+9}\n")
    hw = load_hardware(fast)
    lin = Workload("l", "linear", 3000, 48, (16,), 3, 8, 8, "mixed", shift_share=0.25)
    c = layer_cost(lin, hw)
    assert lin.engine == "split"
    mac_s, shift_s = 2250 / (UNITS * FREQ), 750 / (UNITS * FREQ)  # 8x8 bits: one product per unit per cycle
    assert (c.mac_s, c.shift_s) == (pytest.approx(mac_s), pytest.approx(shift_s))
    assert c.compute_s == pytest.approx(max(mac_s, shift_s))
    # APoT 8 bits: terms down to 2^-28, so the shifted operand is 8 + 28 -> capped at 32 bits; two shifts and an add
    apot_pj = 3 * ADD_32 + ADD_32
    assert c.compute_pj == pytest.approx(2250 * (MULT_8x8 + ADD_32) + 750 * apot_pj)
    # the whole layer on one engine is the special case; the MAC engine's half of a 50/50 split sets the time
    assert layer_cost(lin.with_bits(scheme="apot"), hw).compute_s == pytest.approx(3000 / (UNITS * FREQ))
    total = estimate([lin.with_bits(shift_share=0.5)], hw)
    assert total.busy_s["mac"] == pytest.approx(1500 / (UNITS * FREQ)) == pytest.approx(total.busy_s["shift"])
    assert total.latency_s == pytest.approx(1500 / (UNITS * FREQ))
    # at 4x8 bits the MAC engine is twice as fast (Bit Fusion): a third of the MACs on shifts balances the two
    w4 = lin.with_bits(w_bits=4, shift_share=1 / 3)
    c4 = layer_cost(w4, hw)
    assert c4.mac_s == pytest.approx(c4.shift_s)
