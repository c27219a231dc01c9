"""Mixing examples pairwise (Metrix), and pooling of mixed feature maps without materialising them.

Pairs (i, j) are mixed as lam * x_i + (1 - lam) * x_j, in one of two ways:

- on the grid, when one lam serves every pair (the paper's one draw per step) and the pairs cover at least a
  quarter of the B x B grid (all pairs, on one or two processes): x is scaled once by lam and once by 1 - lam and
  the two are broadcast-added over whole rows i of the grid; the pairs are then picked from it. No gather per
  pair, and the backward sums over the grid's axes instead of scattering every pair.
- pair by pair otherwise (a lam per pair, a cap on the pairs): each pair's x_i and x_j are gathered.

In feature mode Metrix mixes M = B (B - 1) pairs of feature maps and pools each mixture. Average pooling is
linear, so the average of a mixture is the mixture of the averages. Max pooling needs each mixed map, but only
for a moment: `GridMax` and `MixedMax` keep the pooled values only, and their backward mixes again (the same
values, bit for bit) to find the winning positions. Both compute a chunk of mixtures at a time, in torch on any
device: memory holds at most one chunk of mixed maps instead of M.
"""

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

# Mixed-map elements per chunk: 8 MiB in float32, enough to amortise the per-chunk overhead on a CPU or a GPU.
CHUNK_ELEMENTS = 2**21


def on_the_grid(lam: Tensor, first: Tensor, count: int) -> bool:
    """Whether to mix the pairs on the B x B grid: a shared (0-d) lam and pairs covering a quarter of the grid,
    where the grid's B^2 mixtures cost less than gathering the pairs. Decided from shapes, never from values."""
    return lam.dim() == 0 and 4 * first.shape[0] >= count * count


