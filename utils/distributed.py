"""Data-parallel training under torchrun: the process group, gathers that keep autograd, a shared failure.

Single-process runs (no torchrun) see world_size() == 1 and every function here is then the identity or a
no-op, so the training code calls them unconditionally.

The gradient rule. With W ranks, each rank gathers its slice of the global batch's embeddings (or feature
maps) from every rank and computes the same global loss L. The backward of gather_with_grad sums the gradient
of the gathered tensor over the ranks and returns this rank's slice, i.e. W * dL/d(own slice) when every rank
computed the same L. DistributedDataParallel then averages the parameter gradients over the W ranks, which
divides the W back out: the step's gradient is the single-process gradient of L on the global batch. Summing
rather than taking the own rank's gradient only also keeps the rule right when the ranks' losses differ (e.g.
dropout masks): the step then has the gradient of their mean.
"""

import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from utils.errors import InputError, RunFailed

REPO = Path(__file__).resolve().parents[1]


def setup(cpu: bool = False, timeout_s: float = 1800.0) -> torch.device:
    """Join torchrun's process group (from RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and return this
    process's device: cuda:LOCAL_RANK with NCCL, or the CPU with gloo. Without torchrun: cuda:0 or the CPU.

    A collective that waits timeout_s seconds for another rank (stopped, hung, gone) fails: with gloo it raises
    an error that timeouts_in_one_line turns into one line; NCCL's watchdog ends the process."""
    use_cuda = torch.cuda.is_available() and not cpu
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return torch.device("cuda:0" if use_cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,
        )
    return device


@contextmanager
def timeouts_in_one_line() -> Iterator[None]:
    """Around a command: a collective that timed out (see setup) ends it with one line naming this rank and where
    it waited, instead of the backend's traceback."""
    try:
        yield
    except RuntimeError as error:
        # gloo says "Timed out waiting 10000ms for recv operation" or, in DDP's backward, "Application timeout
        # caused pair closure"
        if world_size() == 1 or not any(word in str(error).lower() for word in ("timed out", "timeout")):
            raise
        reason = str(error).strip().splitlines()[0].split("] ", 1)[-1]  # without gloo's source location
        raise RunFailed(
            f"rank {rank()} of {world_size()}: a collective in {waiting_in(error)} timed out ({reason}): another "
            f"rank is stopped, hung or gone; raise dist_timeout if a rank legitimately works that long alone"
        ) from None


def waiting_in(error: BaseException) -> str:
    """The innermost function of this repository in error's traceback, as `name (path:line)`."""
    ours = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if Path(frame.filename).resolve().is_relative_to(REPO) and ".venv" not in Path(frame.filename).parts
    ]
    if not ours:
        return "torch"
    frame = ours[-1]
    return f"{frame.name} ({Path(frame.filename).resolve().relative_to(REPO)}:{frame.lineno})"


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, the one process that writes (sacred run, checkpoints, visdom, progress bars)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def split_sizes(total: int, parts: int | None = None) -> list[int]:
    """How total rows split into contiguous shards, one per rank, the first ones one row longer when uneven.
    Every rank computes the same list, so gathers of uneven shards need no exchange of sizes."""
    parts = parts or world_size()
    return [total // parts + (r < total % parts) for r in range(parts)]


def shard(total: int) -> slice:
    """This rank's contiguous rows of total (see split_sizes)."""
    sizes = split_sizes(total)
    start = sum(sizes[: rank()])
    return slice(start, start + sizes[rank()])


def _all_gather(tensor: Tensor, sizes: Sequence[int]) -> Tensor:
    """Every rank's rows, concatenated in rank order; shards of unequal length travel padded to the longest."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int]) -> Tensor:
        ctx.sizes = sizes
        return _all_gather(tensor, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # the sum over ranks: see the module docstring
        start = sum(ctx.sizes[: rank()])
        return grad[start : start + ctx.sizes[rank()]], None


def gather_with_grad(tensor: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """Every rank's tensor concatenated along dim 0 in rank order, differentiable (see the module docstring).

    sizes: every rank's number of rows, when they differ (default: all equal to this rank's).
    """
    if world_size() == 1:
        return tensor
    sizes = list(sizes) if sizes is not None else [tensor.shape[0]] * world_size()
    return _GatherWithGrad.apply(tensor, sizes)


@torch.no_grad()
def gather(tensor: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """gather_with_grad without the gradient: labels, images, evaluation embeddings."""
    if world_size() == 1:
        return tensor
    return _all_gather(tensor, list(sizes) if sizes is not None else [tensor.shape[0]] * world_size())


def broadcast_(tensor: Tensor) -> Tensor:
    """Rank 0's values in tensor on every rank (in place): random draws every rank must share. tensor may be a
    view of any layout (Beta.sample returns a strided one): gloo writes a received tensor densely from its first
    element, over whatever its storage holds there, so a view travels through a dense copy and is written back."""
    if world_size() > 1:
        dense = tensor.contiguous()
        dist.broadcast(dense, src=0)
        if dense is not tensor:
            tensor.copy_(dense)
    return tensor


def share_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank, before an evaluation. DDP hands them out before
    each training forward, but each rank's forward then updates its own copy from its share of the batch: without
    this, each rank would embed its shard of the test set with other statistics than rank 0's checkpoint keeps."""
    for buffer in module.buffers():
        broadcast_(buffer)


