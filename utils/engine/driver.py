"""The training driver both experiments share, read top to bottom in `fit`.

An experiment builds its model, its objective and its evaluation (a `Task`) and hands them to `fit`,
which evaluates before training, trains, evaluates every `eval_every` epochs and after the last one,
keeps the best epoch's weights and evaluates them with every final metric. A run is durable: a full
checkpoint (utils/engine/checkpoint.py) is written at the end of every epoch (and every `checkpoint_every`
iterations), `resume=PATH` continues one, SIGINT, SIGTERM and SIGHUP stop it cleanly after the current
step, and a non-finite loss stops it with the last good checkpoint kept. The shared configuration keys
are defined once, in `training_config`, which both experiments add to their own.
"""

import copy
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sacred.observers import FileStorageObserver
from sacred.run import Run
from torch import nn
from torch.backends import cudnn
from torch.utils.data import DataLoader

from utils import distributed
from utils.engine import sync_batchnorm
from utils.engine.checkpoint import (
    CHECKPOINT,
    FORMAT,
    check_resumable,
    checkpoint_bytes,
    load_checkpoint,
    prepare_directory,
    rng_state,
    save_checkpoint,
    save_json_atomically,
    set_rng_state,
)
from utils.engine.speed import Precision, batch_mover, prepare_model
from utils.engine.training import (
    NonFiniteStep,
    PlotFunction,
    build_optimizer,
    build_scheduler,
    format_metrics,
    parameter_groups,
    train_one_epoch,
)
from utils.errors import InputError, RunFailed, RunInterrupted, check_choice
from utils.reporting.plots import draw_curves
from utils.reporting.visdom_logger import VisdomLogger

CUDNN_FLAGS = ("benchmark", "deterministic")
NONFINITE = ("stop", "skip")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def training_config():
    # The driver's configuration keys; an experiment's own config scope may change their defaults.
    epochs = 30  # training epochs
    optimizer = "adam"  # sgd | adam | adamw
    lr = 1e-3  # learning rate
    momentum = 0.0  # sgd
    nesterov = False  # sgd with momentum
    weight_decay = 0.0  # L2 penalty (decoupled with adamw)
    no_bias_decay = True  # no weight decay on biases and normalisation parameters
    scheduler = "cos"  # warmcos | cos | step | warmstep | constant (warm*: 100 warm-up iterations)
    lr_step = None  # step, warmstep: epochs between learning-rate decays
    lr_gamma = 0.1  # step, warmstep: decay factor
    grad_clip = None  # clip gradients by value
    nonfinite = "stop"  # a non-finite loss or gradient: stop the run (the last checkpoint is kept) | skip the step

    visdom_port = None  # live curves on the visdom server at this port of 127.0.0.1
    visdom_freq = 20  # iterations between two points of the training curves
    eval_every = 1  # epochs between evaluations (evaluation.metrics); the last epoch is always evaluated
    cpu = False  # train on the CPU even when a GPU is available
    cudnn_flag = "benchmark"  # benchmark | deterministic
    output_dir = "outputs"  # without -F, each run writes its checkpoint in a new folder here (with -F: its run dir)
    checkpoint_every = None  # also write the checkpoint every this many iterations (long epochs); None: per epoch
    resume = None  # a -F run directory or a checkpoint file to continue (same settings; epochs may be raised)
    seed = 0

    # Speed options (utils/engine/speed.py), off by default: they change the numbers or help on GPUs only.
    amp = None  # None | bf16 | fp16 (with a gradient scaler): autocast the model; the losses stay in float32
    channels_last = False  # NHWC images and convolution weights (faster convolutions on tensor cores)
    compile = False  # torch.compile the model's parts (slow first steps, fused kernels afterwards)
    sync_bn = False  # under torchrun: BatchNorm in training mode uses the global batch's statistics

    # The evaluate and embed commands (after training).
    checkpoint = None  # evaluate, embed: a -F run directory or a checkpoint file whose best weights to use
    images = None  # embed: a folder of images, or a split file of `path,label` lines
    out = None  # embed: the .npz file to write (embeddings, paths, labels, skipped)
    bad_images = "stop"  # embed: an unreadable image stops the command | is skipped and listed


