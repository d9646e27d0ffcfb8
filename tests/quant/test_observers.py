import pytest
import torch

from vitq.quant import quantizers as Q
from vitq.quant.observers import ActivationObserver, minmax_range, mse_range, percentile_range


def _uq(bits):
    def f(x, lo, hi):
        s, z = Q.uniform_params(lo, hi, bits, False)
        return Q.fake_quant_uniform(x, s, z, *Q.int_range(bits, False))
    return f


def test_minmax_is_exact_over_batches():
    obs = ActivationObserver("minmax")
    obs.update(torch.tensor([[1.0, -2.0]]))
    obs.update(torch.tensor([[5.0, 0.0]]))
    lo, hi = obs.compute_range()
    assert lo.item() == -2.0 and hi.item() == 5.0


def test_percentile_clips_outliers():
    x = torch.cat([torch.linspace(-1, 1, 100000), torch.tensor([50.0])])
    lo, hi = percentile_range(x, 99.9)
    assert 0.99 < hi < 1.0 and -1.0 < lo < -0.99
    with pytest.raises(ValueError):
        percentile_range(x, 20)


def test_mse_not_worse_than_minmax_and_clips_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0, 1).sample((50000,))
    q = _uq(4)
    lo, hi = mse_range(x, q)
    mse_err = (q(x, lo, hi) - x).pow(2).mean()
    mm_err = (q(x, x.min(), x.max()) - x).pow(2).mean()
    assert mse_err <= mm_err and hi < x.max()


def test_mse_per_channel_chooses_each_channel():
    w = torch.randn(3, 256)
    w[1] *= 10
    lo, hi = mse_range(w, _uq(4), axis=0)
    assert lo.shape == (3,) and hi[1] > 3 * hi[0]


def test_mse_output_objective_uses_layer():
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    x[:, 0] *= 20  # a large channel that the weight ignores
    weight = torch.zeros(4, 8)
    weight[:, 1:] = torch.randn(4, 7)
    lo_t, hi_t = mse_range(x, _uq(4))
    lo_o, hi_o = mse_range(x, _uq(4), output_fn=lambda v: v @ weight.T)
    assert hi_o < hi_t  # output objective clips the channel that does not matter harder


def test_observer_sampling_is_seeded_and_bounded():
    def run():
        o = ActivationObserver("mse", max_elements=4096, seed=3)
        for i in range(5):
            o.update(torch.randn(64, 16, generator=torch.Generator().manual_seed(i)))
        return o.sample()
    a, b = run(), run()
    assert torch.equal(a, b) and a.numel() <= 4096


def test_empty_observer_raises():
    with pytest.raises(RuntimeError, match="no data"):
        ActivationObserver("minmax").compute_range()


def test_minmax_per_channel():
    lo, hi = minmax_range(torch.tensor([[1.0, 2.0], [-3.0, 4.0]]), axis=0)
    assert lo.tolist() == [1.0, -3.0] and hi.tolist() == [2.0, 4.0]


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_per_position_per_tensor_ranges_divide_rows_by_their_positions_factor(method):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 16, generator=g)
    x[:, 1] *= 64.0  # one massive position
    obs = ActivationObserver(method, axis=None, per_position=True)
    obs.update(x[:2])
    obs.update(x[2:])
    assert obs.min.shape == (6, 16)
    shift = torch.tensor([0.0, 6.0, 0.0, 0.0, 0.0, 0.0])
    y = x.clone()
    y[:, 1] /= 64.0
    if method == "minmax":
        lo, hi = obs.compute_range(token_shift=shift)
        assert lo == y.min() and hi == y.max()
        lo0, hi0 = obs.compute_range()
        assert lo0 == x.min() and hi0 == x.max()
    else:
        assert torch.equal(obs.sample(shift).sort(0).values, y.reshape(-1, 16).sort(0).values)  # all rows kept
        assert obs.sample(shift).abs().max() <= y.abs().max()
