"""Mixing examples pairwise (Metrix), and max pooling of mixed feature maps without materialising them.

In feature mode Metrix mixes M = B (B - 1) pairs of feature maps and pools each mixture. Average pooling is
linear and commutes with mixing; max pooling does not, but per pair and channel it needs only the maximum of
one mixed row of H x W values. `mixed_max` computes those maxima a chunk of pairs at a time, keeps only the
winning position of each (pair, channel), and its backward sends the gradient there: memory holds one chunk of
mixed maps instead of M of them.
"""

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

# Mixed-map elements per chunk: 16 MiB in float32, enough to amortise the per-chunk overhead on a CPU or a GPU.
CHUNK_ELEMENTS = 2**22


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


class MixedMax(torch.autograd.Function):
    """(B, C, P) feature maps flattened over positions -> (M, C) max over P of the pairs' mixtures."""

    @staticmethod
    def forward(ctx: FunctionCtx, flat: Tensor, first: Tensor, second: Tensor, lam: Tensor) -> Tensor:
        maxima, positions = [], []
        for part in chunks(first.shape[0], flat[0].numel()):
            value, position = interpolate(flat, first[part], second[part], lam[part]).max(dim=2)
            maxima.append(value)
            positions.append(position.to(torch.int32))  # half the memory of int64; P < 2**31
        ctx.save_for_backward(first, second, lam, torch.cat(positions))
        ctx.flat_shape = flat.shape
        return torch.cat(maxima)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        first, second, lam, positions = ctx.saved_tensors
        batch, channels, size = ctx.flat_shape
        grad_flat = grad.new_zeros(batch * channels * size)
        channel_offset = torch.arange(channels, device=grad.device) * size
        weight = lam.to(grad.dtype)[:, None]
        for part in chunks(first.shape[0], channels):
            within = channel_offset + positions[part].long()  # (m, C) offsets inside one example's map
            for source, share in ((first[part], weight[part]), (second[part], 1 - weight[part])):
                index = source[:, None] * (channels * size) + within
                grad_flat.index_add_(0, index.view(-1), (grad[part] * share).view(-1))
        return grad_flat.view(batch, channels, size), None, None, None


def mixed_max(feature_map: Tensor, first: Tensor, second: Tensor, lam: Tensor) -> Tensor:
    """(M, C): amax over (H, W) of lam * feature_map[first] + (1 - lam) * feature_map[second], pair by pair.

    The values equal those of the materialised mixtures. The gradient goes to the winning position of each
    (pair, channel), split between the two sources as lam and 1 - lam: exactly the gradient through the
    materialised mixtures wherever the maximum is unique. On an exact tie this picks one of the tied positions
    where torch.amax splits the gradient evenly among them (both are subgradients of the max); after a ReLU the
    common tie is between zeros, whose gradient the ReLU's backward drops either way. lam is a sample, not a
    parameter: it gets no gradient.
    """
    if lam.requires_grad:
        raise ValueError("mixed_max does not differentiate with respect to lam")
    return MixedMax.apply(feature_map.flatten(2), first, second, lam)
