"""The training driver both experiments share, read top to bottom in `fit`.

An experiment builds its model, its objective and its evaluation (a `Task`) and hands them to `fit`,
which evaluates before training, trains, evaluates every `eval_every` epochs and after the last one,
keeps the best epoch's weights, evaluates them with every final metric and saves them. The shared
configuration keys are defined once, in `training_config`, which both experiments add to their own.
"""

import copy
import functools
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from sacred.run import Run
from torch import nn
from torch.backends import cudnn
from torch.utils.data import DataLoader

from utils import sync_batchnorm
from utils.errors import InputError, check_choice
from utils.speed import Precision, batch_mover, prepare_model
from utils.training import (
    PlotFunction,
    build_optimizer,
    build_scheduler,
    format_metrics,
    parameter_groups,
    train_one_epoch,
)
from utils.visdom_logger import VisdomLogger

CUDNN_FLAGS = ("benchmark", "deterministic")


def training_config():
    """The configuration keys of the driver; an experiment's own config scope may change their defaults."""
    epochs = 30  # training epochs
    optimizer = "adam"  # sgd | adam | adamw
    lr = 1e-3  # learning rate
    momentum = 0.0  # sgd
    nesterov = False  # sgd with momentum
    weight_decay = 0.0
    no_bias_decay = True  # no weight decay on biases and normalisation parameters
    scheduler = "cos"  # warmcos | cos | step | warmstep | constant (warm*: 100 warm-up iterations)
    lr_step = None  # step, warmstep: epochs between learning-rate decays
    lr_gamma = 0.1  # step, warmstep: decay factor
    grad_clip = None  # clip gradients by value

    visdom_port = None  # live curves on the visdom server at this port of 127.0.0.1
    visdom_freq = 20  # iterations between two points of the training curves
    eval_every = 1  # epochs between evaluations (evaluation.metrics); the last epoch is always evaluated
    cpu = False  # train on the CPU even when a GPU is available
    cudnn_flag = "benchmark"  # benchmark | deterministic
    temp_dir = tempfile.gettempdir()  # where the best checkpoint is written
    seed = 0

    # Speed options (utils/speed.py), off by default: they change the numbers or help on GPUs only.
    amp = None  # None | bf16 | fp16 (with a gradient scaler): autocast the model; the losses stay in float32
    channels_last = False  # NHWC images and convolution weights (faster convolutions on tensor cores)
    compile = False  # torch.compile the model's parts (slow first steps, fused kernels afterwards)
    sync_bn = False  # under torchrun: BatchNorm in training mode uses the global batch's statistics


@dataclass
class Task:
    """What an experiment hands the driver.

    objective(model, images, labels) -> (loss, dict of detached scalars to log); it may own parameters
    (a classifier, proxies), which are trained with the model's: objective.parameter_groups(lr, no_bias_decay)
    gives their optimizer groups. evaluate(metrics) -> the metrics of the
    model's current weights. best_key picks the best epoch and is the run's result.
    """

    model: nn.Module
    objective: nn.Module
    evaluate: Callable[[Sequence[str]], dict[str, float]]
    best_key: str
    lower_is_better: bool = False
    name: str = "model"  # stem of the checkpoint's file name
    warmup_frozen: list[nn.Parameter] = field(default_factory=list)  # trained only after warm_epochs
    warm_epochs: int = 0
    plot_titles: dict[str, str] = field(default_factory=lambda: {"/R@1": "Recall@1"})


def select_device(cpu: bool, cudnn_flag: str) -> torch.device:
    check_choice("cudnn_flag", cudnn_flag, CUDNN_FLAGS)
    cudnn.deterministic = cudnn_flag == "deterministic"
    return torch.device("cuda:0" if torch.cuda.is_available() and not cpu else "cpu")


def fit(task: Task, train_loader: DataLoader, evaluation: tuple[list[str], list[str]], device: torch.device,
        config: dict, run: Run, device_augment: Callable | None = None) -> tuple[int, dict[str, float], str]:
    """Train task.model; returns the best epoch, the final metrics of its weights (now loaded in the model) and
    where they were saved.

    evaluation: the metrics of every evaluated epoch, and the final metrics of the best epoch's weights.
    device_augment: the photometric augmentation of the training batches on the device (dataset.gpu_augment).
    """
    epochs, eval_every, lr = config["epochs"], config["eval_every"], config["lr"]
    model, objective = task.model.to(device), task.objective.to(device)
    # Speed options (utils/speed.py) and BatchNorm over the global batch (utils/sync_batchnorm.py).
    if config["sync_bn"]:
        sync_batchnorm.convert(model)
    precision = Precision(config["amp"], device)
    prepare_model(model, config["channels_last"], config["compile"])
    move_images = batch_mover(device, config["channels_last"], device_augment)
    evaluate_after = evaluated_epochs(epochs, eval_every)
    plot = VisdomLogger(config["visdom_port"]) if config["visdom_port"] else None
    groups = parameter_groups(model, config["no_bias_decay"]) + objective.parameter_groups(lr, config["no_bias_decay"])
    optimizer = build_optimizer(groups, config["optimizer"], lr, config["momentum"], config["nesterov"],
                                config["weight_decay"])
    schedule = build_scheduler(optimizer, len(train_loader), epochs, config["scheduler"], config["lr_step"],
                               config["lr_gamma"])

    def evaluate_and_log(epoch: int) -> dict[str, float]:
        model.eval()
        metrics = task.evaluate(evaluation[0])
        log_evaluation(run, epoch, metrics, plot, task.plot_titles)
        return metrics

    best = BestEpoch(task.best_key, task.lower_is_better)
    best.update(0, evaluate_and_log(0), model)
    torch.manual_seed(config["seed"])
    for epoch in range(1, epochs + 1):
        for parameter in task.warmup_frozen:
            parameter.requires_grad_(epoch > task.warm_epochs)
        with cudnn_benchmark(config["cudnn_flag"]):
            history = train_one_epoch(model, objective, train_loader, optimizer, schedule, device, epoch,
                                      config["grad_clip"], config["visdom_freq"], plot, precision, move_images)
        log_training(run, epoch, history)
        if epoch in evaluate_after:
            best.update(epoch, evaluate_and_log(epoch), model)

    model.load_state_dict(best.state)
    model.eval()
    final = task.evaluate(evaluation[1])
    report_final(run, best.epoch, final)
    return best.epoch, final, save_checkpoint(run, best.state, config["temp_dir"], task.name)


