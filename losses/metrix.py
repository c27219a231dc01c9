"""Metrix (Venkataramanan et al., ICLR 2022): mixed examples as extra candidates for the losses.

For an ordered pair (i, j) of batch examples with different labels, the mixture
v_ij = lam_ij * x_i + (1 - lam_ij) * x_j, lam_ij ~ Beta(alpha, alpha), is a candidate with the interpolated label
(class y_i with weight lam_ij, class y_j with 1 - lam_ij); x is the image, the last backbone feature map or the
embedding, by mode. Which clean anchors compare with v_ij depends on the strategy:

- positive_negative: the anchors a != i of class y_i. For them x_i is a positive and x_j a negative, so v_ij is a
  positive of weight lam_ij and a negative of weight 1 - lam_ij (Candidates.pair_weights gives exactly that).
- anchor_negative: the anchor i alone, mixed with its negative x_j. The paper keeps it for anchors without a
  positive; we use it for every anchor, so that an anchor-negative step trains every anchor, and it covers the
  anchors without a positive as a special case.
- random: one of the two for the whole batch, drawn afresh at every call.

Everything is dense tensor work on the device with static shapes, so there is no host-device synchronisation
(no nonzero, no boolean indexing, no .item()): a pair a strategy cannot use stays a candidate with an all-False
anchor_mask column, which every loss ignores. Without a cap there are B (B - 1) candidates; in feature mode that
is B (B - 1) feature maps, in input mode B (B - 1) images through the backbone. max_pairs=K keeps the K usable
pairs whose clean embeddings are most similar (the hardest negatives), which bounds time and memory by K.
Rules, decisions and measured cost: docs/metrix.md.

Under torchrun the embeddings and labels are the global batch's (gathered by Criterion), every rank builds the
same pairs (rank 0's random draws are broadcast), and in input and feature mode each rank runs the network on
its contiguous share of the pairs, made from the gathered images or feature maps; the mixed embeddings are
gathered back, so the losses see every mixture. docs/distributed.md states what that costs.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.candidates import Candidates, loss_precision
from utils import distributed

MODES = ("input", "feature", "embed")
STRATEGIES = ("random", "positive_negative", "anchor_negative")


def ordered_pairs(batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(first, second): all B (B - 1) ordered pairs (i, j) with i != j, grouped by i, j increasing.

    Built from static index arithmetic: the k-th partner of i is k, shifted by one past i itself.
    """
    partners = max(batch_size - 1, 0)  # an empty batch has no pair either
    first = torch.arange(batch_size, device=device)[:, None].expand(batch_size, partners)
    offset = torch.arange(partners, device=device)[None, :].expand(batch_size, partners)
    second = offset + (offset >= first).long()
    return first.reshape(-1), second.reshape(-1)


def interpolate(x: Tensor, first: Tensor, second: Tensor, lam: Tensor) -> Tensor:
    """lam * x[first] + (1 - lam) * x[second], lam broadcast over all but the first dimension.

    index_select rather than x[first]: its backward (index_add_) is faster on the CPU than that of indexing
    (index_put_ with accumulation), which matters with B (B - 1) feature maps.
    """
    weight = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return weight * x.index_select(0, first) + (1 - weight) * x.index_select(0, second)


