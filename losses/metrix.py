"""Metrix (Venkataramanan et al., ICLR 2022): mixed examples as extra candidates for the losses.

For an ordered pair (i, j) of batch examples with different labels, the mixture
v_ij = lam * x_i + (1 - lam) * x_j, lam ~ Beta(alpha, alpha) (one draw per step as in the paper, or per pair), is
a candidate with the interpolated label (class y_i with weight lam, class y_j with 1 - lam); x is the image, the
last backbone feature map or the embedding, by mode. Which clean anchors compare with v_ij depends on the strategy:

- positive_negative: the anchors a != i of class y_i. For them x_i is a positive and x_j a negative, so v_ij is a
  positive of weight lam_ij and a negative of weight 1 - lam_ij (Candidates.pair_weights gives exactly that).
- anchor_negative: the anchor i alone, mixed with its negative x_j; by default (as in the paper's code) only for an
  anchor without a positive in the batch, with anchor_negative="every_anchor" for every anchor.
- random: one of the two for the whole batch, drawn afresh at every call.

Everything is dense tensor work on the device with static shapes, so there is no host-device synchronisation
(no nonzero, no boolean indexing, no .item()): a pair a strategy cannot use stays a candidate with an all-False
anchor_mask column, which every loss ignores. Without a cap there are B (B - 1) candidates; in feature mode that
is B (B - 1) pooled mixtures, computed without materialising the mixed maps (models.mixing), in input mode
B (B - 1) images through the backbone. max_pairs=K keeps the K usable
pairs whose clean embeddings are most similar (the hardest negatives), which bounds time and memory by K.
Rules, decisions and measured cost: docs/metrix.md.

Under torchrun the embeddings and labels are the global batch's (gathered by Criterion), every rank builds the
same pairs (rank 0's random draws are broadcast), and in input and feature mode each rank runs the network on
its contiguous share of the pairs, made from the gathered images or feature maps; the mixed embeddings are
gathered back, so the losses see every mixture. docs/distributed.md states what that costs.
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.candidates import Candidates, loss_precision
from models.metric_model import BATCH_NORMS
from models.mixing import interpolate
from utils import distributed

MODES = ("input", "feature", "embed")
STRATEGIES = ("random", "positive_negative", "anchor_negative")
ANCHOR_NEGATIVE = ("no_positive", "every_anchor")  # which anchors anchor-negative mixing trains
LAMS = ("per_batch", "per_pair")  # one lam per step, or one per pair
SELECTIONS = ("all", "hardest_negative")  # which pairs are mixed (see Metrix.hardest_negative_pairs)


def ordered_pairs(batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(first, second): all B (B - 1) ordered pairs (i, j) with i != j, grouped by i, j increasing.

    Built from static index arithmetic: the k-th partner of i is k, shifted by one past i itself.
    """
    partners = max(batch_size - 1, 0)  # an empty batch has no pair either
    first = torch.arange(batch_size, device=device)[:, None].expand(batch_size, partners)
    offset = torch.arange(partners, device=device)[None, :].expand(batch_size, partners)
    second = offset + (offset >= first).long()
    return first.reshape(-1), second.reshape(-1)


def pools_ranks(layer: nn.Module) -> bool:
    """Whether a BatchNorm layer's statistics cover every rank's batch: torch's SyncBatchNorm, or a layer that says
    so (sync_bn's GlobalBatchNorm on the CPU); read by attribute, since losses know nothing of the engine."""
    return isinstance(layer, nn.SyncBatchNorm) or getattr(layer, "pools_ranks", False)


@contextlib.contextmanager
def running_statistics_when_few(head: nn.Module, share: int, total: int) -> Iterator[None]:
    """Inside, the head's training BatchNorm layers that would see fewer than two mixtures normalise them with their
    running statistics, as in evaluation, and leave those as they were: one example has no batch statistics
    ("Expected more than 1 value per channel when training"). A layer pooling every rank's statistics (sync_bn under
    torchrun) sees the total of the ranks' mixtures, so that all ranks agree on whether it gathers; any other sees
    this rank's share. The decision reads shapes only."""
    few = [
        layer
        for layer in head.modules()
        if isinstance(layer, BATCH_NORMS)
        and layer.training
        and (total if pools_ranks(layer) and distributed.world_size() > 1 else share) < 2
    ]
    for layer in few:
        layer.eval()
    try:
        yield
    finally:
        for layer in few:
            layer.train()