@contextmanager
def cudnn_benchmark(cudnn_flag: str) -> Iterator[None]:
    """Let cuDNN tune its kernels for the fixed training batch shape only: evaluation's last batch is
    smaller and would trigger another search."""
    cudnn.benchmark = cudnn_flag == "benchmark"
    try:
        yield
    finally:
        cudnn.benchmark = False


def log_training(run: Run, epoch: int, history: dict[str, list[float]]) -> None:
    """Every iteration's logged values as train.<key>, at fractional epochs."""
    for key, values in history.items():
        for i, value in enumerate(values):
            run.log_scalar(f"train.{key}", value, epoch - 1 + i / len(values))


def log_evaluation(run: Run, epoch: int, metrics: dict[str, float], plot: PlotFunction | None,
                   plot_titles: dict[str, str]) -> None:
    """Print the metrics, log them as eval.<key> and plot those whose key ends with a suffix of plot_titles
    in that plot."""
    print(format_metrics(f"Epoch {epoch:3d}", metrics))
    for key, value in metrics.items():
        run.log_scalar(f"eval.{key}", value, epoch)
        title = next((title for suffix, title in plot_titles.items() if key.endswith(suffix)), None)
        if plot is not None and title is not None:
            plot(key, title, epoch, value)


def evaluated_epochs(epochs: int, eval_every: int) -> set[int]:
    """The epochs after which to evaluate: before training (0), every eval_every-th, and the last."""
    if eval_every < 1:
        raise InputError(f"eval_every={eval_every} must be a positive number of epochs between evaluations")
    return {0, *range(eval_every, epochs + 1, eval_every), epochs}


def report_final(run: Run, epoch: int, metrics: dict[str, float]) -> None:
    """Print the final evaluation of the best epoch's weights and keep it in the run's info."""
    print(format_metrics(f"Best  {epoch:3d}", metrics))
    run.info["best_epoch"] = epoch
    run.info["metrics"] = metrics


class BestEpoch:
    """The best epoch so far by one metric, its metrics and a copy of the model's weights then.
    Ties go to the later epoch."""

    def __init__(self, key: str, lower_is_better: bool = False) -> None:
        self.key = key
        self.lower_is_better = lower_is_better
        self.epoch: int | None = None
        self.metrics: dict[str, float] = {}
        self.state: dict[str, torch.Tensor] = {}

    def update(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> None:
        value, best = metrics[self.key], self.metrics.get(self.key)
        if best is None or (value <= best if self.lower_is_better else value >= best):
            self.epoch, self.metrics = epoch, metrics
            self.state = copy.deepcopy(model.state_dict())


def artifact_path(temp_dir: str, stem: str, suffix: str) -> str:
    """A file name in temp_dir that concurrent runs do not share: stem, time stamp and process id."""
    return os.path.join(temp_dir, f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}{suffix}")


def save_checkpoint(run: Run, state: dict[str, torch.Tensor], temp_dir: str, stem: str) -> str:
    """Save the weights (on the CPU) in temp_dir and attach them to the run as checkpoint.pt; returns the path."""
    checkpoint = artifact_path(temp_dir, stem, ".pt")
    torch.save({key: value.cpu() for key, value in state.items()}, checkpoint)
    run.add_artifact(checkpoint, name="checkpoint.pt")
    return checkpoint


def keep_output_on_failure(main: Callable) -> Callable:
    """Decorate a sacred main function that takes `_run`.

    Sacred 0.8 closes its capture of stdout/stderr before the last heartbeat of a failed run, so
    the observers lose everything printed since the previous beat (up to 10 s: often all the lines
    that led to the failure). Reading the output into the run while the capture is still open keeps it.
    """

    @functools.wraps(main)  # sacred reads the configuration parameters from main's signature
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except BaseException:
            kwargs["_run"]._get_captured_output()
            raise

    return wrapper