def grid_pairs(grid: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """(M, ...) the pairs' entries of a (B, B, ...) grid."""
    return grid.flatten(0, 1).index_select(0, first * grid.shape[0] + second)


def mixed_grid(x: Tensor, lam: Tensor) -> Tensor:
    """(B, B, ...): [i, j] = lam * x_i + (1 - lam) * x_j for a 0-d lam."""
    weight = lam.to(x.dtype)
    return (x * weight)[:, None] + (x * (1 - weight))[None]


def interpolate(x: Tensor, first: Tensor, second: Tensor, lam: Tensor) -> Tensor:
    """lam * x[first] + (1 - lam) * x[second], lam (M,) or 0-d broadcast over all but the first dimension.

    index_select rather than x[first]: its backward (index_add_) is faster on the CPU than that of indexing
    (index_put_ with accumulation).
    """
    if on_the_grid(lam, first, x.shape[0]):
        return grid_pairs(mixed_grid(x, lam), first, second)
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


def spread_to_winners(mixed: Tensor, pooled: Tensor, grad: Tensor, dim: int) -> Tensor:
    """In place: mixed, maxed over positions along dim into pooled, becomes the max's gradient grad at the
    winning positions and 0 elsewhere; positions that tie share it evenly, as with torch.amax.

    The winners are marked by a comparison straight into floats (into booleans, then floats, it runs several
    times slower on a CPU).
    """
    winners = torch.eq(mixed, pooled.unsqueeze(dim), out=mixed)
    return winners.mul_((grad / winners.sum(dim=dim)).unsqueeze(dim))


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
            spread = spread_to_winners(mix(maps, first[part], second[part], lam[part]), pooled[part], grad[part], 1)
            weight = lam[part].to(grad.dtype)[:, None, None]
            grad_maps.index_add_(0, first[part], spread * weight)
            grad_maps.index_add_(0, second[part], spread * (1 - weight))
        return grad_maps, None, None, None


class GridMax(torch.autograd.Function):
    """(B, P, C) maps and a 0-d lam -> (B, B, C): [i, j] is the max over positions of lam * x_i + (1 - lam) * x_j.

    The mixture is computed as the materialised maps are, lam * x_i + (1 - lam) * x_j, so values and ties are
    theirs bit for bit; a chunk of grid rows at a time.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, maps: Tensor, lam: Tensor) -> Tensor:
        weight = lam.to(maps.dtype)
        weighted_first, weighted_second = maps * weight, maps * (1 - weight)
        pooled = grid_max_in_chunks(weighted_first, weighted_second)
        ctx.save_for_backward(weighted_first, weighted_second, weight, pooled)
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        weighted_first, weighted_second, weight, pooled = ctx.saved_tensors
        grad_first, grad_second = grid_max_backward_in_chunks(weighted_first, weighted_second, pooled, grad)
        return grad_first * weight + grad_second * (1 - weight), None


def grid_max_in_chunks(first: Tensor, second: Tensor) -> Tensor:
    """(B, B, C): [i, j] = max over positions of first[i] + second[j]. Each chunk of grid rows is mixed into one
    reused buffer (a fresh allocation of that size per chunk costs page faults on a CPU) and maxed over positions."""
    count = first.shape[0]
    pooled = first.new_empty(count, count, first.shape[2])
    parts = chunks(count, first.numel())
    mixed = first.new_empty(parts[0].stop, *first.shape)
    for rows in parts:
        chunk = mixed[: len(range(count)[rows])]
        torch.add(first[rows, None], second[None], out=chunk)
        torch.amax(chunk, dim=2, out=pooled[rows])
    return pooled


def grid_max_backward_in_chunks(first: Tensor, second: Tensor, pooled: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients with respect to first and second (grid_max_in_chunks' operands): each chunk is mixed again
    and its winners marked, and the gradient summed over j for first and over i for second."""
    count = pooled.shape[0]
    grad_first, grad_second = torch.empty_like(first), torch.zeros_like(second)
    parts = chunks(count, first.numel())
    winners = first.new_empty(parts[0].stop, *first.shape)
    ones = first.new_ones(parts[0].stop, 1, count)
    for rows in parts:
        size = len(range(count)[rows])
        chunk = winners[:size]
        torch.add(first[rows, None], second[None], out=chunk)
        spread_to_winners(chunk, pooled[rows], grad[rows], 2)
        # The sums over j (a matrix product) and over the chunk's rows i (one slab at a time): on a CPU both run
        # about twice as fast as torch.sum over those dimensions.
        torch.bmm(ones[:size], chunk.view(size, count, -1), out=grad_first[rows].view(size, 1, -1))
        for row in chunk:
            grad_second += row
    return grad_first, grad_second


def mixed_pool(feature_map: Tensor, first: Tensor, second: Tensor, lam: Tensor, pooling: str) -> Tensor:
    """(M, C): the pooling (avg | max | avg+max, summed) of lam * feature_map[first] + (1 - lam) *
    feature_map[second], pair by pair, without materialising the M mixed maps.

    lam is (M,), one per pair, or 0-d, one for all. Values and gradients equal those of the materialised mixtures
    up to rounding, ties of the max included (they share the gradient evenly, as with torch.amax). lam is a
    sample, not a parameter: it gets no gradient.
    """
    if lam.requires_grad:
        raise ValueError("mixed_pool does not differentiate with respect to lam")
    # Positions before channels: the max then runs over whole rows of channels at once, which on a CPU is ~10x
    # faster than a max over each channel's few positions.
    maps = feature_map.flatten(2).transpose(1, 2).contiguous() if "max" in pooling else None
    if on_the_grid(lam, first, feature_map.shape[0]):
        grid = GridMax.apply(maps, lam) if "max" in pooling else None
        if "avg" in pooling:
            averages = mixed_grid(feature_map.mean(dim=(2, 3)), lam)
            # In place: the backward keeps the max grid but not this one, and a third B x B x C grid is memory.
            grid = averages if grid is None else averages.add_(grid)
        return grid_pairs(grid, first, second)
    pooled = []
    if "avg" in pooling:
        pooled.append(interpolate(feature_map.mean(dim=(2, 3)), first, second, lam))
    if "max" in pooling:
        pooled.append(MixedMax.apply(maps, first, second, lam.expand(first.shape)))
    return sum(pooled[1:], pooled[0])
