"""Proxy-anchor loss (Kim et al., CVPR 2020) in the weighted form."""

import torch
from torch import Tensor, nn

from utils.settings import NON_NEGATIVE, POSITIVE

from .candidates import Candidates, WeightedLoss
from .functional import cosine_similarity, log1p_sum_exp, mean_over, used_candidates
from .registry import Setting, register_pairwise


class ProxyAnchorLoss(WeightedLoss):
    """Proxy-anchor loss: the anchors are learnable class proxies p_c, s = cos(p_c, candidate v), and

        loss = mean over proxies with a positive of log(1 + sum_v Wpos e^{-alpha (s - delta)})
             + mean over all proxies of log(1 + sum_v Wneg e^{alpha (s + delta)})

    with Wpos[c, v] = share of class c in the label of v and Wneg = 1 - Wpos. A proxy has a positive when its
    Wpos row sums to more than 0. The batch's anchors are not used; only candidates that some anchor sees take
    part (see functional.used_candidates). On clean candidates this equals PML's
    ProxyAnchorLoss(num_classes, embedding_size, margin=delta, alpha=alpha) with the same proxies, which are
    initialised the same way (kaiming_normal_, fan_out). Proxies are kept in their own dtype (usually float32)
    and cast to the embeddings' dtype in forward. They usually get a larger learning rate than the network:
    lr_multiplier, which the objective's parameter groups read.

    Explained skip: with no proxy having a positive (no used candidate) the positive part is 0, not 0 / 0.

    Labels must lie in [0, num_classes). On the CPU a violation raises ValueError at once. On other devices the
    check would need a host-device sync, so it is a torch._assert_async instead: the error surfaces, as a
    RuntimeError, at a later synchronisation point.
    """

    def __init__(
        self, num_classes: int, embedding_size: int, alpha: float = 32.0, delta: float = 0.1, lr_multiplier: float = 1.0
    ):
        super().__init__()
        self.num_classes, self.alpha, self.delta = num_classes, alpha, delta
        self.lr_multiplier = lr_multiplier
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def weighted(self, anchors: Tensor, anchor_labels: Tensor, candidates: Candidates) -> Tensor:
        self.check_labels(torch.cat([candidates.labels, candidates.other_labels]))
        classes = torch.arange(self.num_classes, device=candidates.labels.device)
        used = used_candidates(candidates)
        share = candidates.label_weights(classes)
        w_pos, w_neg = share * used, (1 - share) * used
        s = cosine_similarity(self.proxies.to(candidates.embeddings.dtype), candidates.embeddings)
        pos = log1p_sum_exp(-self.alpha * (s - self.delta), w_pos)
        neg = log1p_sum_exp(self.alpha * (s + self.delta), w_neg)
        return mean_over(pos, w_pos.sum(dim=1) > 0) + neg.mean()

    def check_labels(self, labels: Tensor) -> None:
        """Fail on labels outside [0, num_classes): eagerly on the CPU, without a host sync elsewhere."""
        in_range = ((labels >= 0) & (labels < self.num_classes)).all()
        message = f"ProxyAnchorLoss needs labels in [0, {self.num_classes}) for num_classes={self.num_classes}"
        if labels.device.type != "cpu":
            torch._assert_async(in_range, message)
        elif not in_range:
            raise ValueError(f"{message}, got labels from {int(labels.min())} to {int(labels.max())}.")

    def extra_repr(self) -> str:
        size = self.proxies.shape[1]
        return f"num_classes={self.num_classes}, embedding_size={size}, alpha={self.alpha}, delta={self.delta}"


@register_pairwise(
    "proxyanchor",
    pa_alpha=Setting(32.0, "scale", POSITIVE),
    pa_delta=Setting(0.1, "margin", NON_NEGATIVE),
    proxy_lr_multiplier=Setting(100.0, "the proxies' learning rate is lr times this", POSITIVE),
)
def proxyanchor(
    num_classes: int, embedding_size: int, pa_alpha: float, pa_delta: float, proxy_lr_multiplier: float
) -> ProxyAnchorLoss:
    return ProxyAnchorLoss(num_classes, embedding_size, pa_alpha, pa_delta, proxy_lr_multiplier)
