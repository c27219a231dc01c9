"""Small pieces the losses share: similarities, a weighted log-sum-exp, averages that never divide by zero.

Everything here is vectorised and keeps the data on the device: no host reads, no data-dependent branching.
"""

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from .candidates import Candidates


def cosine_similarity(x: Tensor, y: Tensor) -> Tensor:
    """(N, M) cosine similarity of the rows of x and y.

    Both are L2-normalised here, so a mixed embedding (whose norm is below 1) is compared by direction only.
    """
    return CosineSimilarity.apply(x, y)


# F.normalize's floor on a norm: a zero row stays zero instead of dividing by zero.
NORM_FLOOR = 1e-12


class CosineSimilarity(torch.autograd.Function):
    """F.normalize(x, dim=1) @ F.normalize(y, dim=1).T, with the same values and gradients, and a backward that
    takes three passes over each (rows, D) input where autograd's of F.normalize takes about eight: with Metrix's
    B (B - 1) candidates they are a good part of a loss's time."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, y: Tensor) -> Tensor:
        x_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(NORM_FLOOR)
        y_norm = torch.linalg.vector_norm(y, dim=1, keepdim=True).clamp_min_(NORM_FLOOR)
        x_unit, y_unit = x / x_norm, y / y_norm
        ctx.save_for_backward(x_unit, y_unit, x_norm, y_norm)
        return x_unit @ y_unit.T

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor]:
        x_unit, y_unit, x_norm, y_norm = ctx.saved_tensors
        return (
            unnormalize_gradient(grad @ y_unit, x_unit, x_norm),
            unnormalize_gradient(grad.T @ x_unit, y_unit, y_norm),
        )


def unnormalize_gradient(grad_unit: Tensor, unit: Tensor, norm: Tensor) -> Tensor:
    """The gradient of the rows x from that of x / max(|x|, floor): (g - u <g, u>) / |x|, in place; where the
    floor holds (a zero row) the norm is a constant and the gradient is g / floor."""
    along = torch.linalg.vecdot(grad_unit, unit, dim=1).unsqueeze(1).mul_(norm > NORM_FLOOR)
    return grad_unit.addcmul_(unit, along, value=-1).div_(norm)


def sphere_distance(x: Tensor, y: Tensor) -> Tensor:
    """(N, M) Euclidean distance between the L2-normalised rows of x and y: d = sqrt(2 - 2 cos)."""
    return SphereDistance.apply(cosine_similarity(x, y))


class SphereDistance(torch.autograd.Function):
    """cos -> d = sqrt(max(2 - 2 cos, 0)), with the subgradient 0 where d = 0 (a candidate equal to its anchor,
    e.g. anchor-negative mixing with lam = 1), where sqrt's slope is infinite and would turn a zero weight into NaN.

    One function rather than clamp, sqrt and two torch.where: it keeps only d for the backward, where those keep
    four more (N, M) tensors, and with Metrix's B (B - 1) candidates that is most of a step's extra memory.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, cos: Tensor) -> Tensor:
        distance = cos.mul(-2).add_(2).clamp_(min=0).sqrt_()
        ctx.save_for_backward(distance)
        return distance

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
        (distance,) = ctx.saved_tensors
        # d(d)/d(cos) = -1 / d; the division's inf and NaN at d = 0 are not selected.
        return torch.where(distance > 0, grad.neg().div_(distance), 0)


def log1p_sum_exp(x: Tensor, weights: Tensor, dim: int = -1) -> Tensor:
    """log(1 + sum_j w_j exp(x_j)) along dim, for non-negative weights (zeros allowed).

    Computed as logsumexp over [0, x_j + log w_j]: the 0 is the "1 +", and log 0 = -inf drops a term, so it
    never overflows and gives log(1) = 0 when every weight is zero. log w is built with a double where so that
    a zero weight has a finite gradient even if the weights require one.
    """
    present = weights > 0
    log_w = torch.where(present, torch.where(present, weights, 1).log(), float("-inf"))
    terms = x + log_w
    # Shaped from terms rather than sliced from it, so that an empty dim (no candidate) gives log(1) = 0 too.
    shape = list(terms.shape)
    shape[dim] = 1
    one = terms.new_zeros(shape)
    return torch.logsumexp(torch.cat([one, terms], dim=dim), dim=dim)


def mean_over(values: Tensor, counted: Tensor) -> Tensor:
    """Sum of values divided by how many entries are counted, 0 (not NaN) when none is.

    Entries that are not counted must hold 0 (or are zeroed here): they add nothing to the sum either.
    """
    total = torch.where(counted, values, 0).sum()
    return total / counted.sum().clamp_min(1)


def used_candidates(candidates: Candidates) -> Tensor:
    """(M,) bool: whether at least one anchor is compared with the candidate.

    A candidate no anchor sees (e.g. a mixture left over when the mixer caps its pairs) takes part in no loss,
    not even those that do not compare with anchors (cross-entropy, proxy-anchor). In a clean batch every
    example is used as soon as the batch holds two of them.
    """
    return candidates.anchor_mask.any(dim=0)
