"""Optimizer, schedule and training epoch shared by both experiments.

The loop knows nothing about the loss: `criterion(model, images, labels)` returns the loss and a
dict of detached scalars to log. It never synchronises host and device inside a step: logged
values stay on the device and are read once every `log_every` steps and once per epoch.
"""

import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import SGD, Adam, AdamW, Optimizer, lr_scheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import distributed
from utils.engine.speed import Precision, batch_mover
from utils.errors import InputError, check_choice

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("warmcos", "cos", "step", "warmstep", "constant")

# A live-curve callback receives (series name, value, fractional epoch); see utils.engine.loggers.
ProgressFunction = Callable[[str, float, float], None]


# Without a terminal (a SLURM log, a pipe) every redraw of a bar would stay in the log: a line at most this often
# instead, and none for a shorter loop (TQDM_MININTERVAL sets another interval).
LOG_INTERVAL_S = 60.0


class LineWriter:
    """tqdm's stream without a terminal: each redraw becomes a line of its own, and the blank redraw that erases
    a finished bar is dropped."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable, desc: str, **options) -> tqdm:
    """A progress bar as wide as the terminal that disappears when done; without a terminal, a line a minute
    instead (LOG_INTERVAL_S). Written to the process's own stderr only: sacred captures sys.stderr for its
    observers, and its file observer only appends to cout.txt, so a bar redrawing its line would leave fragments
    there. Under torchrun only rank 0 draws one; tqdm's TQDM_* variables apply (TQDM_DISABLE=1: no bar)."""
    stream = sys.__stderr__
    if not distributed.is_main():
        options["disable"] = True
    elif not stream.isatty():
        interval = float(os.environ.get("TQDM_MININTERVAL", LOG_INTERVAL_S))
        options.update(mininterval=interval, delay=interval)
        stream = LineWriter(stream)
    return tqdm(iterable, desc=desc, dynamic_ncols=True, leave=False, file=stream, **options)


def decay_groups(parameters: Iterable[nn.Parameter], no_bias_decay: bool) -> list[dict]:
    """One group of the trained parameters, or two when biases and normalisation parameters (1-d tensors) skip
    weight decay."""
    parameters = [p for p in parameters if p.requires_grad]
    if not no_bias_decay:
        return [{"params": parameters}]
    return [
        {"params": [p for p in parameters if p.dim() > 1]},
        {"params": [p for p in parameters if p.dim() <= 1], "weight_decay": 0.0},
    ]


def optimizer_groups(
    model: nn.Module, objective_groups: list[dict], lr: float, no_bias_decay: bool, layer_decay: float = 1.0
) -> list[dict]:
    """The model's groups, then the objective's own parameters (a classifier, proxies: objective_groups, each with
    its "params" and an optional "lr_multiplier"), each split for no_bias_decay, at lr times its multiplier.

    layer_decay < 1: layer-wise learning-rate decay (BEiT's, as timm's param_groups_layer_decay): a backbone
    parameter at depth d of model.backbone.parameter_depths() trains at lr * layer_decay ** (deepest - d), so the
    last blocks move most and the embeddings least; the head and the objective's parameters train at lr."""
    if layer_decay == 1.0:
        groups = decay_groups(model.parameters(), no_bias_decay)
    else:
        groups = layer_decay_groups(model, lr, no_bias_decay, layer_decay)
    for objective_group in objective_groups:
        group_lr = {"lr": lr * objective_group.get("lr_multiplier", 1.0)}
        groups += [
            group | group_lr for group in decay_groups(objective_group["params"], no_bias_decay) if group["params"]
        ]
    return groups


