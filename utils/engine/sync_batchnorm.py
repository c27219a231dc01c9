"""BatchNorm over the global batch under torchrun (the sync_bn option), on the CPU (gloo) as on GPUs (NCCL).

In training mode a BatchNorm layer normalises with the statistics of the batch it sees; under DDP that is the
rank's share, so the step differs from the single-process step of the global batch. GlobalBatchNorm sums the
per-channel count, sum and sum of squares over the ranks with utils.distributed.gather_with_grad, so the forward
uses the global statistics and the backward carries their gradient to every rank (with the gather's factor of
the world size, which DDP's averaging removes, as for the embeddings). torch.nn.SyncBatchNorm does the same on
GPUs only. Outside training, or in a single process, it is a plain BatchNorm.
"""

import torch
from torch import Tensor, nn

from utils import distributed


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d/3d whose training statistics are those of the global batch."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {input.dim()}-d")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or distributed.world_size() == 1:
            return super().forward(input)
        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.full_like(input[:1].sum(dims), input.numel() / input.shape[1])
        local = torch.stack([count, input.sum(dims), (input * input).sum(dims)])[None]
        count, total, squares = distributed.gather_with_grad(local).sum(0)
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0)  # rounding can take it below 0
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


def convert(module: nn.Module) -> nn.Module:
    """module with every BatchNorm layer replaced by a GlobalBatchNorm with its parameters, buffers and mode."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        converted.load_state_dict(module.state_dict())
        converted.requires_grad_(any(p.requires_grad for p in module.parameters()))
        converted.train(module.training)
        return converted.to(next(iter(module.state_dict().values()), torch.empty(0)).device)
    for name, child in module.named_children():
        module.add_module(name, convert(child))
    return module
