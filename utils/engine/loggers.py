"""What the driver reports while it runs, to loggers the experiment builds (sacred's run, visdom, pictures).

The driver calls every logger it is given with the same events; a logger overrides those it records.
"""

from pathlib import Path

Series = dict[str, list]  # {"steps": [...], "values": [...]}, sacred's metrics.json entry


class RunLogger:
    """A receiver of a run's events; every method does nothing unless overridden."""

    def started(self, directory: Path, checkpoint: Path) -> None:
        """The run writes its checkpoint and pictures in directory."""

    def scalar(self, name: str, value: float, step: float) -> None:
        """A point of a series: train.<term> per iteration (fractional epochs), eval.<metric> per epoch."""

    def progress(self, name: str, value: float, step: float) -> None:
        """The mean of a training term over the last log_every iterations, for live curves."""

    def baseline(self, metrics: dict[str, float]) -> None:
        """What the run starts from (the frozen backbone's pooled features), evaluated with the final metrics."""

    def saved(self, epoch: int, checkpoint: Path) -> None:
        """Epoch's checkpoint is written; a logger may end the run here by raising (a tuner pruning its trial)."""

    def final(self, epoch: int, metrics: dict[str, float]) -> None:
        """The final evaluation of the best epoch's weights."""

    def finished(self, directory: Path, curves: dict[str, Series], best_epoch: int) -> None:
        """The run completed; curves holds every series logged with scalar."""
