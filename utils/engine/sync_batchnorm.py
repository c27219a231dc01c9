"""BatchNorm over the global batch under torchrun (the sync_bn option): torch.nn.SyncBatchNorm on GPUs (NCCL), ours
on the CPU (gloo), which SyncBatchNorm refuses.

In training mode a BatchNorm layer normalises with the statistics of the batch it sees; under DDP that is the
rank's share, so the step differs from the single-process step of the global batch. GlobalBatchNorm gathers each
rank's per-channel count, mean and sum of squared deviations from that mean (M2) with
utils.distributed.gather_with_grad and combines them with Chan et al.'s parallel formula, as stable in float32 as
the single process's variance (E[x^2] - mean^2 would lose the digits that the mean shares with x). The forward uses
the global statistics and the backward carries their gradient to every rank (with the gather's factor of the world
size, which DDP's averaging removes, as for the embeddings). Outside training, or in a single process, it is a
plain BatchNorm.
"""

import torch
from torch import Tensor, nn

from utils import distributed


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d/3d whose training statistics are those of the global batch."""

    pools_ranks = True  # its statistics cover every rank's batch (losses/metrix.py reads this)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {input.dim()}-d")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or distributed.world_size() == 1:
            return super().forward(input)
        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count, mean, var = global_statistics(input, dims)
        if self.track_running_stats:
            self.update_running_stats(mean.detach(), var.detach() * count / (count - 1).clamp_min(1))
        output = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output

    @torch.no_grad()
    def update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """As BatchNorm does: a momentum average (or with momentum=None the cumulative one) of the unbiased
        variance."""
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased_var, momentum)


def global_statistics(input: Tensor, dims: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel, the count, mean and (biased) variance of input over dims on every rank, differentiable: each
    rank's count n, mean m and M2 = sum (x - m)^2 are combined as N = sum n, mean = sum n m / N and
    M2 = sum M2 + sum n (m - mean)^2 (Chan et al.), where every term is a sum of non-negative squares."""
    local_mean = input.mean(dims)
    local_m2 = (input - local_mean.view(1, -1, *[1] * (input.dim() - 2))).square().sum(dims)
    count = torch.full_like(local_mean, input.numel() / input.shape[1])
    counts, means, m2s = distributed.gather_with_grad(torch.stack([count, local_mean, local_m2])[None]).unbind(1)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return total, mean, m2 / total


def convert(module: nn.Module) -> nn.Module:
    """module with every BatchNorm layer made to use the global batch's statistics, with its parameters, buffers
    and mode: torch.nn.SyncBatchNorm for a module on a GPU (the fused kernels NCCL runs), else GlobalBatchNorm."""
    state = next(iter(module.state_dict().values()), None)
    if state is not None and state.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_to_global(module)


def convert_to_global(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        converted.load_state_dict(module.state_dict())
        converted.requires_grad_(any(p.requires_grad for p in module.parameters()))
        converted.train(module.training)
        return converted.to(next(iter(module.state_dict().values()), torch.empty(0)).device)
    for name, child in module.named_children():
        module.add_module(name, convert_to_global(child))
    return module
