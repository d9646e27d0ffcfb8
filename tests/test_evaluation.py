import math

import torch

from vitq.evaluation import EvalResult, evaluate, evaluate_many, kl_from_reference


class Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def test_top1_top5_agreement_kl_by_hand():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5], [1.0, 0, 0, 0, 0, 0]])
    other = torch.tensor([[5.0, 4, 3, 2, 1, 0], [5.0, 1, 2, 3, 4, 0], [0.0, 1, 0.5, 0.4, -1, 0.3]])
    images = torch.arange(3).float().reshape(3, 1)
    labels = torch.tensor([0, 5, 4])
    r = evaluate(Fixed(other), (images, labels), reference=Fixed(logits), progress=False)
    assert r.n_images == 3
    assert math.isclose(r.top1, 100 / 3)  # only image 0 is right
    assert math.isclose(r.top5, 100 / 3)  # images 1 and 2 rank their label last
    assert math.isclose(r.agreement, 100 / 3)  # reference argmax 0, 5, 0 vs model 0, 0, 1
    kl = kl_from_reference(logits, other)
    assert kl[0] == 0 and math.isclose(r.kl, kl.mean().item(), rel_tol=1e-6)


def test_evaluate_many_pairs_models_on_same_images():
    logits = torch.randn(4, 10)
    images = torch.arange(4).float().reshape(4, 1)
    res = evaluate_many({"a": Fixed(logits), "b": Fixed(logits)}, (images, logits.argmax(1)), reference="a",
                        progress=False)
    assert res["a"].agreement is None and res["b"].agreement == 100.0 and abs(res["b"].kl) < 1e-6
    assert res["b"].top1 == 100.0


def test_result_serializes(tmp_path):
    r = EvalResult(model="m", n_images=1, top1=1.0)
    r.save(tmp_path / "r.json")
    assert '"top1": 1.0' in (tmp_path / "r.json").read_text()


def test_mean_se_and_paired_difference_by_hand():
    from vitq.evaluation import mean_se, paired_difference

    mean, se = mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and math.isclose(se, math.sqrt((4 + 1 + 0 + 9) / 3 / 4))
    assert mean_se([5.0]) == (5.0, None)
    # pairing: both vary a lot, their difference is constant, so its error is 0
    d, d_se = paired_difference([1.0, 10.0, 100.0], [2.0, 11.0, 101.0])
    assert d == 1.0 and d_se == 0.0
    import pytest
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        mean_se([])


def test_standard_errors_and_per_image_values_match_the_images():
    torch.manual_seed(0)
    n = 40
    ref_logits = torch.randn(n, 10)
    logits = ref_logits + 0.8 * torch.randn(n, 10)
    labels = torch.randint(0, 10, (n,))
    images = torch.arange(n).float().reshape(n, 1)
    r = evaluate(Fixed(logits), (images, labels), reference=Fixed(ref_logits), progress=False, per_image=True)
    p = r.per_image
    correct = (logits.argmax(1) == labels).int().tolist()
    ref_correct = (ref_logits.argmax(1) == labels).int().tolist()
    agree = (logits.argmax(1) == ref_logits.argmax(1)).int().tolist()
    assert p["correct"] == correct and p["ref_correct"] == ref_correct and p["agree"] == agree
    kl = kl_from_reference(ref_logits, logits)
    assert torch.allclose(torch.tensor(p["kl"]), kl, atol=1e-6)
    assert math.isclose(r.ref_top1, 100 * sum(ref_correct) / n)
    d = torch.tensor([100.0 * (c - f) for c, f in zip(correct, ref_correct)])
    assert math.isclose(r.top1_delta_se, (d.std() / math.sqrt(n)).item(), rel_tol=1e-5)
    assert r.top1_delta_se > 0  # the two models disagree on some images' correctness
    a = torch.tensor(agree, dtype=torch.float64) * 100
    assert math.isclose(r.agreement_se, (a.std() / math.sqrt(n)).item(), rel_tol=1e-9)
    assert math.isclose(r.kl_se, (kl.double().std() / math.sqrt(n)).item(), rel_tol=1e-4)
    assert "per_image" in r.to_dict()


def test_identical_models_have_zero_paired_error_and_no_per_image_unless_asked():
    logits = torch.randn(6, 10)
    images = torch.arange(6).float().reshape(6, 1)
    r = evaluate(Fixed(logits), (images, logits.argmax(1)), reference=Fixed(logits), progress=False)
    assert r.top1_delta_se == 0.0 and r.agreement_se == 0.0 and r.per_image is None
    assert "per_image" not in r.to_dict()
    alone = evaluate(Fixed(logits), (images, logits.argmax(1)), progress=False)
    assert alone.top1_delta_se is None and alone.kl_se is None