def broadcast_object(value: object) -> object:
    """Rank 0's value (any picklable object) on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """Whether flag is true on any rank (every rank calls it): the ranks agree on when to stop."""
    if world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def raise_if_any(error: Exception | None) -> None:
    """A collective check: every rank calls it with its own error or None, and every rank raises the error of
    the lowest failed rank, its message prefixed with that rank, so all ranks end with the same one line
    instead of the healthy ones waiting in their next collective until the timeout."""
    if world_size() == 1:
        if error is not None:
            raise error
        return
    errors: list = [None] * world_size()
    dist.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)))
    failed = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
    if failed is not None:
        if error is not None and failed[0] == rank():
            raise error
        raise InputError(f"rank {failed[0]} failed: {failed[1][0]}: {failed[1][1]}")


def agreed_batches(batches: Iterable) -> Iterator:
    """batches, each yielded once every rank has loaded its own (every rank calls it, with as many batches).

    A rank whose batch fails to load (a corrupt image) raises its error, and the other ranks raise it too, named
    by rank (raise_if_any), instead of entering the step's collectives without it: there they would wait for a
    rank that is gone (a gloo traceback about a closed connection, or on NCCL a hang until the timeout). It
    costs one all-reduce of a flag per batch."""
    if world_size() == 1:
        yield from batches
        return
    iterator = iter(batches)
    while True:
        error = None
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as failure:  # any failure: the other ranks must hear of it, whatever it is
            error = failure
        if any_rank(error is not None):
            raise_if_any(error)
        yield batch


class TrainingStep(nn.Module):
    """The model and the objective as one module, so that DistributedDataParallel sees every trained parameter
    (the model's and the loss's: classifier, proxies) and its forward: the objective calls model.backbone and
    model.head directly, which DDP would not see if only the model were wrapped."""

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.objective(self.model, images, labels)


def data_parallel(
    model: nn.Module, objective: nn.Module, device: torch.device
) -> Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]:
    """The objective, called as train_one_epoch calls it, with DDP's gradient averaging when world_size() > 1.

    DDP fixes the set of trained parameters when it is built: build it again after changing which parameters
    require a gradient (warm-up epochs).
    """
    if world_size() == 1:
        return objective
    step = nn.parallel.DistributedDataParallel(
        TrainingStep(model, objective), device_ids=[device.index] if device.type == "cuda" else None
    )
    return lambda _model, images, labels: step(images, labels)


def check_batch(batch_size: int, images_per_class: int | None = None) -> int:
    """This rank's share of the global batch; the global batch must split evenly (and, for class-balanced
    batches, into whole classes)."""
    ranks = world_size()
    if batch_size % ranks:
        raise InputError(
            f"dataset.batch_size={batch_size} is the global batch and must split evenly over the "
            f"{ranks} processes: make it a multiple of {ranks}"
        )
    local = batch_size // ranks
    # In one process the class sampler's own check speaks (the batch must be a multiple of images_per_class).
    if ranks > 1 and images_per_class and local % images_per_class:
        raise InputError(
            f"dataset.batch_size={batch_size} over {ranks} processes gives {local} images per process, "
            f"not whole classes of dataset.images_per_class={images_per_class}: make the batch a "
            f"multiple of {ranks * images_per_class}"
        )
    return local
