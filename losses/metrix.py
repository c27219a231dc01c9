"""Metrix (Venkataramanan et al., ICLR 2022): mixed examples for metric learning.

A mixture v = lam * x_i + (1 - lam) * x_j of two batch examples with different labels, lam ~
Beta(alpha, alpha), is a candidate with the interpolated label (y_i: lam, y_j: 1 - lam). Which of
the batch's anchors compare with it depends on the strategy, drawn afresh for every step:

- positive_negative: the anchors a != i of class y_i. For them x_i is a positive and x_j a
  negative, so v is a positive of weight lam and a negative of weight 1 - lam.
- anchor_negative: the anchor i alone, mixed with one of its negatives. The paper uses it for
  anchors without a positive; we use it for every anchor, which also covers that case.

Every ordered pair (i, j) with different labels is a candidate; `max_pairs` keeps the hardest ones
(most similar clean embeddings first), which bounds memory: feature mode holds one feature map per
pair. All of it is dense tensor work on the device with static shapes: no loop over anchors and no
host-device synchronisation (pairs a strategy cannot use stay in the tensors with an all-False
anchor mask, so the losses ignore them).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.candidates import Candidates

MODES = ("input", "feature", "embed")
STRATEGIES = ("random", "positive_negative", "anchor_negative")


def ordered_pairs(batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """All (i, j) with i != j, as two index tensors of length B * (B - 1)."""
    first = torch.arange(batch_size, device=device).repeat_interleave(batch_size - 1)
    offsets = torch.arange(batch_size - 1, device=device).repeat(batch_size)
    second = (first + 1 + offsets) % batch_size  # skips j == i without boolean indexing
    return first, second


class Metrix:
    """The mixer `Criterion` calls: (model, images, feature_map, embeddings, labels) -> Candidates."""

    def __init__(self, mode: str, alpha: float = 2.0, strategy: str = "random", max_pairs: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown Metrix mode {mode!r}: choose one of {', '.join(MODES)}")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown Metrix strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        self.mode, self.alpha, self.strategy, self.max_pairs = mode, alpha, strategy, max_pairs

    def __call__(self, model: nn.Module, images: Tensor, feature_map: Tensor, embeddings: Tensor,
                 labels: Tensor) -> Candidates:
        batch = torch.arange(labels.shape[0], device=labels.device)
        first, second = ordered_pairs(labels.shape[0], labels.device)
        same_class = labels[:, None] == labels[None, :]
        has_positive = (same_class.sum(dim=1) > 1)[first]
        positive_negative = self.draw_strategy(labels.device)
        # A pair is usable when its labels differ and, for positive-negative mixing, x_i has a positive.
        usable = (labels[first] != labels[second]) & (has_positive | ~positive_negative)
        if self.max_pairs is not None and self.max_pairs < first.shape[0]:
            first, second, usable = self.hardest(embeddings.detach(), first, second, usable)
        lam = self.draw_lam(first.shape[0], embeddings)
        mixed = self.mix(model, images, feature_map, embeddings, first, second, lam)
        sees = torch.where(positive_negative, same_class[:, first] & (batch[:, None] != first[None, :]),
                           batch[:, None] == first[None, :])
        return Candidates(mixed, labels[first], labels[second], lam, sees & usable[None, :], model.classifier(mixed))

    def draw_strategy(self, device: torch.device) -> Tensor:
        """A 0-d bool tensor on the device: True for positive-negative mixing this step."""
        if self.strategy != "random":
            return torch.full((), self.strategy == "positive_negative", device=device)
        return torch.rand((), device=device) < 0.5

    def draw_lam(self, count: int, like: Tensor) -> Tensor:
        # validate_args=False: argument checks would read values back to the host.
        alpha = torch.full((), self.alpha, dtype=torch.float32, device=like.device)
        return torch.distributions.Beta(alpha, alpha, validate_args=False).sample((count,)).to(like.dtype)

    def hardest(self, embeddings: Tensor, first: Tensor, second: Tensor, usable: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """The max_pairs usable pairs with the most similar embeddings (hardest negatives) first."""
        unit = F.normalize(embeddings, dim=1)
        score = (unit[first] * unit[second]).sum(dim=1).masked_fill(~usable, float("-inf"))
        keep = score.topk(self.max_pairs).indices
        return first[keep], second[keep], usable[keep]

    def mix(self, model: nn.Module, images: Tensor, feature_map: Tensor, embeddings: Tensor, first: Tensor,
            second: Tensor, lam: Tensor) -> Tensor:
        """Mixed embeddings: mix the images, the feature maps or the embeddings themselves."""
        def interpolate(x: Tensor) -> Tensor:
            weight = lam.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
            return weight * x[first] + (1 - weight) * x[second]

        if self.mode == "input":
            return model.head(model.backbone(interpolate(images)))
        if self.mode == "feature":
            return model.head(interpolate(feature_map))
        return interpolate(embeddings)

    def __repr__(self) -> str:
        return (f"Metrix(mode={self.mode!r}, alpha={self.alpha}, strategy={self.strategy!r}, "
                f"max_pairs={self.max_pairs})")