class Metrix(nn.Module):
    """The mixer `Criterion` calls: (model, images, feature_map, embeddings, labels) -> mixed Candidates.

    mode: input | feature | embed, where the examples are mixed (see the module docstring).
    alpha: lam ~ Beta(alpha, alpha).
    strategy: random | positive_negative | anchor_negative.
    max_pairs: keep at most this many pairs, hardest first; None keeps all B (B - 1).
    anchor_negative: no_positive (the paper: only anchors without a positive in the batch) | every_anchor.
    lam: per_batch (the paper: one draw per step) | per_pair (one draw per pair).
    selection: all (every ordered pair, or the max_pairs hardest) | hardest_negative (the released input mode:
    one mixture per anchor and positive, with the anchor's hardest negative, seen by that anchor alone).
    weight, anchor_negative_weight: the mixed loss's weight on positive-negative and anchor-negative steps
    (None: weight); it travels with the candidates as Candidates.weight.

    The mixed examples go through the model in its current mode: in training, the head's (and in input mode the
    backbone's) BatchNorm layers normalise them with their own batch statistics and update the running ones; a
    head's BatchNorm that would see a single mixture uses its running statistics instead (running_statistics_when_few).
    """

    def __init__(
        self,
        mode: str,
        alpha: float = 2.0,
        strategy: str = "random",
        max_pairs: int | None = None,
        anchor_negative: str = "no_positive",
        lam: str = "per_batch",
        weight: float = 0.4,
        anchor_negative_weight: float | None = None,
        selection: str = "all",
    ) -> None:
        super().__init__()
        # The messages name the options as the metrix ingredient spells them: they reach users as config errors.
        for key, value, choices in (
            ("mode", mode, MODES),
            ("strategy", strategy, STRATEGIES),
            ("anchor_negative", anchor_negative, ANCHOR_NEGATIVE),
            ("lam", lam, LAMS),
            ("selection", selection, SELECTIONS),
        ):
            if value not in choices:
                raise ValueError(f"unknown metrix.{key} {value!r}: choose one of {', '.join(choices)}")
        if alpha <= 0:
            raise ValueError(f"metrix.alpha={alpha} must be positive (lam ~ Beta(alpha, alpha))")
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"metrix.max_pairs={max_pairs} must be a positive number of pairs, or None for all")
        if max_pairs is not None and selection == "hardest_negative":
            raise ValueError(
                f"metrix.max_pairs={max_pairs} caps metrix.selection='all'; selection='hardest_negative' "
                f"mixes one pair per anchor and positive: set max_pairs=None or selection='all'"
            )
        anchor_negative_weight = weight if anchor_negative_weight is None else anchor_negative_weight
        for key, value in (("weight", weight), ("anchor_negative_weight", anchor_negative_weight)):
            if value < 0:
                raise ValueError(f"metrix.{key}={value} must not be negative")
        self.mode, self.alpha, self.strategy, self.max_pairs = mode, alpha, strategy, max_pairs
        self.anchor_negative, self.lam, self.selection = anchor_negative, lam, selection
        self.weight, self.anchor_negative_weight = weight, anchor_negative_weight

    def forward(
        self, model: nn.Module, images: Tensor, feature_map: Tensor, embeddings: Tensor, labels: Tensor
    ) -> Candidates:
        positive_negative = self.draw_strategy(labels.device)
        if self.selection == "hardest_negative":
            first, second, mask = self.hardest_negative_pairs(embeddings, labels, positive_negative)
        else:
            first, second = ordered_pairs(labels.shape[0], labels.device)
            mask = self.anchor_mask(labels, first, positive_negative) & (labels[first] != labels[second])
            if self.max_pairs is not None:
                first, second, mask = self.hardest(embeddings, first, second, mask)
        lam = self.sample_lam(first.shape[0], labels.device)
        mixed = self.mix(model, images, feature_map, embeddings, first, second, lam)
        # A 0-d tensor picked by the drawn strategy (no host read), made in the mixtures' dtype: a Python float times
        # a bool tensor would be rounded to float32.
        weights = [
            torch.full((), w, dtype=mixed.dtype, device=mixed.device)
            for w in (self.weight, self.anchor_negative_weight)
        ]
        weight = torch.where(positive_negative, *weights)
        return Candidates(mixed, labels[first], labels[second], lam.to(mixed.dtype), mask, weight)

    def draw_strategy(self, device: torch.device) -> Tensor:
        """0-d bool on the device, True for a positive-negative step.

        A tensor rather than a Python bool: reading a random draw on the host is what the step must not do, and
        both anchor masks are cheap (B x M booleans) next to the mixed forward pass, so torch.where picks one.
        The draw uses the device's generator, seeded by torch.manual_seed like the Beta samples.
        """
        if self.strategy == "random":
            return distributed.broadcast_(torch.rand((), device=device) < 0.5)
        return torch.full((), self.strategy == "positive_negative", device=device)

    def anchor_mask(self, labels: Tensor, first: Tensor, positive_negative: Tensor) -> Tensor:
        """(B, M) whether anchor a sees the mixture of pair m, before checking that the pair's labels differ.

        Positive-negative: every anchor of class y_i but i itself (all of x_i's fellow positives, where the
        released code pairs an anchor's first positive only). Anchor-negative: a == i, for every anchor or, as in
        the paper, only for an anchor without a positive in the batch.
        """
        anchors = torch.arange(labels.shape[0], device=labels.device)[:, None]
        is_first = anchors == first[None, :]
        same_class_as_first = labels[:, None] == labels[first][None, :]
        anchor_negative = is_first
        if self.anchor_negative == "no_positive":
            has_positive = (labels[:, None] == labels[None, :]).sum(dim=1) > 1
            anchor_negative = is_first & ~has_positive[:, None]
        return torch.where(positive_negative, same_class_as_first & ~is_first, anchor_negative)

    def hardest(self, embeddings: Tensor, first: Tensor, second: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The max_pairs pairs with the most similar clean embeddings, among those some anchor sees.

        Unseen pairs (equal labels, or under positive-negative mixing an x_i without a positive) score -inf, so
        they are picked only when fewer than max_pairs pairs are usable, and keep their all-False mask column.
        """
        unit = F.normalize(embeddings.detach(), dim=1)
        score = (unit @ unit.T)[first, second].masked_fill(~mask.any(dim=0), float("-inf"))
        keep = score.topk(min(self.max_pairs, first.shape[0])).indices
        return first[keep], second[keep], mask[:, keep]

    def hardest_negative_pairs(
        self, embeddings: Tensor, labels: Tensor, positive_negative: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The released code's input mode: for each anchor a, its hardest negative n (the most similar clean
        embedding of another class); on a positive-negative step one pair (p, n) for each positive p of a, on an
        anchor-negative step the pair (a, n) for each anchor the anchor_negative rule trains; a pair's mixture is
        seen by its anchor alone. Anchors without a negative get no pair.

        How many pairs there are depends on the labels, so this is the one selection that reads a count on the
        host (nonzero): one synchronisation per step, as in the released code.
        """
        count = labels.shape[0]
        same = labels[:, None] == labels[None, :]
        itself = torch.eye(count, dtype=torch.bool, device=labels.device)
        unit = F.normalize(embeddings.detach(), dim=1)
        negative = (unit @ unit.T).masked_fill(same, float("-inf")).argmax(dim=1)
        has_negative, has_positive = (~same).any(dim=1), (same & ~itself).any(dim=1)
        trained = has_negative & ~has_positive if self.anchor_negative == "no_positive" else has_negative
        # slots[a, k]: anchor a mixes x_k with its hardest negative (k a positive of a, or a itself).
        slots = torch.where(positive_negative, same & ~itself & has_negative[:, None], itself & trained[:, None])
        anchor, first = slots.nonzero(as_tuple=True)
        mask = torch.arange(count, device=labels.device)[:, None] == anchor[None, :]
        return first, negative[anchor], mask

    def sample_lam(self, count: int, device: torch.device) -> Tensor:
        """(count,) float32 lam ~ Beta(alpha, alpha) on the device: one draw for all or one per pair.

        validate_args=False: the argument checks would read tensor values on the host. torch.full fills on the
        device, where torch.tensor(alpha, device=...) would copy from the host; float32 whatever alpha's Python type
        (an integer alpha would make an integer tensor, which the sampler refuses).
        """
        alpha = torch.full((count if self.lam == "per_pair" else 1,), self.alpha, dtype=torch.float32, device=device)
        lam = torch.distributions.Beta(alpha, alpha, validate_args=False).sample()
        return distributed.broadcast_(lam).expand(count)

    def mix(
        self,
        model: nn.Module,
        images: Tensor,
        feature_map: Tensor,
        embeddings: Tensor,
        first: Tensor,
        second: Tensor,
        lam: Tensor,
    ) -> Tensor:
        """(M, D) embeddings of the mixtures; gradients flow into the clean examples they are made of.

        images and feature_map are this rank's, embeddings the global batch's (see the module docstring); the mixed
        embeddings come out in at least float32, as the losses need.
        """
        # One lam shared by every pair (0-d) lets models.mixing mix on the B x B grid rather than pair by pair.
        if self.lam == "per_batch" and first.shape[0] > 0:
            lam = lam[0]
        if self.mode == "embed":
            return interpolate(embeddings, first, second, lam)
        total = first.shape[0]
        sizes = distributed.split_sizes(total)
        share = distributed.shard(total)
        first, second, lam = first[share], second[share], lam if lam.dim() == 0 else lam[share]
        with running_statistics_when_few(model.head, first.shape[0], total):
            if self.mode == "input":
                mixed = model.head(model.backbone(interpolate(distributed.gather(images), first, second, lam)))
            else:
                mixed = model.head.embed(
                    model.head.pool_mixtures(distributed.gather_with_grad(feature_map), first, second, lam)
                )
        return distributed.gather_with_grad(loss_precision(mixed), sizes)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, alpha={self.alpha}, strategy={self.strategy!r}, max_pairs={self.max_pairs}, "
            f"anchor_negative={self.anchor_negative!r}, lam={self.lam!r}, weight={self.weight}, "
            f"anchor_negative_weight={self.anchor_negative_weight}, selection={self.selection!r}"
        )
