"""A run as a trial of an Optuna study: the tuner (utils/tune/__main__.py) starts `python experiment.py` with
TRIAL_VARIABLE=STORAGE#STUDY#TRIAL_ID, and the run's TrialLogger reports each epoch's validation metric to that
trial and ends the run when the study's pruner says it is hopeless (the engine knows nothing of Optuna).
"""

import os
from pathlib import Path
from typing import Any

from utils.engine.loggers import RunLogger
from utils.errors import RunInterrupted

TRIAL_VARIABLE = "UTILS_TUNE_TRIAL"


class RunPruned(RunInterrupted):
    """A trial stopped by the study's pruner after its checkpoint was written: sacred marks the run INTERRUPTED and
    info.json says "pruned": true."""


def trial_variable(storage: str, study: str, trial_id: int) -> str:
    return f"{storage}#{study}#{trial_id}"


class TrialLogger(RunLogger):
    """Reports `<series>.<metric>` (val.cosine/MAP@R by default) to the trial at each evaluated epoch, and after that
    epoch's checkpoint asks the pruner whether to go on."""

    def __init__(self, run: Any, trial: Any, series: str) -> None:
        self.run, self.trial, self.series = run, trial, series
        self.reported: int | None = None  # the last epoch reported

    @classmethod
    def from_environment(cls, run: Any) -> "TrialLogger":
        import optuna  # only trials load it

        storage, study_name, trial_id = os.environ[TRIAL_VARIABLE].rsplit("#", 2)
        study = optuna.load_study(study_name=study_name, storage=storage)
        definition = study.user_attrs["definition"]  # written by the tuner (utils/tune/__main__.py)
        study.pruner = pruner(definition["pruner"])
        trial = optuna.trial.Trial(study, int(trial_id))
        run.info["trial"] = {"study": study_name, "number": trial.number}
        return cls(run, trial, f"val.{definition['metric']}")

    def scalar(self, name: str, value: float, step: float) -> None:
        if name == self.series:
            self.trial.report(value, int(step))
            self.reported = int(step)

    def saved(self, epoch: int, checkpoint: Path) -> None:
        if self.reported == epoch and self.trial.should_prune():
            self.run.info["pruned"] = True
            raise RunPruned(
                f"pruned: trial {self.trial.number}'s {self.series} after epoch {epoch} is below the study's "
                f"median; the checkpoint is kept in {checkpoint.parent}"
            )


def pruner(name: str) -> Any:
    """The study's pruner by name: median (stop a trial below the median of the earlier trials at the same epoch,
    once two trials finished and from epoch 1 on) | none."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    return optuna.pruners.NopPruner()