class Metrix(nn.Module):
    """The mixer `Criterion` calls: (model, images, feature_map, embeddings, labels) -> mixed Candidates.

    mode: input | feature | embed, where the examples are mixed (see the module docstring).
    alpha: lam ~ Beta(alpha, alpha) per pair.
    strategy: random | positive_negative | anchor_negative.
    max_pairs: keep at most this many pairs, hardest first; None keeps all B (B - 1).

    The mixed examples go through the model in its current mode: in training, the head's (and in input mode the
    backbone's) BatchNorm layers normalise them with their own batch statistics and update the running ones.
    """

    def __init__(self, mode: str, alpha: float = 2.0, strategy: str = "random", max_pairs: int | None = None):
        super().__init__()
        # The messages name the options as the metrix ingredient spells them: they reach users as config errors.
        if mode not in MODES:
            raise ValueError(f"unknown metrix.mode {mode!r}: choose one of {', '.join(MODES)}")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown metrix.strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if alpha <= 0:
            raise ValueError(f"metrix.alpha={alpha} must be positive (lam ~ Beta(alpha, alpha))")
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"metrix.max_pairs={max_pairs} must be a positive number of pairs, or None for all")
        self.mode, self.alpha, self.strategy, self.max_pairs = mode, alpha, strategy, max_pairs

    def forward(self, model: nn.Module, images: Tensor, feature_map: Tensor, embeddings: Tensor,
                labels: Tensor) -> Candidates:
        positive_negative = self.draw_strategy(labels.device)
        first, second = ordered_pairs(labels.shape[0], labels.device)
        mask = self.anchor_mask(labels, first, positive_negative) & (labels[first] != labels[second])
        if self.max_pairs is not None:
            first, second, mask = self.hardest(embeddings, first, second, mask)
        lam = self.sample_lam(first.shape[0], labels.device)
        mixed = self.mix(model, images, feature_map, embeddings, first, second, lam)
        return Candidates(mixed, labels[first], labels[second], lam.to(mixed.dtype), mask)

    def draw_strategy(self, device: torch.device) -> Tensor:
        """0-d bool on the device, True for a positive-negative step.

        A tensor rather than a Python bool: reading a random draw on the host is what the step must not do, and
        both anchor masks are cheap (B x M booleans) next to the mixed forward pass, so torch.where picks one.
        The draw uses the device's generator, seeded by torch.manual_seed like the Beta samples.
        """
        if self.strategy == "random":
            return distributed.broadcast_(torch.rand((), device=device) < 0.5)
        return torch.full((), self.strategy == "positive_negative", device=device)

    @staticmethod
    def anchor_mask(labels: Tensor, first: Tensor, positive_negative: Tensor) -> Tensor:
        """(B, M) whether anchor a sees the mixture of pair m, before checking that the pair's labels differ."""
        anchors = torch.arange(labels.shape[0], device=labels.device)[:, None]
        is_first = anchors == first[None, :]
        same_class_as_first = labels[:, None] == labels[first][None, :]
        return torch.where(positive_negative, same_class_as_first & ~is_first, is_first)

    def hardest(self, embeddings: Tensor, first: Tensor, second: Tensor, mask: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """The max_pairs pairs with the most similar clean embeddings, among those some anchor sees.

        Unseen pairs (equal labels, or under positive-negative mixing an x_i without a positive) score -inf, so
        they are picked only when fewer than max_pairs pairs are usable, and keep their all-False mask column.
        """
        unit = F.normalize(embeddings.detach(), dim=1)
        score = (unit @ unit.T)[first, second].masked_fill(~mask.any(dim=0), float("-inf"))
        keep = score.topk(min(self.max_pairs, first.shape[0])).indices
        return first[keep], second[keep], mask[:, keep]

    def sample_lam(self, count: int, device: torch.device) -> Tensor:
        """(count,) float32 lam ~ Beta(alpha, alpha) on the device.

        validate_args=False: the argument checks would read tensor values on the host. torch.full fills on the
        device, where torch.tensor(alpha, device=...) would copy from the host.
        """
        alpha = torch.full((count,), self.alpha, device=device)
        return distributed.broadcast_(torch.distributions.Beta(alpha, alpha, validate_args=False).sample())

    def mix(self, model: nn.Module, images: Tensor, feature_map: Tensor, embeddings: Tensor, first: Tensor,
            second: Tensor, lam: Tensor) -> Tensor:
        """(M, D) embeddings of the mixtures; gradients flow into the clean examples they are made of.

        images and feature_map are this rank's, embeddings the global batch's (see the module docstring); the mixed
        embeddings come out in at least float32, as the losses need.
        """
        if self.mode == "embed":
            return interpolate(embeddings, first, second, lam)
        sizes = distributed.split_sizes(first.shape[0])
        share = distributed.shard(first.shape[0])
        first, second, lam = first[share], second[share], lam[share]
        if self.mode == "input":
            mixed = model.head(model.backbone(interpolate(distributed.gather(images), first, second, lam)))
        else:
            mixed = model.head(interpolate(distributed.gather_with_grad(feature_map), first, second, lam))
        return distributed.gather_with_grad(loss_precision(mixed), sizes)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, alpha={self.alpha}, strategy={self.strategy!r}, max_pairs={self.max_pairs}"
