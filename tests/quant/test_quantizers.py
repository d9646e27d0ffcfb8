import math

import pytest
import torch

from vitq.quant import quantizers as Q


def test_int_ranges():
    assert Q.int_range(4, True) == (-7, 7) and Q.int_range(4, False) == (0, 15)
    assert Q.int_range(8, True) == (-127, 127) and Q.int_range(2, False) == (0, 3)
    for bad in (1, 17, 4.0):
        with pytest.raises(ValueError, match="bit-width"):
            Q.int_range(bad, True)


def test_asymmetric_grid_exact_values_and_zero_is_exact():
    scale, zp = Q.uniform_params(torch.tensor(-1.0), torch.tensor(2.0), bits=2, symmetric=False)
    assert math.isclose(scale.item(), 1.0) and zp.item() == 1.0
    x = torch.tensor([-5.0, -1.0, -0.4, 0.0, 0.6, 1.49, 1.51, 9.0])
    out = Q.fake_quant_uniform(x, scale, zp, 0, 3)
    assert out.tolist() == [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0]


def test_range_not_containing_zero_is_widened():
    scale, zp = Q.uniform_params(torch.tensor(2.0), torch.tensor(4.0), 8, False)
    assert zp.item() == 0 and math.isclose(scale.item(), 4.0 / 255, rel_tol=1e-6)


def test_symmetric_grid_is_symmetric():
    scale, zp = Q.uniform_params(torch.tensor(-0.5), torch.tensor(0.7), 4, True)
    assert zp.item() == 0 and math.isclose(scale.item(), 0.1, rel_tol=1e-6)
    out = Q.fake_quant_uniform(torch.tensor([-0.7, 0.7, -0.04, 0.06]), scale, zp, -7, 7)
    assert torch.allclose(out, torch.tensor([-0.7, 0.7, 0.0, 0.1]))


def test_round_half_to_even():
    out = Q.fake_quant_uniform(torch.tensor([0.5, 1.5, 2.5]), torch.tensor(1.0), torch.tensor(0.0), 0, 15)
    assert out.tolist() == [0.0, 2.0, 2.0]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_error_bound_inside_range(bits):
    x = torch.randn(10000)
    lo, hi = x.min(), x.max()
    scale, zp = Q.uniform_params(lo, hi, bits, False)
    err = (Q.fake_quant_uniform(x, scale, zp, *Q.int_range(bits, False)) - x).abs()
    assert err.max() <= scale / 2 + 1e-6


def test_fast_path_equals_reference_formula():
    x = torch.randn(64, 33) * 3
    scale, zp = Q.uniform_params(torch.tensor(-2.5), torch.tensor(4.0), 5, False)
    ref = Q.dequantize_uniform(Q.quantize_uniform(x, scale, zp, 0, 31), scale, zp)
    assert torch.equal(Q.fake_quant_uniform(x, scale, zp, 0, 31), ref)
    # per channel along axis 0
    w = torch.randn(8, 16)
    s, z = Q.uniform_params(w.amin(1), w.amax(1), 4, True)
    ref = Q.dequantize_uniform(Q.quantize_uniform(w, s[:, None], z[:, None], -7, 7), s[:, None], z[:, None])
    assert torch.equal(Q.fake_quant_uniform(w, s, z, -7, 7, axis=0), ref)


def test_per_channel_independence():
    w = torch.randn(4, 32)
    s, z = Q.uniform_params(-w.abs().amax(1), w.abs().amax(1), 4, True)
    base = Q.fake_quant_uniform(w, s, z, -7, 7, axis=0)
    w2 = w.clone()
    w2[0] *= 100  # changing channel 0 and its scale leaves the others untouched
    s2, z2 = Q.uniform_params(-w2.abs().amax(1), w2.abs().amax(1), 4, True)
    out = Q.fake_quant_uniform(w2, s2, z2, -7, 7, axis=0)
    assert torch.equal(out[1:], base[1:]) and not torch.equal(out[0], base[0])


def test_zero_range_gives_no_inf_or_nan():
    x = torch.zeros(10)
    scale, zp = Q.uniform_params(x.min(), x.max(), 8, False)
    out = Q.fake_quant_uniform(x, scale, zp, 0, 255)
    assert torch.isfinite(out).all() and torch.equal(out, x)


def test_pot_levels_are_powers_of_two_or_zero():
    w = torch.randn(1000)
    p = Q.pot_scale_exponent(w.abs().max())
    out = Q.fake_quant_pot(w, p, bits=4, signed=True)
    mags = out.abs()[out != 0]
    assert torch.equal(torch.log2(mags), torch.round(torch.log2(mags)))
    assert len(torch.unique(out.abs())) <= Q.pot_num_levels(4, True) + 1
    assert mags.max() <= 2 ** p.item() and mags.min() >= 2 ** (p.item() - 6)


def test_pot_rounds_to_nearest_level():
    p = torch.tensor(0.0)  # levels 0, 2^-6 .. 2^0 for 4 bits signed
    x = torch.tensor([0.74, 0.76, -0.3, 2 ** -7 * 0.9, 2 ** -7 * 1.1, 5.0])
    out = Q.fake_quant_pot(x, p, 4, True)
    assert out.tolist() == [0.5, 1.0, -0.25, 0.0, 2 ** -6, 1.0]