@dataclass
class Task:
    """What an experiment hands the driver.

    objective(model, images, labels) -> (loss, dict of detached scalars to log); it may own parameters
    (a classifier, proxies), which are trained with the model's: objective.parameter_groups(lr, no_bias_decay)
    gives their optimizer groups. evaluate(metrics) -> the metrics of the model's current weights. best_key
    picks the best epoch and is the run's result. rebuild holds what rebuilds the model without the data.
    """

    model: nn.Module
    objective: nn.Module
    evaluate: Callable[[Sequence[str]], dict[str, float]]
    best_key: str
    lower_is_better: bool = False
    name: str = "model"  # names the output folder without -F
    rebuild: dict = field(default_factory=dict)
    warmup_frozen: list[nn.Parameter] = field(default_factory=list)  # trained only after warm_epochs
    warm_epochs: int = 0
    plot_titles: dict[str, str] = field(default_factory=lambda: {"/R@1": "Recall@1"})
    after_epoch: Callable[[int], None] | None = None  # called after each epoch's training (e.g. for pictures)


@dataclass
class Outcome:
    """What a finished fit leaves."""

    best_epoch: int
    metrics: dict[str, float]  # the final evaluation of the best epoch's weights, now loaded in the model
    directory: Path  # where the checkpoint and the pictures are


def select_device(cpu: bool, cudnn_flag: str) -> torch.device:
    """This process's device; under torchrun it joins the process group (NCCL on GPUs, gloo on the CPU)."""
    check_choice("cudnn_flag", cudnn_flag, CUDNN_FLAGS)
    cudnn.deterministic = cudnn_flag == "deterministic"
    return distributed.setup(cpu)


def quiet_other_ranks(options: dict) -> None:
    """A sacred option hook: under torchrun only rank 0 observes the run (-F, other observers) and prints; the
    other ranks keep their errors (stderr)."""
    if int(os.environ.get("RANK", "0")) != 0:
        for option in [key for key in options if key.startswith("--") and options[key] and "storage" in key]:
            options[option] = None
        options["--loglevel"] = "ERROR"
        sys.stdout = open(os.devnull, "w")  # for the life of the process


def output_directory(run: Run, output_dir: str, name: str) -> Path:
    """The -F run directory, or a new folder in output_dir named after the task, the time and the process."""
    for observer in run.observers:
        if isinstance(observer, FileStorageObserver):
            return Path(observer.dir).resolve()
    return (Path(output_dir) / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}").resolve()


