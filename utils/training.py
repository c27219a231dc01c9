"""Optimizer, schedule and training epoch shared by both experiments.

The loop knows nothing about the loss: `criterion(model, images, labels)` returns the loss and a
dict of detached scalars to log. It never synchronises host and device inside a step: logged
values stay on the device and are read once every `log_every` steps and once per epoch.
"""

import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import SGD, Adam, AdamW, Optimizer, lr_scheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import distributed
from utils.errors import InputError, check_choice
from utils.speed import Precision, batch_mover

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("warmcos", "cos", "step", "warmstep", "constant")
WARMUP_ITERATIONS = 100  # linear warm-up of the warm* schedules, as in the CE paper's code

# A logger receives (curve name, plot title, x, y) for live plots; see utils.visdom_logger.
PlotFunction = Callable[[str, str, float, float], None]


def progress(iterable: Iterable, desc: str) -> tqdm:
    """A progress bar that disappears when done, on the terminal only: sacred captures sys.stderr for its
    observers, and its file observer only appends to cout.txt, so a bar redrawing its line would leave
    fragments there. Under torchrun only rank 0 draws one."""
    return tqdm(iterable, desc=desc, ncols=100, leave=False, file=sys.__stderr__, disable=not distributed.is_main())


def parameter_groups(model: nn.Module, no_bias_decay: bool) -> list[dict]:
    """One group, or two when biases and normalisation parameters (1-d tensors) skip weight decay."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not no_bias_decay:
        return [{"params": parameters}]
    return [{"params": [p for p in parameters if p.dim() > 1]},
            {"params": [p for p in parameters if p.dim() <= 1], "weight_decay": 0.0}]


def build_optimizer(param_groups: list[dict], optimizer: str, lr: float, momentum: float, nesterov: bool,
                    weight_decay: float) -> Optimizer:
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if optimizer == "sgd":
        return SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                   nesterov=bool(nesterov and momentum))
    return (Adam if optimizer == "adam" else AdamW)(param_groups, lr=lr, weight_decay=weight_decay)


def build_scheduler(optimizer: Optimizer, iterations_per_epoch: int, epochs: int, scheduler: str,
                    lr_step: int | None, lr_gamma: float) -> lr_scheduler.LambdaLR:
    """A per-iteration learning-rate factor. lr_step is in epochs; lr_gamma is the step decay."""
    check_choice("scheduler", scheduler, SCHEDULERS)
    total = max(1, epochs * iterations_per_epoch)
    if scheduler in ("step", "warmstep") and not lr_step:
        raise InputError(f"scheduler={scheduler!r} needs lr_step (epochs between decays), e.g. lr_step=10")
    step_length = (lr_step or 1) * iterations_per_epoch

    def factor(i: int) -> float:
        warm = min(1.0, (i + 1) / WARMUP_ITERATIONS) if scheduler.startswith("warm") else 1.0
        if scheduler.endswith("cos"):
            return min(warm, (1 + math.cos(math.pi * i / total)) / 2)
        if scheduler.endswith("step"):
            return warm * lr_gamma ** (i // step_length)
        return 1.0

    return lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model: nn.Module, criterion: Callable, loader: DataLoader, optimizer: Optimizer,
                    scheduler: lr_scheduler.LRScheduler, device: torch.device, epoch: int,
                    grad_clip: float | None = None, log_every: int = 20,
                    plot: PlotFunction | None = None, precision: Precision | None = None,
                    move_images: Callable[[Any], torch.Tensor] | None = None) -> dict[str, list[float]]:
    """One pass over loader; returns every logged value of every iteration.

    precision: autocast and gradient scaling (utils.speed; default float32). move_images: the loader's images
    -> the model's input on the device (utils.speed.batch_mover; default a plain copy).
    """
    model.train()
    precision = precision or Precision(None, device)
    move_images = move_images or batch_mover(device, channels_last=False)
    history: dict[str, list[torch.Tensor]] = {}
    bar = progress(loader, f"Training   [{epoch:03d}]")
    for i, (images, labels) in enumerate(bar):
        images = move_images(images)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast():
            loss, logs = criterion(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        if grad_clip:
            precision.unscale_(optimizer)
            nn.utils.clip_grad_value_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
        precision.step(optimizer)
        scheduler.step()
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        if (i + 1) % log_every == 0:
            recent = {key: torch.stack(values[-log_every:]).mean().item() for key, values in history.items()}
            bar.set_postfix({key: f"{value:.3f}" for key, value in recent.items()})
            if plot is not None:
                for key, value in recent.items():
                    plot(key, "Training", epoch - 1 + (i + 1) / len(loader), value)  # epoch 1 spans (0, 1]
    return {key: torch.stack(values).tolist() for key, values in history.items()}


def format_metrics(label: str, metrics: dict[str, float]) -> str:
    """One line per distance, e.g. `Epoch   3 | cosine | R@1 0.6521 R@2 ...`; metrics without one under `all`."""
    rows: dict[str, list[str]] = {}
    for key, value in metrics.items():
        group, _, name = key.rpartition("/")
        rows.setdefault(group, []).append(f"{name} {value:.4f}")
    return "\n".join(f"{label} | {group or 'all':<6} | {' '.join(cells)}" for group, cells in rows.items())