def test_pot_unsigned_for_softmax_and_rejects_negatives():
    x = torch.rand(100)
    out = Q.fake_quant_pot(x, torch.tensor(0.0), 4, signed=False)
    assert (out >= 0).all() and len(torch.unique(out)) <= 16
    with pytest.raises(ValueError, match="negative"):
        Q.fake_quant_pot(-x, torch.tensor(0.0), 4, signed=False)


def test_pot_decode_is_exactly_a_shift():
    bits = 5
    levels_n = Q.pot_num_levels(bits, True)
    w = torch.randn(200)
    p = Q.pot_scale_exponent(w.abs().max())
    sign, code = Q.quantize_pot(w, p, bits, True)
    a = torch.randint(-128, 128, (200,))
    shifted = Q.pot_shift_product(a, sign, code, bits)
    # The same product in real arithmetic, expressed in units of the smallest level 2^(p-(L-1)).
    real = a.double() * Q.dequantize_pot(sign, code, p).double() / 2.0 ** (p.item() - (levels_n - 1))
    assert torch.equal(shifted.double(), real)


def test_two_region_round_trip_and_grid():
    delta, m, bits = torch.tensor(1 / 16), 3, 6
    n = 2 ** (bits - 1)
    boundary = (n - 0.5) * delta / 2**m  # the fine region ends half a step past its top code
    x = torch.rand(5000) * 1.5
    fq = Q.fake_quant_two_region(x, delta, m, boundary, bits)
    region, code = Q.two_region_codes(x, delta, m, boundary, bits)
    assert torch.equal(Q.two_region_decode(region, code, delta, m), fq)
    assert code.min() >= 0 and code.max() <= n - 1
    # values on the grid survive unchanged
    assert torch.equal(Q.fake_quant_two_region(fq, delta, m, boundary, bits), fq)
    # fine region error is 2^m times smaller than the coarse step
    small = x < boundary
    assert (fq[small] - x[small]).abs().max() <= delta / 2**m / 2 + 1e-7


def test_fused_two_region_equals_encode_decode_signed():
    # The fused fake-quant must equal decode(encode(x)) bit for bit, including the signed fine region
    # (post-GELU) and values far outside both regions.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) * 3
    for bits, m, signed in ((4, 2, True), (6, 4, True), (8, 1, False)):
        delta, boundary = torch.tensor(0.37), torch.tensor(0.8)
        region, code = Q.two_region_codes(x, delta, m, boundary, bits, signed_fine=signed)
        fq = Q.fake_quant_two_region(x, delta, m, boundary, bits, signed_fine=signed)
        assert torch.equal(Q.two_region_decode(region, code, delta, m), fq)


def test_two_region_m0_is_uniform():
    x = torch.rand(100)
    d = torch.tensor(1 / 31)
    a = Q.fake_quant_two_region(x, d, 0, torch.tensor(0.5), 6)
    b = Q.fake_quant_uniform(x, d, torch.tensor(0.0), 0, 31)
    assert torch.allclose(a, b)


def test_groups_view():
    w = torch.arange(24.0).reshape(2, 12)
    assert Q.to_groups(w, 4).shape == (6, 4)
    with pytest.raises(ValueError, match="group size"):
        Q.to_groups(w, 5)


def test_ptf_per_channel_power_of_two_factors_cover_each_channel():
    lo = torch.tensor([-1.0, -0.01, -580.0, 0.0])
    hi = torch.tensor([1.0, 0.02, 39.0, 0.0])
    scale, zp, shift = Q.ptf_params(lo, hi, bits=8, max_shift=7)
    ratios = scale / scale.min()
    assert torch.equal(torch.log2(ratios), torch.round(torch.log2(ratios)))  # power-of-two ratios
    assert shift.min() >= 0 and shift.max() <= 7 and shift[2] == 7
    # every channel's range fits its own grid, so small channels keep a fine step
    assert ((hi - lo) <= scale * 255 + 1e-6).all() and scale[0] < scale[2] / 64
    x = torch.stack([torch.linspace(a, b, 50) for a, b in zip(lo.tolist(), hi.tolist())], dim=1)
    out = Q.fake_quant_uniform(x, scale, zp, 0, 255, axis=1)
    assert ((out - x).abs() <= scale / 2 + 1e-5).all()


def test_token_shifts_only_for_positions_far_above_the_median():
    lo = -torch.ones(10, 4)
    hi = torch.ones(10, 4)
    hi[3, 1] = 7.9  # under 8x the median position: no shift
    hi[7, 2] = 300.0  # 300x: the smallest shift that brings it within 8x, ceil(log2(300) - 3) = 6
    lo[9, 0] = -17.0  # a negative end counts too: ceil(log2(17) - 3) = 2
    shift = Q.token_shift_params(lo, hi)
    assert shift.tolist() == [0, 0, 0, 0, 0, 0, 0, 6, 0, 2]
    assert Q.token_shift_params(lo, hi, max_shift=3)[7] == 3


def test_token_factor_checks_positions():
    shift = torch.tensor([0.0, 2.0, 1.0])
    f = Q.token_factor(torch.zeros(5, 3, 8), shift)
    assert f.shape == (3, 1) and f.flatten().tolist() == [1.0, 4.0, 2.0]
    with pytest.raises(ValueError, match="positions"):
        Q.token_factor(torch.zeros(5, 4, 8), shift)
