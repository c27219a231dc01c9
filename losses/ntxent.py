"""The pairwise cross-entropy of Hyp-ViT's sphere variant (NT-Xent with labels), in the weighted form."""

import torch
from torch import Tensor

from utils.settings import POSITIVE

from .candidates import Candidates, WeightedLoss
from .functional import cosine_similarity
from .registry import Setting, register_pairwise


class NTXentLoss(WeightedLoss):
    """Cross-entropy of each positive pair against the anchor's negatives, on cosine similarities s over a
    temperature t:

        loss_ap = -log(e^{s_ap / t} / (e^{s_ap / t} + sum_n Wneg_an e^{s_an / t}))

    averaged over the positive pairs, each weighted by Wpos_ap. On a clean batch this equals
    pytorch-metric-learning's NTXentLoss(temperature=t); with two images per class it is also Hyp-ViT's
    contrastive_loss with hyp_c=0 (Ermolov et al., CVPR 2022, github.com/htdt/hyp_metric), which sums over the
    two ordered views, so theirs is twice this.

    Explained skip: a batch without a positive pair gives 0, with zero gradient.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def weighted(self, anchors: Tensor, anchor_labels: Tensor, candidates: Candidates) -> Tensor:
        logits = cosine_similarity(anchors, candidates.embeddings) / self.temperature
        w_pos, w_neg = candidates.pair_weights(anchor_labels)
        negatives = log_sum_exp(logits, w_neg)
        terms = torch.logaddexp(logits, negatives) - logits
        total = torch.where(w_pos > 0, terms * w_pos, 0).sum()
        return total / w_pos.sum().clamp_min(torch.finfo(w_pos.dtype).tiny)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


def log_sum_exp(x: Tensor, weights: Tensor) -> Tensor:
    """(A, 1) log(sum_j w_j e^{x_j}) per row for non-negative weights: -inf for a row without a positive weight,
    with finite gradients (a log-sum-exp of nothing, computed directly, would pass NaN back)."""
    present = weights > 0
    has_any = present.any(dim=1, keepdim=True)
    log_w = torch.where(present, weights, 1).log()
    filled = torch.where(present, x + log_w, torch.where(has_any, float("-inf"), 0.0))
    return torch.where(has_any, torch.logsumexp(filled, dim=1, keepdim=True), float("-inf"))


@register_pairwise(
    "ntxent", nt_temperature=Setting(0.1, "temperature of the pairwise cross-entropy (Hyp-ViT: 0.1)", POSITIVE)
)
def ntxent(num_classes: int, embedding_size: int, nt_temperature: float) -> NTXentLoss:
    return NTXentLoss(nt_temperature)
