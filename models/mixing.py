"""Mixing examples pairwise (Metrix), and max pooling of mixed feature maps without materialising them.

In feature mode Metrix mixes M = B (B - 1) pairs of feature maps and pools each mixture. Per pair and channel the
pooling needs one mixed row of H x W values: `mixed_pool` mixes and pools a chunk of pairs at a time, keeps only
the pooled values and the winning position of each (pair, channel), and its backward rebuilds the gradient from
them (average pooling is linear: its gradient spreads evenly). Memory holds one chunk of mixed maps instead of M.
"""

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

# Mixed-map elements per chunk: 16 MiB in float32, enough to amortise the per-chunk overhead on a CPU or a GPU.
CHUNK_ELEMENTS = 2**20


def interpolate(x: Tensor, first: Tensor, second: Tensor, lam: Tensor) -> Tensor:
    """lam * x[first] + (1 - lam) * x[second], lam broadcast over all but the first dimension.

    index_select rather than x[first]: its backward (index_add_) is faster on the CPU than that of indexing
    (index_put_ with accumulation).
    """
    weight = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return weight * x.index_select(0, first) + (1 - weight) * x.index_select(0, second)


def chunks(count: int, row_elements: int) -> list[slice]:
    """Slices of range(count) holding about CHUNK_ELEMENTS elements each (rows of row_elements); one empty slice
    when count is 0, so that an empty batch of pairs still has the right shapes."""
    size = max(1, CHUNK_ELEMENTS // max(row_elements, 1))
    return [slice(start, start + size) for start in range(0, max(count, 1), size)]


class MixedPool(torch.autograd.Function):
    """(B, C, P) feature maps flattened over positions -> (M, C) pooled mixtures of the pairs (see mixed_pool)."""

    @staticmethod
    def forward(ctx: FunctionCtx, flat: Tensor, first: Tensor, second: Tensor, lam: Tensor, pooling: str) -> Tensor:
        # Written chunk by chunk into preallocated outputs: concatenating the chunks costs a copy of each.
        pooled = flat.new_zeros(first.shape[0], flat.shape[1])
        positions = torch.empty(pooled.shape, dtype=position_dtype(flat.shape[2]), device=flat.device)
        weight = lam.to(flat.dtype)[:, None, None]
        for part in chunks(first.shape[0], flat[0].numel()):
            # One fused pass instead of interpolate's three: x_j + lam (x_i - x_j), equal up to rounding.
            mixed = torch.lerp(flat.index_select(0, second[part]), flat.index_select(0, first[part]), weight[part])
            if "avg" in pooling:
                pooled[part] = mixed.mean(dim=2)
            if "max" in pooling:
                value, position = mixed.max(dim=2)
                pooled[part] += value
                positions[part] = position
        ctx.save_for_backward(first, second, lam, positions)
        ctx.flat_shape, ctx.pooling = flat.shape, pooling
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        first, second, lam, positions = ctx.saved_tensors
        batch, channels, size = ctx.flat_shape
        weight = lam.to(grad.dtype)[:, None]
        sources = ((first, weight), (second, 1 - weight))
        grad_flat = grad.new_zeros(batch, channels, size)
        if "avg" in ctx.pooling:  # every position of a source's channel gets share * grad / P
            grad_avg = grad.new_zeros(batch, channels)
            for source, share in sources:
                grad_avg.index_add_(0, source, grad * share)
            grad_flat += grad_avg[:, :, None] / size
        if "max" in ctx.pooling:
            scatter_to_maxima(grad_flat, grad, sources, positions)
        return grad_flat, None, None, None, None


def position_dtype(size: int) -> torch.dtype:
    """The smallest integer type that holds a position among size: the positions are kept until the backward."""
    return torch.uint8 if size <= 256 else torch.int32


def scatter_to_maxima(grad_flat: Tensor, grad: Tensor, sources: tuple[tuple[Tensor, Tensor], ...],
                      positions: Tensor) -> None:
    """Add share * grad of every (pair, channel) to its winning position in each source's map, in chunks.

    grad_flat: (B, C, P), the gradient being built; grad: (M, C); sources: (example index, share) of both ends
    of each pair; positions: (M, C) the winning position of each (pair, channel).
    """
    channels, size = grad_flat.shape[1:]
    flat = grad_flat.view(-1)
    channel_offset = torch.arange(channels, device=grad.device) * size
    for part in chunks(grad.shape[0], channels):
        within = channel_offset + positions[part].long()  # (m, C) offsets inside one example's map
        for source, share in sources:
            index = source[part, None] * (channels * size) + within
            flat.index_add_(0, index.view(-1), (grad[part] * share[part]).view(-1))


def mixed_pool(feature_map: Tensor, first: Tensor, second: Tensor, lam: Tensor, pooling: str) -> Tensor:
    """(M, C): the pooling (avg | max | avg+max, summed) of lam * feature_map[first] + (1 - lam) *
    feature_map[second], pair by pair, a chunk of pairs at a time.

    The values equal those of the materialised mixtures. Only the winning position of each (pair, channel) is
    kept for the backward, which sends the max's gradient there, split between the two sources as lam and
    1 - lam, and the average's evenly over the positions: exactly the gradient through the materialised mixtures
    wherever the maximum is unique. On an exact tie this picks one of the tied positions where torch.amax splits
    the gradient evenly among them (both are subgradients of the max); after a ReLU the common tie is between
    zeros, whose gradient the ReLU's backward drops either way. lam is a sample, not a parameter: it gets no
    gradient.
    """
    if lam.requires_grad:
        raise ValueError("mixed_pool does not differentiate with respect to lam")
    return MixedPool.apply(feature_map.flatten(2), first, second, lam, pooling)
