"""Contrastive loss in the weighted form (the loss Metrix trains with)."""

import torch
import torch.nn.functional as F
from torch import Tensor

from .candidates import Candidates, WeightedLoss
from .functional import sphere_distance


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
        d = sphere_distance(anchors, candidates.embeddings)
        pos = w_pos * d
        neg = w_neg * F.relu(self.margin - d)
        return average_nonzero(pos) + average_nonzero(neg)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


def average_nonzero(terms: Tensor) -> Tensor:
    """The mean of the non-zero entries of non-negative terms, 0 when there is none.

    mean_over(terms, terms > 0) without its torch.where, which costs two passes over the B x M terms: an entry
    left out is 0 already, and it passes no gradient on, because its weight is 0, its ReLU is on the flat side or
    its distance is 0 (where sphere_distance takes the subgradient 0).
    """
    return terms.sum() / torch.count_nonzero(terms).clamp_min(1)
