"""Label-smoothed cross-entropy on the classifier's logits, for clean and mixed candidates."""

from torch import Tensor, nn

from .candidates import Candidates
from .functional import mean_over, used_candidates


class CrossEntropyLoss(nn.Module):
    """Label-smoothed cross-entropy of the candidates' logits, with interpolated labels:

        loss_v = lam CE_eps(logits_v, y) + (1 - lam) CE_eps(logits_v, y'),
        CE_eps(z, y) = (1 - eps) (-log softmax(z)_y) + eps mean_c (-log softmax(z)_c)

    averaged over the used candidates (those some anchor sees; see functional.used_candidates), each counting
    once: a mixture is one example with a soft label, just as a clean one is an example with a hard label. On a
    clean batch (of two or more) this is F.cross_entropy(logits, labels, label_smoothing=eps). A clean batch of a
    single example has no pair, so its example is unused and the loss is 0. The anchors are not used.
    """

    def __init__(self, label_smoothing: float = 0.1):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, anchors: Tensor, anchor_labels: Tensor, candidates: Candidates) -> Tensor:
        if candidates.logits is None:
            raise ValueError("CrossEntropyLoss needs candidates.logits, the classifier's outputs for the candidates.")
        log_p = candidates.logits.log_softmax(dim=1)
        lam = candidates.lam.to(log_p.dtype)
        nll_first = -log_p.gather(1, candidates.labels[:, None]).squeeze(1)
        nll_second = -log_p.gather(1, candidates.other_labels[:, None]).squeeze(1)
        nll = lam * nll_first + (1 - lam) * nll_second
        # Both CE terms share the smoothing term, and lam + (1 - lam) = 1.
        eps = self.label_smoothing
        per_candidate = (1 - eps) * nll + eps * -log_p.mean(dim=1)
        return mean_over(per_candidate, used_candidates(candidates))

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"