def layer_decay_groups(model: nn.Module, lr: float, no_bias_decay: bool, layer_decay: float) -> list[dict]:
    """The model's parameters by backbone depth (then the rest of the model at lr), each depth split for
    no_bias_decay."""
    backbone = getattr(model, "backbone", model)
    parameter_depths = getattr(backbone, "parameter_depths", None)
    if parameter_depths is None:
        raise InputError(
            f"layer_decay={layer_decay} needs a backbone with block depths (every model.arch has them); "
            f"{type(backbone).__name__} has none: set layer_decay=1.0"
        )
    depths = parameter_depths()
    deepest = max(depths.values())
    by_depth: dict[int, list[nn.Parameter]] = {}
    for name, parameter in backbone.named_parameters():
        by_depth.setdefault(depths[name], []).append(parameter)
    in_backbone = {id(p) for p in backbone.parameters()}
    by_depth.setdefault(deepest, []).extend(p for p in model.parameters() if id(p) not in in_backbone)
    return [
        group | {"lr": lr * layer_decay ** (deepest - depth)}
        for depth, parameters in sorted(by_depth.items())
        for group in decay_groups(parameters, no_bias_decay)
        if group["params"]
    ]


def finite_weights(*modules: nn.Module) -> bool:
    """Whether every parameter and floating-point buffer of modules is finite (one read on the host)."""
    tensors = [t for module in modules for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def build_optimizer(
    param_groups: list[dict], optimizer: str, lr: float, momentum: float, nesterov: bool, weight_decay: float
) -> Optimizer:
    check_choice("optimizer", optimizer, OPTIMIZERS)
    if optimizer == "sgd":
        return SGD(
            param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=bool(nesterov and momentum)
        )
    return (Adam if optimizer == "adam" else AdamW)(param_groups, lr=lr, weight_decay=weight_decay)


def build_scheduler(
    optimizer: Optimizer,
    iterations_per_epoch: int,
    epochs: int,
    scheduler: str,
    lr_step: int | None,
    lr_gamma: float,
    warmup_iterations: int = 100,
) -> lr_scheduler.LambdaLR:
    """A per-iteration learning-rate factor of every group's lr. lr_step is in epochs; lr_gamma is the step decay;
    the warm* schedules rise linearly over their first warmup_iterations."""
    check_choice("scheduler", scheduler, SCHEDULERS)
    total = max(1, epochs * iterations_per_epoch)
    if scheduler in ("step", "warmstep") and not lr_step:
        raise InputError(f"scheduler={scheduler!r} needs lr_step (epochs between decays), e.g. lr_step=10")
    step_length = (lr_step or 1) * iterations_per_epoch

    def factor(i: int) -> float:
        warm = min(1.0, (i + 1) / warmup_iterations) if scheduler.startswith("warm") else 1.0
        if scheduler.endswith("cos"):
            return min(warm, (1 + math.cos(math.pi * i / total)) / 2)
        if scheduler.endswith("step"):
            return warm * lr_gamma ** (i // step_length)
        return 1.0

    return lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteStep(Exception):
    """A step whose loss or gradient is not finite: its iteration (from 0 within the epoch) and loss terms."""

    def __init__(self, iteration: int, logs: dict[str, torch.Tensor]) -> None:
        super().__init__(iteration)
        self.iteration = iteration
        self.logs = {key: value.item() for key, value in logs.items()}


def all_finite(loss: torch.Tensor, parameters: list[torch.Tensor]) -> bool:
    """Whether the loss and every gradient are finite (one read on the host per step, before the update)."""
    gradients = [p.grad for p in parameters if p.grad is not None]
    norm = nn.utils.get_total_norm(gradients, error_if_nonfinite=False) if gradients else loss.new_zeros(())
    return bool(torch.isfinite(loss) & torch.isfinite(norm))


def train_one_epoch(
    model: nn.Module,
    objective: Callable,
    loader: DataLoader,
    optimizer: Optimizer,
    scheduler: lr_scheduler.LRScheduler,
    device: torch.device,
    epoch: int,
    *,
    grad_clip: float | None = None,
    grad_clip_norm: float | None = None,
    log_every: int = 20,
    on_progress: ProgressFunction | None = None,
    start: int = 0,
    after_step: Callable[[int], bool] | None = None,
    skip_nonfinite: bool = False,
    precision: Precision | None = None,
    move_images: Callable[[Any], torch.Tensor] | None = None,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """One pass over loader, whose first `start` batches of the epoch were done before (a resumed epoch).

    Returns every logged value of every iteration, and the epoch's counters: its first iteration here, its
    length, the iterations done in all, the steps skipped for a non-finite loss or gradient, and the seconds
    spent waiting for data and in steps. after_step(i) is called with the number of iterations done so far;
    True stops the epoch there. A non-finite step raises NonFiniteStep before the update, or with
    skip_nonfinite is skipped and counted. precision: autocast and gradient scaling (utils.engine.speed; default
    float32), under which an fp16 gradient overflow is the scaler's to handle (only the loss is checked).
    grad_clip clips each gradient entry to [-grad_clip, grad_clip]; grad_clip_norm then scales the gradients down
    to a total L2 norm of at most grad_clip_norm.
    move_images: the loader's images -> the model's input on the device (utils.engine.speed.batch_mover).
    """
    precision = precision or Precision(None, device)
    move_images = move_images or batch_mover(device, channels_last=False)
    model.train()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    history: dict[str, list[torch.Tensor]] = {}
    total = start + len(loader)
    counters = {
        "start": start,
        "total": total,
        "iterations": start,
        "skipped": 0,
        "data_seconds": 0.0,
        "step_seconds": 0.0,
    }
    bar = progress(distributed.agreed_batches(loader), f"Training   [{epoch:03d}]", initial=start, total=total)
    ready = time.perf_counter()
    for i, (images, labels) in enumerate(bar, start=start):
        loaded = time.perf_counter()
        images = move_images(images)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast():
            loss, logs = objective(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        if all_finite(loss, [] if precision.scaler.is_enabled() else parameters):
            if grad_clip or grad_clip_norm:
                precision.unscale_(optimizer)
            if grad_clip:
                nn.utils.clip_grad_value_(parameters, grad_clip)
            if grad_clip_norm:
                nn.utils.clip_grad_norm_(parameters, grad_clip_norm)
            precision.step(optimizer)
            for key, value in logs.items():
                history.setdefault(key, []).append(value)
        elif skip_nonfinite:
            counters["skipped"] += 1
        else:
            raise NonFiniteStep(i, logs)
        scheduler.step()
        counters["iterations"] = i + 1
        done = time.perf_counter()
        counters["data_seconds"] += loaded - ready
        counters["step_seconds"] += done - loaded
        ready = done
        if (i + 1) % log_every == 0 and history:
            recent = {key: torch.stack(values[-log_every:]).mean().item() for key, values in history.items()}
            bar.set_postfix(
                {
                    **{key: f"{value:.3f}" for key, value in recent.items()},
                    "data": f"{counters['data_seconds'] / (i + 1 - start):.3f}s",
                    "step": f"{counters['step_seconds'] / (i + 1 - start):.3f}s",
                }
            )
            if on_progress is not None:
                for key, value in recent.items():
                    on_progress(key, value, epoch - 1 + (i + 1) / total)  # epoch 1 spans (0, 1]
        if after_step is not None and after_step(i + 1):
            break
    return {key: torch.stack(values).tolist() for key, values in history.items()}, counters


def format_metrics(label: str, metrics: dict[str, float]) -> str:
    """One line per distance, e.g. `Epoch   3 | cosine | R@1 0.6521 R@2 ...`; metrics without one under `all`."""
    rows: dict[str, list[str]] = {}
    for key, value in metrics.items():
        group, _, name = key.rpartition("/")
        rows.setdefault(group, []).append(f"{name} {value:.4f}")
    return "\n".join(f"{label} | {group or 'all':<6} | {' '.join(cells)}" for group, cells in rows.items())
