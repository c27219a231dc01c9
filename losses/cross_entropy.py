"""Label-smoothed cross-entropy on a classifier the loss owns, for clean and mixed candidates."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .candidates import Candidates, WeightedLoss
from .functional import mean_over, used_candidates


class Classifier(nn.Module):
    """Embedding -> logits: dropout and a zero-initialised linear layer (optionally cosine)."""

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        dropout: float = 0.0,
        detach: bool = False,
        normalize_weight: bool = False,
    ) -> None:
        super().__init__()
        self.detach = detach
        self.normalize_weight = normalize_weight
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(num_features, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, embeddings: Tensor) -> Tensor:
        # detach: cross-entropy trains the classifier only, not the embedding.
        return self.scores(self.dropout(embeddings.detach() if self.detach else embeddings))

    def scores(self, embeddings: Tensor) -> Tensor:
        """The logits without dropout."""
        weight = F.normalize(self.linear.weight, dim=1) if self.normalize_weight else self.linear.weight
        return F.linear(embeddings, weight, self.linear.bias)


class CrossEntropyLoss(WeightedLoss):
    """Label-smoothed cross-entropy of the candidates' logits, with interpolated labels:

        loss_v = lam CE_eps(logits_v, y) + (1 - lam) CE_eps(logits_v, y'),
        CE_eps(z, y) = (1 - eps) (-log softmax(z)_y) + eps mean_c (-log softmax(z)_c)

    averaged over the used candidates (those some anchor sees; see functional.used_candidates), each counting
    once: a mixture is one example with a soft label, just as a clean one is an example with a hard label. On a
    clean batch (of two or more) this is F.cross_entropy(classifier(embeddings), labels, label_smoothing=eps). A
    clean batch of a single example has no pair, so its example is unused and the loss is 0. The anchors are not
    used. The classifier is the loss's own parameters (like proxy-anchor's proxies): logits exist only where
    cross-entropy is part of the objective.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        label_smoothing: float = 0.1,
        dropout: float = 0.0,
        detach: bool = False,
        normalize_weight: bool = False,
    ):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.classifier = Classifier(num_features, num_classes, dropout, detach, normalize_weight)

    def weighted(self, anchors: Tensor, anchor_labels: Tensor, candidates: Candidates) -> Tensor:
        log_p = self.classifier(candidates.embeddings).log_softmax(dim=1)
        lam = candidates.lam.to(log_p.dtype)
        nll_first = -log_p.gather(1, candidates.labels[:, None]).squeeze(1)
        nll_second = -log_p.gather(1, candidates.other_labels[:, None]).squeeze(1)
        nll = lam * nll_first + (1 - lam) * nll_second
        # Both CE terms share the smoothing term, and lam + (1 - lam) = 1.
        eps = self.label_smoothing
        per_candidate = (1 - eps) * nll + eps * -log_p.mean(dim=1)
        return mean_over(per_candidate, used_candidates(candidates))

    @torch.no_grad()
    def accuracy(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The classifier's training accuracy on a clean batch, without dropout (draws no random numbers)."""
        return (self.classifier.scores(embeddings).argmax(1) == labels).float().mean()

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"
