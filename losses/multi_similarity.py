"""Multi-similarity loss (Wang et al., CVPR 2019) in the weighted form, with optional MS pair mining."""

import torch.nn.functional as F
from torch import Tensor

from utils.settings import NON_NEGATIVE, POSITIVE, boolean, number

from .candidates import Candidates, WeightedLoss
from .functional import cosine_similarity, log1p_sum_exp, mean_over
from .registry import Setting, register_pairwise


class MultiSimilarityLoss(WeightedLoss):
    """Multi-similarity loss on the cosine similarity s of anchor a and candidate j:

        loss_a = 1/alpha log(1 + sum_j Wpos e^{-alpha (s - base)}) + 1/beta log(1 + sum_j Wneg e^{beta (s - base)})

    averaged over the anchors that see at least one candidate (every anchor of a clean batch of two or more,
    where this equals PML's MultiSimilarityLoss(alpha, beta, base)). Computed as a log-sum-exp with log-weights,
    so it never overflows.

    mining=True applies MS pair mining (PML's MultiSimilarityMiner(epsilon)) to the weights, per anchor: a
    positive is kept if s - epsilon < the most similar negative, a negative if s + epsilon > the least similar
    positive. With fractional weights, every candidate with Wpos > 0 is a positive and every one with Wneg > 0
    a negative, and a kept candidate keeps its weight. A mixture (0 < lam < 1) is both, hence within epsilon of
    itself and always kept: being part positive and part negative, it sits on the decision boundary, which is
    what mining looks for. With lam in {0, 1} this is exactly PML's mining.

    Explained skip: an anchor without a positive (or negative) gets 0 from that part (log 1), with finite
    gradients; with mining it also keeps no negative (there is no positive to be confused with), as in PML.
    """

    def __init__(
        self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, mining: bool = False, epsilon: float = 0.1
    ):
        super().__init__()
        self.alpha, self.beta, self.base = alpha, beta, base
        self.mining, self.epsilon = mining, epsilon

    def weighted(self, anchors: Tensor, anchor_labels: Tensor, candidates: Candidates) -> Tensor:
        s = cosine_similarity(anchors, candidates.embeddings)
        w_pos, w_neg = candidates.pair_weights(anchor_labels)
        if self.mining:
            w_pos, w_neg = self.mine(s.detach(), w_pos, w_neg)
        pos = log1p_sum_exp(-self.alpha * (s - self.base), w_pos) / self.alpha
        neg = log1p_sum_exp(self.beta * (s - self.base), w_neg) / self.beta
        return mean_over(pos + neg, candidates.anchor_mask.any(dim=1))

    def mine(self, s: Tensor, w_pos: Tensor, w_neg: Tensor) -> tuple[Tensor, Tensor]:
        """Zero the weights of the pairs MS mining drops (see the class docstring)."""
        is_pos, is_neg = w_pos > 0, w_neg > 0
        # -inf / +inf when an anchor has no negative / positive: then nothing of the other kind is hard. The padded
        # column is that default, and keeps amax / amin defined when there is no candidate at all.
        hardest_neg = F.pad(s.masked_fill(~is_neg, float("-inf")), (0, 1), value=float("-inf")).amax(1, keepdim=True)
        hardest_pos = F.pad(s.masked_fill(~is_pos, float("inf")), (0, 1), value=float("inf")).amin(1, keepdim=True)
        keep_pos = is_pos & (s - self.epsilon < hardest_neg)
        keep_neg = is_neg & (s + self.epsilon > hardest_pos)
        return w_pos * keep_pos, w_neg * keep_neg

    def extra_repr(self) -> str:
        mining = f", mining=True, epsilon={self.epsilon}" if self.mining else ""
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}{mining}"


@register_pairwise(
    "multisimilarity",
    ms_alpha=Setting(2.0, "positive scale", POSITIVE),
    ms_beta=Setting(50.0, "negative scale", POSITIVE),
    ms_base=Setting(0.5, "similarity offset", number(-1, 1)),
    ms_mining=Setting(False, "MS pair mining", boolean()),
    ms_epsilon=Setting(0.1, "mining margin", NON_NEGATIVE),
)
def multisimilarity(
    num_classes: int,
    embedding_size: int,
    ms_alpha: float,
    ms_beta: float,
    ms_base: float,
    ms_mining: bool,
    ms_epsilon: float,
) -> MultiSimilarityLoss:
    return MultiSimilarityLoss(ms_alpha, ms_beta, ms_base, ms_mining, ms_epsilon)
