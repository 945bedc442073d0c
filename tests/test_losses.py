"""Tests for citeqa.reward.losses: hand-computed values, gradient directions, symmetry,
agreement with the plain formulas, and stability for huge logits."""

from __future__ import annotations

import math

import pytest
import torch

from citeqa.reward.losses import bradley_terry_loss, combined_loss, label_loss

torch.set_num_threads(1)


def test_label_loss_hand_values() -> None:
    # Logit 0 -> p = 1/2 -> BCE = log 2 whatever the label.
    assert label_loss(torch.zeros(3), torch.tensor([0, 1, 1])).item() == pytest.approx(math.log(2))
    # Logit log 3 -> p = 3/4: label 1 costs -log(3/4), label 0 costs -log(1/4).
    logits = torch.tensor([math.log(3), math.log(3)], dtype=torch.float64)
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert label_loss(logits, torch.tensor([True, False])).item() == pytest.approx(expected)


def test_label_loss_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g, dtype=torch.float64) * 3
    labels = (torch.rand(50, generator=g) < 0.5).double()
    p = torch.sigmoid(logits)
    expected = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    assert label_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-10)


def test_bradley_terry_hand_values() -> None:
    # Equal logits: -log sigmoid(0) = log 2.
    a = torch.tensor([0.5, -2.0])
    assert bradley_terry_loss(a, a.clone(), torch.tensor([0, 1])).item() == pytest.approx(
        math.log(2)
    )
    # Margin log 3 for the preferred: -log(3/4); margin -log 3: -log(1/4).
    la = torch.tensor([math.log(3), 0.0], dtype=torch.float64)
    lb = torch.tensor([0.0, 0.0], dtype=torch.float64)
    loss = bradley_terry_loss(la, lb, torch.tensor([0, 0]))
    assert loss.item() == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2)
    loss = bradley_terry_loss(la, lb, torch.tensor([1, 1]))
    assert loss.item() == pytest.approx((-math.log(0.25) - math.log(0.5)) / 2)


def test_bradley_terry_gradients_push_preferred_up() -> None:
    la = torch.tensor([0.3, 1.0, -1.0], requires_grad=True)
    lb = torch.tensor([0.1, 1.0, 2.0], requires_grad=True)
    preferred = torch.tensor([0, 1, 0])
    bradley_terry_loss(la, lb, preferred).backward()
    assert la.grad is not None and lb.grad is not None
    # Gradient descent moves the preferred logit up (negative gradient) and the other down.
    for i, pref in enumerate(preferred.tolist()):
        winner, loser = (la, lb) if pref == 0 else (lb, la)
        assert winner.grad[i] < 0 < loser.grad[i]
        assert winner.grad[i] == pytest.approx(-loser.grad[i].item())


def test_bradley_terry_symmetry() -> None:
    g = torch.Generator().manual_seed(1)
    la, lb = torch.randn(20, generator=g), torch.randn(20, generator=g)
    preferred = (torch.rand(20, generator=g) < 0.5).long()
    assert bradley_terry_loss(la, lb, preferred).item() == pytest.approx(
        bradley_terry_loss(lb, la, 1 - preferred).item()
    )
    # Adding the same constant to both answers changes nothing.
    assert bradley_terry_loss(la + 5, lb + 5, preferred).item() == pytest.approx(
        bradley_terry_loss(la, lb, preferred).item(), rel=1e-5
    )


@pytest.mark.parametrize("big", [1e4, -1e4])
def test_stable_for_huge_logits(big: float) -> None:
    logits = torch.tensor([big, -big, big], requires_grad=True)
    labels = torch.tensor([1.0, 1.0, 0.0])
    loss = label_loss(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # A confidently wrong example costs |big|, a confidently right one ~0.
    n_wrong = int(((logits > 0).float() != labels).sum())
    assert n_wrong in (1, 2)
    assert loss.item() == pytest.approx(n_wrong * abs(big) / 3, rel=1e-6)

    la = torch.tensor([big, big], requires_grad=True)
    lb = torch.tensor([-big, -big], requires_grad=True)
    bt = bradley_terry_loss(la, lb, torch.tensor([0, 1]))
    bt.backward()
    assert torch.isfinite(bt) and torch.isfinite(la.grad).all() and torch.isfinite(lb.grad).all()
    assert bt.item() == pytest.approx(abs(big), rel=1e-6)  # (0 + 2|big|) / 2


def test_combined_loss() -> None:
    la, lb = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    preferred = torch.tensor([0, 1])
    logits, labels = torch.tensor([0.5, -0.5, 2.0]), torch.tensor([1, 0, 0])
    bt = bradley_terry_loss(la, lb, preferred)
    lab = label_loss(logits, labels)
    both = combined_loss(
        pair_logits=(la, lb), preferred=preferred, logits=logits, labels=labels,
        preference_weight=2.0, label_weight=0.5,
    )
    assert both.item() == pytest.approx(2.0 * bt.item() + 0.5 * lab.item())
    assert combined_loss(pair_logits=(la, lb), preferred=preferred).item() == pytest.approx(
        bt.item()
    )
    assert combined_loss(logits=logits, labels=labels).item() == pytest.approx(lab.item())
    with pytest.raises(ValueError, match="nothing to train on"):
        combined_loss()
    with pytest.raises(ValueError, match="together"):
        combined_loss(logits=logits)


def test_shape_and_empty_errors() -> None:
    with pytest.raises(ValueError):
        label_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError):
        label_loss(torch.zeros(0), torch.zeros(0))
