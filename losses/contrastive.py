"""Contrastive loss in the weighted form (the loss Metrix trains with)."""

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from utils.settings import NON_NEGATIVE

from .candidates import Candidates, WeightedLoss
from .functional import sphere_distance
from .registry import Setting, register_pairwise


class ContrastiveLoss(WeightedLoss):
    """Contrastive loss on L2-normalised embeddings with Euclidean distance d:

        loss = sum(Wpos * d) / #{Wpos * d > 0} + sum(Wneg * [margin - d]_+) / #{Wneg * [margin - d]_+ > 0}

    Each part is averaged over its non-zero terms, as pytorch-metric-learning's AvgNonZeroReducer does; with
    fractional weights a term counts once whatever its weight, so a mixture with label lam adds lam * d to the
    positive sum and 1 to its count. On clean candidates this equals PML's
    ContrastiveLoss(pos_margin=0, neg_margin=margin).

    Explained skip: a part without a non-zero term (no positive pair in the batch, or every negative already
    beyond the margin) contributes 0, with zero gradient, instead of 0 / 0.
    """

    def __init__(self, margin: float = 0.5):
        super().__init__()
        self.margin = margin

    def weighted(self, anchors: Tensor, anchor_labels: Tensor, candidates: Candidates) -> Tensor:
        w_pos, w_neg = candidates.pair_weights(anchor_labels)
        return ContrastiveTerms.apply(sphere_distance(anchors, candidates.embeddings), w_pos, w_neg, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


@register_pairwise(
    "contrastive",
    margin=Setting(0.5, "negative margin on the Euclidean distance of normalised embeddings", NON_NEGATIVE),
)
def contrastive(num_classes: int, embedding_size: int, margin: float) -> ContrastiveLoss:
    return ContrastiveLoss(margin)


class ContrastiveTerms(torch.autograd.Function):
    """(d, Wpos, Wneg, margin) -> the mean of the non-zero entries of Wpos * d plus that of Wneg * [margin - d]_+,
    the weights constant. The loss is a scalar, so its gradient with respect to d is computed with it, and that one
    (A, M) matrix is all the backward keeps, where autograd keeps four (the weights, the hinge and d): with
    Metrix's B (B - 1) candidates, a good part of a step's extra memory.

    d(loss)/dd = Wpos / #pos - Wneg [margin - d > 0] / #neg: the counts are piecewise constant, and where the
    hinge is flat (margin - d <= 0) it passes nothing, as torch's relu.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, d: Tensor, w_pos: Tensor, w_neg: Tensor, margin: float) -> Tensor:
        pos = w_pos * d
        neg = (margin - d).clamp_(min=0).mul_(w_neg)
        pos_count, neg_count = nonzero_count(pos), nonzero_count(neg)
        loss = pos.sum() / pos_count + neg.sum() / neg_count
        # Written over the terms just summed: no more (A, M) matrices than the forward had. The weights are not
        # negative, so Wneg [margin - d > 0] = Wneg [Wneg (margin - d) > 0].
        grad_d = torch.div(w_pos, pos_count, out=pos).sub_(neg.gt_(0).mul_(w_neg).div_(neg_count))
        ctx.save_for_backward(grad_d)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (grad_d,) = ctx.saved_tensors
        return grad_d * grad, None, None, None


def nonzero_count(terms: Tensor) -> Tensor:
    """How many terms are non-zero, at least 1: a part without a non-zero term averages to 0 rather than 0 / 0.

    An entry left out passes no gradient on either: its weight is 0, its hinge is flat or its distance is 0
    (where sphere_distance takes the subgradient 0).
    """
    return torch.count_nonzero(terms).clamp_min(1)
