"""losses/ntxent.py against pytorch-metric-learning's NTXentLoss and Hyp-ViT's released contrastive_loss."""

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import NTXentLoss as PMLNTXentLoss

from losses.candidates import Candidates
from losses.ntxent import NTXentLoss


def hyp_vit_sphere_loss(x0: torch.Tensor, x1: torch.Tensor, tau: float) -> torch.Tensor:
    """train.py's contrastive_loss with hyp_c=0 (github.com/htdt/hyp_metric), on the CPU: x0[k] and x1[k] are the
    two views of class k."""
    bsize = x0.shape[0]
    target = torch.arange(bsize)
    eye_mask = torch.eye(bsize, dtype=x0.dtype) * 1e9
    logits00 = x0 @ x0.t() / tau - eye_mask
    logits01 = x0 @ x1.t() / tau
    logits = torch.cat([logits01, logits00], dim=1)
    logits -= logits.max(1, keepdim=True)[0].detach()
    return F.cross_entropy(logits, target)


def test_equals_pml_ntxent_values_and_gradients():
    torch.manual_seed(0)
    embeddings = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5])  # class 4 alone: an anchor without a positive
    ours = NTXentLoss(0.2)(embeddings, labels)
    theirs = PMLNTXentLoss(temperature=0.2)(embeddings, labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    (our_grad,) = torch.autograd.grad(ours, embeddings)
    (their_grad,) = torch.autograd.grad(PMLNTXentLoss(temperature=0.2)(embeddings, labels), embeddings)
    torch.testing.assert_close(our_grad, their_grad)


def test_two_views_per_class_is_half_hyp_vit_sphere_loss():
    """Hyp-ViT sums its loss over the ordered pairs of views (x0 against x1, x1 against x0) of L2-normalised
    embeddings."""
    torch.manual_seed(1)
    views = F.normalize(torch.randn(6, 2, 8, dtype=torch.float64), dim=2)
    theirs = hyp_vit_sphere_loss(views[:, 0], views[:, 1], 0.1) + hyp_vit_sphere_loss(views[:, 1], views[:, 0], 0.1)
    labels = torch.arange(6).repeat_interleave(2)
    assert NTXentLoss(0.1)(views.reshape(12, 8), labels).item() == pytest.approx(theirs.item() / 2, rel=1e-9)


def test_by_hand_one_anchor_with_a_mixture():
    """Anchor a of class 0; candidates: p of class 0, n of class 1, and a 0.25/0.75 mixture of classes 0 and 1:
    positive weights (1, 0, 0.25), negative weights (0, 1, 0.75)."""
    anchor = torch.tensor([[1.0, 0.0]])
    candidates = torch.tensor([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])  # cosines 0.6, 0, -1
    mixed = Candidates(
        candidates,
        labels=torch.tensor([0, 1, 0]),
        other_labels=torch.tensor([0, 1, 1]),
        lam=torch.tensor([1.0, 1.0, 0.25]),
        anchor_mask=torch.ones(1, 3, dtype=torch.bool),
    )
    t = 0.5
    negatives = 1.0 * torch.exp(torch.tensor(0.0 / t)) + 0.75 * torch.exp(torch.tensor(-1.0 / t))
    term = lambda s: -torch.log(torch.exp(torch.tensor(s / t)) / (torch.exp(torch.tensor(s / t)) + negatives))  # noqa: E731
    expected = (1.0 * term(0.6) + 0.25 * term(-1.0)) / 1.25
    assert NTXentLoss(t)(anchor, torch.tensor([0]), mixed).item() == pytest.approx(expected.item(), rel=1e-6)


def test_no_negative_or_no_positive_gives_zero_with_finite_gradients():
    for labels in (torch.zeros(4, dtype=torch.long), torch.arange(4)):
        embeddings = torch.randn(4, 3, requires_grad=True)
        loss = NTXentLoss()(embeddings, labels)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(embeddings.grad).all()
