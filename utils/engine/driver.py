"""The training driver both experiments share, read top to bottom in `fit`.

An experiment builds its model, its objective and its evaluation (a `Task`), its typed configuration
(utils/engine/config.py) and its loggers (utils/engine/loggers.py), and hands them to `fit`, which evaluates
before training, trains, evaluates every `eval_every` epochs and after the last one (or stops early, after
`patience` evaluations without a new best), keeps the best epoch's weights and evaluates them with every final
metric. Which images each evaluation scores is the task's business (evaluation.protocol): the driver only knows
the per-epoch evaluation, the final one and the name of the per-epoch series. A run is durable: a full checkpoint
(utils/engine/checkpoint.py) is written at the end of every epoch (and every `checkpoint_every` iterations), from
finite weights only; `resume=PATH` continues one, SIGINT, SIGTERM and SIGHUP stop it cleanly after the current
step, and a non-finite loss or weight stops it with the last good checkpoint kept.
"""

import copy
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.backends import cudnn
from torch.utils.data import DataLoader

from utils import distributed
from utils.engine import sync_batchnorm
from utils.engine.checkpoint import (
    CHECKPOINT,
    best_epoch,
    changed_sources,
    check_resumable,
    checkpoint_bytes,
    load_checkpoint,
    prepare_directory,
    restore_training,
    save_checkpoint,
    saved_curves,
    stale_evaluations,
    training_checkpoint,
)
from utils.engine.config import CUDNN_FLAGS, TrainingConfig
from utils.engine.loggers import RunLogger
from utils.engine.speed import Precision, batch_mover, prepare_model
from utils.engine.training import (
    NonFiniteStep,
    build_optimizer,
    build_scheduler,
    finite_weights,
    format_metrics,
    optimizer_groups,
    train_one_epoch,
)
from utils.errors import InputError, RunFailed, RunInterrupted, check_choice

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
BASELINE_PREFIX = "backbone."  # the baseline's series: backbone.<metric> at epoch 0


@dataclass
class Task:
    """What an experiment hands the driver.

    objective(model, images, labels) -> (loss, dict of detached scalars to log); it may own parameters
    (a classifier, proxies), which are trained with the model's: objective.parameter_groups() lists them, each
    group with an optional lr_multiplier. evaluate(metrics) -> the metrics of the model's current weights, after
    every evaluated epoch (logged as <series>.<key>); best_key picks the best epoch among them. final_evaluate
    (None: evaluate) scores the best epoch's weights once, at the end: the run's result. rebuild holds what
    rebuilds the model without the data.
    baseline(metrics) -> the metrics of what the run starts from (the frozen backbone's pooled features), evaluated
    once before training with the final metrics.
    """

    model: nn.Module
    objective: nn.Module
    evaluate: Callable[[Sequence[str]], dict[str, float]]
    best_key: str
    lower_is_better: bool = False
    rebuild: dict = field(default_factory=dict)
    warmup_frozen: list[nn.Parameter] = field(default_factory=list)  # trained only after warm_epochs
    warm_epochs: int = 0
    after_epoch: Callable[[int], None] | None = None  # called after each epoch's training (e.g. for pictures)
    final_evaluate: Callable[[Sequence[str]], dict[str, float]] | None = None
    series: str = "eval"  # the per-epoch evaluation's series: eval (the test set) | val (a validation split)
    baseline: Callable[[Sequence[str]], dict[str, float]] | None = None


@dataclass
class Outcome:
    """What a finished fit leaves."""

    best_epoch: int
    metrics: dict[str, float]  # the final evaluation of the best epoch's weights, now loaded in the model
    directory: Path  # where the checkpoint and the pictures are
    epochs_run: int  # fewer than config.epochs when patience stopped the run


def select_device(cpu: bool, cudnn_flag: str, dist_timeout: float) -> torch.device:
    """This process's device; under torchrun it joins the process group (NCCL on GPUs, gloo on the CPU), whose
    collectives fail after dist_timeout seconds of waiting."""
    check_choice("cudnn_flag", cudnn_flag, CUDNN_FLAGS)
    cudnn.deterministic = cudnn_flag == "deterministic"
    return distributed.setup(cpu, timeout_s=dist_timeout)


