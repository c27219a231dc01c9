"""The one weighted form shared by every loss.

A loss compares the clean embeddings of the batch (the anchors) with candidates. A candidate is
either a clean example or a Metrix mixture v = lam * x_i + (1 - lam) * x_j of two examples with
different labels. Its label is interpolated: it belongs to class y_i with weight lam and to class
y_j with weight 1 - lam. For an anchor of class c the candidate is then a positive with weight
Wpos = share of c in its label, and a negative with weight Wneg = 1 - Wpos. Clean examples are the
special case lam = 1, so one implementation per loss serves clean and mixed examples alike.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def loss_precision(x: Tensor) -> Tensor:
    """x in at least float32: 16-bit embeddings from an autocast model are cast up, float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@dataclass
class Candidates:
    """Embeddings compared with the batch's anchors, with their (possibly interpolated) labels.

    embeddings: (M, D) candidate embeddings.
    labels: (M,) first label y_i; other_labels: (M,) second label y_j (equal to labels when clean).
    lam: (M,) weight of the first label.
    anchor_mask: (B, M) bool, whether batch anchor a is compared with candidate v at all.
    weight: the weight of the loss over these candidates (a 0-d tensor for Metrix's, whose weight depends on the
    strategy drawn on the device).
    """

    embeddings: Tensor
    labels: Tensor
    other_labels: Tensor
    lam: Tensor
    anchor_mask: Tensor
    weight: Tensor | float = 1.0

    @classmethod
    def clean(cls, embeddings: Tensor, labels: Tensor) -> "Candidates":
        """The batch itself: every anchor is compared with every other example."""
        n = labels.shape[0]
        not_self = ~torch.eye(n, dtype=torch.bool, device=labels.device)
        lam = torch.ones(n, dtype=embeddings.dtype, device=embeddings.device)
        return cls(embeddings, labels, labels, lam, not_self)

    def label_weights(self, classes: Tensor) -> Tensor:
        """(A, M) share of class classes[a] in the label of candidate v."""
        first = matches(classes, self.labels, self.lam.dtype).mul_(self.lam)
        return first.add_(matches(classes, self.other_labels, self.lam.dtype).mul_(1 - self.lam))

    def pair_weights(self, anchor_labels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, M) positive and negative weights of every (anchor, candidate) pair."""
        positive = self.label_weights(anchor_labels)
        mask = self.anchor_mask.to(positive.dtype)
        positive.mul_(mask)
        return positive, mask.sub_(positive)  # the mask is 0 or 1: mask - positive * mask = (1 - positive) * mask


def matches(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """(A, M) 1.0 where a[i] == b[j], else 0.0.

    The labels are compared as floats, straight into floats: class indices (at most a few tens of thousands) are
    exact in float32, and on a CPU that comparison runs ~20x faster than one of int64 labels into floats, which
    itself saves a pass over the B x M matrix on booleans, then floats (with Metrix's B (B - 1) candidates it is
    not small).
    """
    out = torch.empty(a.shape[0], b.shape[0], dtype=dtype, device=a.device)
    return torch.eq(a.to(dtype)[:, None], b.to(dtype)[None, :], out=out)


class WeightedLoss(nn.Module):
    """The interface every loss shares.

    loss(embeddings, labels) is the loss of a clean batch, as in any PyTorch loop;
    loss(anchors, anchor_labels, candidates) compares the anchors with any candidates, clean or mixed.
    Subclasses implement `weighted`.
    """

    def forward(self, embeddings: Tensor, labels: Tensor, candidates: Candidates | None = None) -> Tensor:
        return self.weighted(
            embeddings, labels, Candidates.clean(embeddings, labels) if candidates is None else candidates
        )

    def weighted(self, anchors: Tensor, anchor_labels: Tensor, candidates: Candidates) -> Tensor:
        raise NotImplementedError
