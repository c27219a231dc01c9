"""The run's pictures and live curves as loggers of the training driver (utils/engine/loggers.py)."""

from pathlib import Path

from utils.engine.loggers import RunLogger, Series
from utils.reporting.plots import draw_curves
from utils.reporting.visdom_logger import VisdomLogger


class VisdomCurves(RunLogger):
    """Live curves in the environment env of a visdom server: the training terms in one window, and each evaluation
    metric (of the test or the validation split) whose name ends with a suffix of titles in the window of that
    title (e.g. {"/R@1": "Recall@1"})."""

    def __init__(self, port: int, titles: dict[str, str], env: str) -> None:
        self.plot = VisdomLogger(port, env=env)
        self.titles = titles

    def progress(self, name: str, value: float, step: float) -> None:
        self.plot(name, "Training", step, value)

    def scalar(self, name: str, value: float, step: float) -> None:
        split, _, metric = name.partition(".")
        title = next((title for suffix, title in self.titles.items() if metric.endswith(suffix)), None)
        if split in ("eval", "val") and title is not None:  # val: the validation split's (evaluation.protocol)
            self.plot(f"{split}.{metric}" if split == "val" else metric, title, step, value)


class CurvesPicture(RunLogger):
    """curves.png in the run's folder when the run completes, titled with the run's name and best epoch."""

    def __init__(self, name: str) -> None:
        self.name = name

    def finished(self, directory: Path, curves: dict[str, Series], best_epoch: int) -> None:
        draw_curves(curves, directory / "curves.png", title=f"{self.name}: best epoch {best_epoch}")