def fit(
    task: Task,
    train_loader: DataLoader,
    evaluation: tuple[list[str], list[str]],
    device: torch.device,
    config: dict,
    run: Run,
    device_augment: Callable | None = None,
) -> Outcome:
    """Train task.model. evaluation: the metrics of every evaluated epoch, and the final metrics of the best
    epoch's weights. device_augment: the photometric augmentation of the training batches on the device
    (dataset.gpu_augment). The settings' types and ranges were checked before (utils/settings.py).

    Under torchrun every rank runs this with its part of every global batch; only rank 0 writes (checkpoint,
    pictures, visdom), and the ranks agree on when to stop."""
    epochs, lr, no_bias_decay = config["epochs"], config["lr"], config["no_bias_decay"]
    evaluate_after = evaluated_epochs(epochs, config["eval_every"])
    checkpoint_every = config["checkpoint_every"]
    resumed = load_checkpoint(config["resume"]) if config["resume"] else None
    if resumed is not None:
        check_resumable(resumed["config"], plain(config), resumed["epoch"] - 1)
    model, objective = task.model.to(device), task.objective.to(device)
    # Speed options (utils/engine/speed.py) and BatchNorm over the global batch (utils/engine/sync_batchnorm.py).
    if config["sync_bn"]:
        sync_batchnorm.convert(model)
    precision = Precision(config["amp"], device)
    prepare_model(model, config["channels_last"], config["compile"])
    move_images = batch_mover(device, config["channels_last"], device_augment)
    groups = parameter_groups(model, no_bias_decay) + objective.parameter_groups(lr, no_bias_decay)
    optimizer = build_optimizer(
        groups, config["optimizer"], lr, config["momentum"], config["nesterov"], config["weight_decay"]
    )
    schedule = build_scheduler(
        optimizer, len(train_loader), epochs, config["scheduler"], config["lr_step"], config["lr_gamma"]
    )
    main = distributed.is_main()
    directory = distributed.broadcast_object(output_directory(run, config["output_dir"], task.name) if main else None)
    distributed.raise_if_any(
        capture(lambda: prepare_directory(directory, checkpoint_bytes(model, objective))) if main else None
    )
    path = directory / CHECKPOINT
    run.info["checkpoint"] = str(path)
    plot = VisdomLogger(config["visdom_port"]) if config["visdom_port"] and main else None
    best = BestEpoch(task.best_key, task.lower_is_better)
    curves: dict[str, dict[str, list]] = {}  # every logged series, in metrics.json's shape, for curves.png

    def evaluate_and_log(epoch: int) -> dict[str, float]:
        model.eval()
        metrics = task.evaluate(evaluation[0])
        log_evaluation(run, curves, epoch, metrics, plot, task.plot_titles)
        return metrics

    def write(epoch: int, iteration: int) -> None:
        """The checkpoint after `iteration` iterations of epoch (0: the epoch is complete), by rank 0."""
        distributed.raise_if_any(
            capture(
                lambda: save_checkpoint(
                    {
                        "format": FORMAT,
                        "epoch": epoch,
                        "iteration": iteration,
                        "iterations": schedule.last_epoch,
                        "model": model.state_dict(),
                        "objective": objective.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": schedule.state_dict(),
                        "scaler": precision.scaler.state_dict(),
                        "best": {"epoch": best.epoch, "metrics": best.metrics, "model": best.state},
                        "rng": rng_state(),
                        "config": plain(config),
                        "code": plain(run.experiment_info),
                        "rebuild": plain(task.rebuild),
                        "curves": curves,
                    },
                    path,
                )
            )
            if main
            else None
        )

    if resumed is None:
        best.update(0, evaluate_and_log(0), model)
        torch.manual_seed(config["seed"])
        start_epoch, start_iteration = 1, 0
    else:
        start_epoch, start_iteration = restore(resumed, model, objective, optimizer, schedule, best)
        precision.scaler.load_state_dict(resumed["scaler"])
        curves.update(resumed["curves"])
        print(f"Resumed from {config['resume']}: epoch {start_epoch}, iteration {start_iteration}")

    with stop_requests() as stop_signal:

        def after_step(iteration: int) -> bool:
            if checkpoint_every and schedule.last_epoch % checkpoint_every == 0:
                write(epoch, iteration)
            return distributed.any_rank(stop_signal() is not None)

        for epoch in range(start_epoch, epochs + 1):
            for parameter in task.warmup_frozen:
                parameter.requires_grad_(epoch > task.warm_epochs)
            if epoch == start_epoch or epoch == task.warm_epochs + 1:
                # DDP fixes the set of trained parameters when it is built: again once the warm-up ends.
                step_objective = distributed.data_parallel(model, objective, device)
            start, start_iteration = start_iteration, 0
            train_loader.batch_sampler.set_epoch(epoch, start)
            with cudnn_benchmark(config["cudnn_flag"]):
                try:
                    history, counters = train_one_epoch(
                        model,
                        step_objective,
                        train_loader,
                        optimizer,
                        schedule,
                        device,
                        epoch,
                        config["grad_clip"],
                        config["visdom_freq"],
                        plot,
                        start,
                        after_step,
                        config["nonfinite"] == "skip",
                        precision,
                        move_images,
                    )
                except NonFiniteStep as step:
                    raise RunFailed(nonfinite_message(epoch, step, path)) from None
            log_training(run, curves, epoch, history, counters)
            if counters["iterations"] < start + len(train_loader):
                write(epoch, counters["iterations"])
                raise RunInterrupted(
                    f"stopped by {stop_signal() or 'another rank'} at epoch {epoch}, iteration "
                    f"{counters['iterations']}; the checkpoint is {path}: continue with "
                    f"`resume={directory}`"
                )
            if task.after_epoch is not None:
                task.after_epoch(epoch)
            if epoch in evaluate_after:
                best.update(epoch, evaluate_and_log(epoch), model)
            write(epoch + 1, 0)
            if distributed.any_rank(stop_signal() is not None):
                raise RunInterrupted(
                    f"stopped by {stop_signal() or 'another rank'} after epoch {epoch}; the "
                    f"checkpoint is {path}: "
                    f"continue with `resume={directory}`"
                )

        # Still under stop_requests: a first signal now lets the final evaluation finish (a second stops at once),
        # where the default action would end the process without marking the run.
        model.load_state_dict(best.state)
        model.eval()
        final = task.evaluate(evaluation[1])
    report_final(run, best.epoch, final)
    if main:
        draw_curves(curves, directory / "curves.png", title=f"{task.name}: best epoch {best.epoch}")
    return Outcome(best.epoch, final, directory)


def capture(action: Callable[[], Any]) -> Exception | None:
    """The error action raised, or None: for distributed.raise_if_any, so that every rank fails with it."""
    try:
        action()
    except (InputError, RunFailed) as error:
        return error
    return None


def plain(value: Any) -> Any:
    """Sacred's read-only dicts and tuples as plain dicts and lists, which torch.load(weights_only=True) reads."""
    return json.loads(json.dumps(value))


