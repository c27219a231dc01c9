"""Run plumbing shared by both experiments: device, sacred logging, best-epoch tracking, artifacts,
captured output of failed runs."""

import copy
import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from sacred.run import Run
from torch import nn
from torch.backends import cudnn

from utils.errors import InputError
from utils.training import PlotFunction, check_choice, format_metrics

CUDNN_FLAGS = ("benchmark", "deterministic")


def select_device(cpu: bool, cudnn_flag: str) -> torch.device:
    check_choice("cudnn_flag", cudnn_flag, CUDNN_FLAGS)
    cudnn.deterministic = cudnn_flag == "deterministic"
    return torch.device("cuda:0" if torch.cuda.is_available() and not cpu else "cpu")


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


def log_evaluation(run: Run, epoch: int, metrics: dict[str, float], plot: PlotFunction | None = None,
                   plot_titles: dict[str, str] | None = None) -> None:
    """Print the metrics, log them as eval.<key> and plot those whose key ends with a suffix of plot_titles
    in that plot (by default every R@1 in "Recall@1")."""
    plot_titles = {"/R@1": "Recall@1"} if plot_titles is None else plot_titles
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

    @property
    def value(self) -> float:
        return self.metrics[self.key]


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
