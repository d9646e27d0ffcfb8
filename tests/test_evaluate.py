import math

import torch

from vitq.evaluate import EvalResult, evaluate, evaluate_many, kl_from_reference


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