def restore(
    checkpoint: dict,
    model: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    best: "BestEpoch",
) -> tuple[int, int]:
    """Load a checkpoint's state; returns the epoch and iteration to go on from."""
    model.load_state_dict(checkpoint["model"])
    objective.load_state_dict(checkpoint["objective"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    schedule.load_state_dict(checkpoint["scheduler"])
    best.epoch, best.metrics, best.state = (checkpoint["best"][key] for key in ("epoch", "metrics", "model"))
    set_rng_state(checkpoint["rng"])
    return checkpoint["epoch"], checkpoint["iteration"]


def nonfinite_message(epoch: int, step: NonFiniteStep, checkpoint: Path) -> str:
    terms = " ".join(f"{key}={value:.4g}" for key, value in step.logs.items())
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint.exists() else "no checkpoint was written yet"
    return (
        f"non-finite loss or gradient at epoch {epoch}, iteration {step.iteration + 1} ({terms}); {kept}: "
        f"lower lr or set grad_clip, then resume=..., or skip such steps with nonfinite=skip"
    )


@contextmanager
def stop_requests() -> Iterator[Callable[[], str | None]]:
    """While open, SIGINT, SIGTERM and SIGHUP ask the run to stop after the current step (a second one stops
    at once); yields a function returning the name of the first signal received, or None."""
    received: list[str] = []

    def request_stop(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)

    previous = {number: signal.signal(number, request_stop) for number in STOP_SIGNALS}
    try:
        yield lambda: received[0] if received else None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def cudnn_benchmark(cudnn_flag: str) -> Iterator[None]:
    """Let cuDNN tune its kernels for the fixed training batch shape only: evaluation's last batch is
    smaller and would trigger another search."""
    cudnn.benchmark = cudnn_flag == "benchmark"
    try:
        yield
    finally:
        cudnn.benchmark = False


def log_scalar(run: Run, curves: dict[str, dict[str, list]], name: str, value: float, step: float) -> None:
    """A point of a series, for sacred's observers and for the run's own curves."""
    run.log_scalar(name, value, step)
    series = curves.setdefault(name, {"steps": [], "values": []})
    series["steps"].append(step)
    series["values"].append(value)


def log_training(
    run: Run, curves: dict, epoch: int, history: dict[str, list[float]], counters: dict[str, float]
) -> None:
    """Every iteration's logged values as train.<key>, at fractional epochs, and one line for the epoch: the mean
    of each term, the steps skipped, and where the time went (waiting for data or in steps)."""
    for key, values in history.items():
        for i, value in enumerate(values):
            log_scalar(run, curves, f"train.{key}", value, epoch - 1 + (counters["start"] + i) / counters["total"])
    means = " ".join(f"{key} {sum(values) / len(values):.4f}" for key, values in history.items() if values)
    skipped = f", {counters['skipped']} non-finite steps skipped" if counters["skipped"] else ""
    print(
        f"Train {epoch:3d} | {means} | {counters['data_seconds']:.1f} s waiting for data, "
        f"{counters['step_seconds']:.1f} s in steps{skipped}"
    )


def log_evaluation(
    run: Run,
    curves: dict,
    epoch: int,
    metrics: dict[str, float],
    plot: PlotFunction | None,
    plot_titles: dict[str, str],
) -> None:
    """Print the metrics, log them as eval.<key> and plot those whose key ends with a suffix of plot_titles
    in that plot."""
    print(format_metrics(f"Epoch {epoch:3d}", metrics))
    for key, value in metrics.items():
        log_scalar(run, curves, f"eval.{key}", value, epoch)
        title = next((title for suffix, title in plot_titles.items() if key.endswith(suffix)), None)
        if plot is not None and title is not None:
            plot(key, title, epoch, value)


def evaluated_epochs(epochs: int, eval_every: int) -> set[int]:
    """The epochs after which to evaluate: before training (0), every eval_every-th, and the last (eval_every >= 1:
    the settings table)."""
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


def keep_run_records(main: Callable) -> Callable:
    """Decorate a sacred command that takes `_run`, so that its -F records survive a failure.

    - sacred's file observer rewrites run.json and metrics.json in place: on a full disk that truncates them.
      They are replaced whole instead (save_json_atomically), so a write that fails leaves the previous version.
    - Sacred 0.8 closes its capture of stdout/stderr before the last heartbeat of a failed run, so the observers
      lose everything printed since the previous beat (up to 10 s: often all the lines that led to the failure).
      Reading the output into the run while the capture is still open keeps it.
    """

    @functools.wraps(main)  # sacred reads the configuration parameters from main's signature
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for observer in kwargs["_run"].observers:
            if isinstance(observer, FileStorageObserver):
                observer.save_json = functools.partial(save_json_atomically, observer.dir)
        try:
            return main(*args, **kwargs)
        except BaseException:
            kwargs["_run"]._get_captured_output()
            raise

    return wrapper