def fit(
    task: Task,
    train_loader: DataLoader,
    *,
    metrics: Sequence[str],
    final_metrics: Sequence[str],
    device: torch.device,
    config: TrainingConfig,
    directory: Path,
    loggers: Sequence[RunLogger] = (),
    device_augment: Callable | None = None,
) -> Outcome:
    """Train task.model. metrics: those of every evaluated epoch; final_metrics: those of the best epoch's weights
    at the end. directory: where the checkpoint goes (rank 0's is used by every rank). device_augment: the
    photometric augmentation of the training batches on the device (dataset.gpu_augment). The settings' types and
    ranges were checked before (utils/settings.py).

    Under torchrun every rank runs this with its part of every global batch; only rank 0 writes the checkpoint,
    and the ranks agree on when to stop."""
    evaluate_after = evaluated_epochs(config.epochs, config.eval_every)
    resumed = load_checkpoint(config.resume, config.code) if config.resume else None
    if resumed is not None:
        check_resumable(resumed, config.settings)
        if changed := changed_sources(resumed, config.code):
            print(f"resume: these sources differ from the checkpoint's code: {', '.join(changed)}")
    model, objective = task.model.to(device), task.objective.to(device)
    # Speed options (utils/engine/speed.py) and BatchNorm over the global batch (utils/engine/sync_batchnorm.py).
    if config.sync_bn:
        sync_batchnorm.convert(model)
    precision = Precision(config.amp, device)
    prepare_model(model, config.channels_last, config.compile)
    move_images = batch_mover(device, config.channels_last, device_augment)
    groups = optimizer_groups(
        model, objective.parameter_groups(), config.lr, config.no_bias_decay, layer_decay=config.layer_decay
    )
    optimizer = build_optimizer(
        groups,
        optimizer=config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    schedule = build_scheduler(
        optimizer,
        iterations_per_epoch=len(train_loader),
        epochs=config.epochs,
        scheduler=config.scheduler,
        lr_step=config.lr_step,
        lr_gamma=config.lr_gamma,
        warmup_iterations=config.warmup_iterations,
    )
    main = distributed.is_main()
    directory = distributed.broadcast_object(directory.resolve() if main else None)
    distributed.raise_if_any(
        capture(lambda: prepare_directory(directory, checkpoint_bytes(model, objective))) if main else None
    )
    path = directory / CHECKPOINT
    for logger in loggers:
        logger.started(directory, path)
    best = BestEpoch(task.best_key, task.lower_is_better)
    curves: dict[str, dict[str, list]] = {}  # every logged series, in metrics.json's shape, for the checkpoint

    def evaluate_and_log(epoch: int) -> dict[str, float]:
        distributed.share_buffers(model)  # every rank evaluates (and keeps as best) what the checkpoint holds
        model.eval()
        results = task.evaluate(metrics)
        log_evaluation(loggers, curves, epoch, results, task.series)
        return results

    def require_finite_weights(when: str) -> None:
        """Stop before a checkpoint or an evaluation would see the weights an overflowing update left."""
        if not finite_weights(model, objective):
            raise RunFailed(
                f"non-finite weights at {when} (an update overflowed); {what_to_do(path)}, or clip the gradients "
                f"with grad_clip"
            )

    def write(epoch: int, iteration: int) -> None:
        """The checkpoint after `iteration` iterations of epoch (0: the epoch is complete), by rank 0."""
        require_finite_weights(
            f"epoch {epoch}, iteration {iteration}" if iteration else f"the end of epoch {epoch - 1}"
        )
        checkpoint = training_checkpoint(
            epoch=epoch,
            iteration=iteration,
            iterations=schedule.last_epoch,
            model=model,
            objective=objective,
            optimizer=optimizer,
            scheduler=schedule,
            scaler=precision.scaler,
            best=(best.epoch, best.metrics, best.state),
            stale_evaluations=best.stale,
            settings=config.settings,
            code=config.code,
            rebuild=task.rebuild,
            curves=curves,
        )
        distributed.raise_if_any(capture(lambda: save_checkpoint(checkpoint, path)) if main else None)

    if resumed is None:
        if task.baseline is not None:
            distributed.share_buffers(model)
            model.eval()
            log_baseline(loggers, curves, task.baseline(final_metrics))
        best.update(0, evaluate_and_log(0), model)
        torch.manual_seed(config.seed)
        start_epoch, start_iteration = 1, 0
    else:
        start_epoch, start_iteration = restore_training(
            resumed, model=model, objective=objective, optimizer=optimizer, scheduler=schedule, scaler=precision.scaler
        )
        best.epoch, best.metrics, best.state = best_epoch(resumed)
        best.stale = stale_evaluations(resumed)
        curves.update(saved_curves(resumed))
        if baseline := saved_baseline(curves):  # the resumed run's info keeps the baseline it started from
            for logger in loggers:
                logger.baseline(baseline)
        print(f"Resumed from {config.resume}: epoch {start_epoch}, iteration {start_iteration}")

    with stop_requests() as stop_signal:

        def after_step(iteration: int) -> bool:
            if config.checkpoint_every and schedule.last_epoch % config.checkpoint_every == 0:
                write(epoch, iteration)
            return distributed.any_rank(stop_signal() is not None)

        def on_progress(name: str, value: float, step: float) -> None:
            for logger in loggers:
                logger.progress(name, value, step)

        epochs_run = start_epoch - 1
        for epoch in range(start_epoch, config.epochs + 1):
            if config.patience is not None and best.stale >= config.patience:
                print(f"Stopped early after epoch {epochs_run}: {config.patience} evaluations without a new best")
                break
            for parameter in task.warmup_frozen:
                parameter.requires_grad_(epoch > task.warm_epochs)
            if epoch == start_epoch or epoch == task.warm_epochs + 1:
                # DDP fixes the set of trained parameters when it is built: again once the warm-up ends.
                step_objective = distributed.data_parallel(model, objective, device)
            start, start_iteration = start_iteration, 0
            train_loader.batch_sampler.set_epoch(epoch, start)
            with cudnn_benchmark(config.cudnn_flag):
                try:
                    history, counters = train_one_epoch(
                        model,
                        step_objective,
                        train_loader,
                        optimizer,
                        schedule,
                        device,
                        epoch,
                        grad_clip=config.grad_clip,
                        grad_clip_norm=config.grad_clip_norm,
                        log_every=config.visdom_freq,
                        on_progress=on_progress,
                        start=start,
                        after_step=after_step,
                        skip_nonfinite=config.nonfinite == "skip",
                        precision=precision,
                        move_images=move_images,
                    )
                except NonFiniteStep as step:
                    raise RunFailed(nonfinite_message(epoch, step, path)) from None
            log_training(loggers, curves, epoch, history, counters)
            if counters["iterations"] < start + len(train_loader):
                write(epoch, counters["iterations"])
                raise RunInterrupted(
                    f"stopped by {stop_signal() or 'another rank'} at epoch {epoch}, iteration "
                    f"{counters['iterations']}; the checkpoint is {path}: continue with "
                    f"`resume={directory}`"
                )
            require_finite_weights(f"the end of epoch {epoch}")
            if task.after_epoch is not None:
                task.after_epoch(epoch)
            if epoch in evaluate_after:
                best.update(epoch, evaluate_and_log(epoch), model)
            write(epoch + 1, 0)
            epochs_run = epoch
            for logger in loggers:
                logger.saved(epoch, path)
            if distributed.any_rank(stop_signal() is not None):
                raise RunInterrupted(
                    f"stopped by {stop_signal() or 'another rank'} after epoch {epoch}; the "
                    f"checkpoint is {path}: "
                    f"continue with `resume={directory}`"
                )

        if resumed is not None and epochs_run == start_epoch - 1:
            # Resumed after its training had ended (the last epoch, or patience): its folder still gets the checkpoint.
            write(start_epoch, 0)
        # Still under stop_requests: a first signal now lets the final evaluation finish (a second stops at once),
        # where the default action would end the process without marking the run.
        model.load_state_dict(best.state)
        model.eval()
        final = (task.final_evaluate or task.evaluate)(final_metrics)
    report_final(loggers, best.epoch, final)
    for logger in loggers:
        logger.finished(directory, curves, best.epoch)
    return Outcome(best.epoch, final, directory, epochs_run)


def capture(action: Callable[[], Any]) -> Exception | None:
    """The error action raised, or None: for distributed.raise_if_any, so that every rank fails with it."""
    try:
        action()
    except (InputError, RunFailed) as error:
        return error
    return None


def nonfinite_message(epoch: int, step: NonFiniteStep, checkpoint: Path) -> str:
    terms = " ".join(f"{key}={value:.4g}" for key, value in step.logs.items())
    return (
        f"non-finite loss or gradient at epoch {epoch}, iteration {step.iteration + 1} ({terms}); "
        f"{what_to_do(checkpoint)}, or skip such steps with nonfinite=skip"
    )


def what_to_do(checkpoint: Path) -> str:
    """What was kept and how to go on: a checkpoint to resume, or nothing yet and a run to start again."""
    if checkpoint.exists():
        return f"the last good checkpoint is {checkpoint}: lower lr and run again, or resume={checkpoint.parent}"
    return "no checkpoint was written yet: lower lr and run again"


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


def log_scalar(
    loggers: Sequence[RunLogger], curves: dict[str, dict[str, list]], name: str, value: float, step: float
) -> None:
    """A point of a series, for the loggers and for the run's own curves (kept in the checkpoint)."""
    for logger in loggers:
        logger.scalar(name, value, step)
    series = curves.setdefault(name, {"steps": [], "values": []})
    series["steps"].append(step)
    series["values"].append(value)


def log_training(
    loggers: Sequence[RunLogger], curves: dict, epoch: int, history: dict[str, list[float]], counters: dict[str, float]
) -> None:
    """Every iteration's logged values as train.<key>, at fractional epochs, and one line for the epoch: the mean
    of each term, the steps skipped, and where the time went (waiting for data or in steps)."""
    for key, values in history.items():
        for i, value in enumerate(values):
            log_scalar(loggers, curves, f"train.{key}", value, epoch - 1 + (counters["start"] + i) / counters["total"])
    means = " ".join(f"{key} {sum(values) / len(values):.4f}" for key, values in history.items() if values)
    skipped = f", {counters['skipped']} non-finite steps skipped" if counters["skipped"] else ""
    print(
        f"Train {epoch:3d} | {means} | {counters['data_seconds']:.1f} s waiting for data, "
        f"{counters['step_seconds']:.1f} s in steps{skipped}"
    )


def log_evaluation(
    loggers: Sequence[RunLogger], curves: dict, epoch: int, metrics: dict[str, float], series: str = "eval"
) -> None:
    """Print the metrics and log them as <series>.<key>."""
    print(format_metrics(f"Epoch {epoch:3d}" + (" (validation)" if series == "val" else ""), metrics))
    for key, value in metrics.items():
        log_scalar(loggers, curves, f"{series}.{key}", value, epoch)


def log_baseline(loggers: Sequence[RunLogger], curves: dict, metrics: dict[str, float]) -> None:
    """Print the baseline's metrics, log them as backbone.<key> at epoch 0 and hand them to the loggers."""
    print(format_metrics("Backbone ", metrics))
    for key, value in metrics.items():
        log_scalar(loggers, curves, f"{BASELINE_PREFIX}{key}", value, 0)
    for logger in loggers:
        logger.baseline(metrics)


def saved_baseline(curves: dict[str, dict[str, list]]) -> dict[str, float]:
    """The baseline's metrics among a checkpoint's curves (empty when the run had none)."""
    return {
        key.removeprefix(BASELINE_PREFIX): series["values"][0]
        for key, series in curves.items()
        if key.startswith(BASELINE_PREFIX)
    }


def evaluated_epochs(epochs: int, eval_every: int) -> set[int]:
    """The epochs after which to evaluate: before training (0), every eval_every-th, and the last (eval_every >= 1:
    the settings table)."""
    return {0, *range(eval_every, epochs + 1, eval_every), epochs}


def report_final(loggers: Sequence[RunLogger], epoch: int, metrics: dict[str, float]) -> None:
    """Print the final evaluation of the best epoch's weights and hand it to the loggers."""
    print(format_metrics(f"Best  {epoch:3d}", metrics))
    if epoch == 0:
        print("Note: the untrained network (epoch 0) is the best; no epoch of training improved on it")
    for logger in loggers:
        logger.final(epoch, metrics)


def best_epoch_words(epoch: int) -> str:
    """The best epoch for a message; epoch 0 is the network before training, which no trained epoch beat."""
    return f"{epoch} (the untrained network)" if epoch == 0 else str(epoch)


class BestEpoch:
    """The best epoch so far by one metric, its metrics, a copy of the model's weights then, and the evaluations
    since (stale: what patience counts). Ties go to the later epoch."""

    def __init__(self, key: str, lower_is_better: bool = False) -> None:
        self.key = key
        self.lower_is_better = lower_is_better
        self.epoch: int | None = None
        self.metrics: dict[str, float] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.stale = 0

    def update(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> None:
        value, best = metrics[self.key], self.metrics.get(self.key)
        if best is None or (value <= best if self.lower_is_better else value >= best):
            self.epoch, self.metrics, self.stale = epoch, metrics, 0
            self.state = copy.deepcopy(model.state_dict())
        else:
            self.stale += 1
