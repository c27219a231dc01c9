"""Mixing examples pairwise (Metrix), and pooling of mixed feature maps without materialising them.

In feature mode Metrix mixes M = B (B - 1) pairs of feature maps and pools each mixture. Average pooling is
linear, so the average of a mixture is the mixture of the averages. Max pooling needs each mixed map, but only
for a moment: `MixedMax` mixes and pools a chunk of pairs at a time and keeps the pooled values only; its
backward mixes the chunk again (the same values, bit for bit) to find the winning positions. Memory holds one
chunk of mixed maps instead of M.
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


def mix(maps: Tensor, first: Tensor, second: Tensor, lam: Tensor) -> Tensor:
    """lam * maps[first] + (1 - lam) * maps[second] in one fused pass, maps[second] + lam (maps[first] -
    maps[second]): equal to interpolate's up to rounding, and deterministic, so that the backward can redo it."""
    return torch.lerp(maps.index_select(0, second), maps.index_select(0, first), lam.to(maps.dtype)[:, None, None])


class MixedMax(torch.autograd.Function):
    """(B, P, C) maps, positions before channels -> (M, C): the max over positions of each pair's mixture."""

    @staticmethod
    def forward(ctx: FunctionCtx, maps: Tensor, first: Tensor, second: Tensor, lam: Tensor) -> Tensor:
        # Written chunk by chunk into a preallocated output: concatenating the chunks costs a copy of each.
        pooled = maps.new_empty(first.shape[0], maps.shape[2])
        for part in chunks(first.shape[0], maps[0].numel()):
            pooled[part] = mix(maps, first[part], second[part], lam[part]).amax(dim=1)
        ctx.save_for_backward(maps, first, second, lam, pooled)
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        maps, first, second, lam, pooled = ctx.saved_tensors
        grad_maps = torch.zeros_like(maps)
        for part in chunks(first.shape[0], maps[0].numel()):
            # 1 where a position holds its channel's max, 0 elsewhere (mixed - max <= 0), in float arithmetic:
            # on a CPU comparisons that produce booleans run several times slower than this.
            winners = mix(maps, first[part], second[part], lam[part]).sub_(pooled[part, None, :]).sign_().add_(1)
            # torch.amax's rule: the positions that tie for the max share its gradient evenly.
            spread = winners.mul_((grad[part] / winners.sum(dim=1))[:, None, :])
            weight = lam[part].to(grad.dtype)[:, None, None]
            grad_maps.index_add_(0, first[part], spread * weight)
            grad_maps.index_add_(0, second[part], spread * (1 - weight))
        return grad_maps, None, None, None


def mixed_pool(feature_map: Tensor, first: Tensor, second: Tensor, lam: Tensor, pooling: str) -> Tensor:
    """(M, C): the pooling (avg | max | avg+max, summed) of lam * feature_map[first] + (1 - lam) *
    feature_map[second], pair by pair, without materialising the M mixed maps.

    Values and gradients equal those of the materialised mixtures up to rounding, ties of the max included (they
    share the gradient evenly, as with torch.amax). lam is a sample, not a parameter: it gets no gradient.
    """
    if lam.requires_grad:
        raise ValueError("mixed_pool does not differentiate with respect to lam")
    pooled = []
    if "avg" in pooling:
        pooled.append(interpolate(feature_map.mean(dim=(2, 3)), first, second, lam))
    if "max" in pooling:
        # Positions before channels: the max then runs over whole rows of channels at once, which on a CPU is
        # ~10x faster than a max over each channel's few positions.
        maps = feature_map.flatten(2).transpose(1, 2).contiguous()
        pooled.append(MixedMax.apply(maps, first, second, lam))
    return sum(pooled)
