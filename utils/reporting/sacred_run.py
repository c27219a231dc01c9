"""Sacred at the experiments' edge: the -F observer that keeps a failed run's records whole, the hooks that put it
in place and quiet the other ranks under torchrun, the run's logger, the output folder of a run and the files it
hands to every observer.

    ex.option_hook(quiet_other_ranks)   # first: under torchrun only rank 0 observes the run and prints
    observe_with_run_records(ex)        # -F DIR writes through RunRecords; -m without pymongo is one line
    ex.config(observers_config)         # checkpoint_artifact
    @ex.main
    @keep_run_records                   # on every command taking _run
    def main(..., _run): ...
        add_artifacts(_run, directory, _config["checkpoint_artifact"])   # once the pictures are drawn

    if __name__ == "__main__":
        run_commandline(ex)             # the last line says where the run's folder is
"""

import functools
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from sacred import Experiment, Ingredient, serializer
from sacred.arg_parser import get_config_updates
from sacred.observers import FileStorageObserver
from sacred.run import Run

from utils import distributed
from utils.engine.checkpoint import CHECKPOINT, settings_at
from utils.engine.loggers import RunLogger
from utils.errors import InputError
from utils.files import atomic_write
from utils.reporting.run_loggers import CurvesPicture, VisdomCurves
from utils.settings import boolean, register
from utils.tune.trial import TRIAL_VARIABLE, TrialLogger


def save_json_atomically(directory: str, obj: object, filename: str) -> None:
    """sacred's FileStorageObserver.save_json, but the file is replaced whole (utils.files.atomic_write)."""
    with atomic_write(Path(directory) / filename) as file:
        json.dump(serializer.flatten(obj), file, sort_keys=True, indent=2)


class RunRecords(FileStorageObserver):
    """sacred's -F observer, keeping a run's records whole when it fails.

    - sacred's file observer rewrites run.json and metrics.json in place: on a full disk that truncates them. They
      are replaced whole instead, so a write that fails leaves the previous version.
    - Sacred 0.8 closes its capture of stdout/stderr before the last heartbeat of a failed or interrupted run, so
      its observers lose everything printed since the previous beat (up to 10 s: often all the lines that led to
      the failure). keep_run_records hands this observer that output, which it adds to cout.txt at the end.
    """

    def __init__(self, basedir: str) -> None:
        super().__init__(basedir)
        self.output: TeedOutput | None = None  # what the command printed, set by keep_run_records
        self.output_seen = 0  # how much of it sacred had read at the last heartbeat
        self.lost = ""  # what sacred missed of a failed or interrupted run
        # sacred's heartbeat thread writes beside the run's own events, and outlives its join under load: one writer
        # at a time, and no records from a beat after the run's end (an older snapshot would replace the final ones).
        self.writing = threading.RLock()
        self.ended = False

    def save_json(self, obj: object, filename: str) -> None:
        with self.writing:
            save_json_atomically(self.dir, obj, filename)

    def heartbeat_event(self, info: dict, captured_out: str, beat_time: Any, result: Any) -> None:
        with self.writing:
            if self.ended:  # a late beat: only the output it read may be new
                if len(captured_out) > len(self.cout):
                    self.cout = captured_out
                    self.save_cout()
                return
            # Sacred reads its capture just before each beat; once the command ended, its last beat reads nothing
            # new.
            if self.output is not None and not self.lost:
                self.output_seen = len(self.output.text())
            super().heartbeat_event(info, captured_out, beat_time, result)

    def completed_event(self, stop_time: Any, result: Any) -> None:
        with self.writing:
            self.ended = True
            super().completed_event(stop_time, result)

    def command_failed(self, output_filter: Callable[[str], str] | None) -> None:
        """Keep what the command printed since sacred's last read (called while the run is failing)."""
        if self.output is not None:
            missed = self.output.text()[self.output_seen :]
            self.lost = output_filter(missed) if output_filter is not None else missed

    def failed_event(self, fail_time: Any, fail_trace: list[str]) -> None:
        with self.writing:
            self.ended = True
            self.save_lost_output()
            super().failed_event(fail_time, fail_trace)

    def interrupted_event(self, interrupt_time: Any, status: str) -> None:
        with self.writing:
            self.ended = True
            self.save_lost_output()
            super().interrupted_event(interrupt_time, status)

    def save_lost_output(self) -> None:
        if self.lost:
            self.cout += self.lost
            self.save_cout()


def check_run_folder(options: dict) -> None:
    """A sacred option hook (ex.option_hook): refuse a -F folder that is a file or cannot be written, in one line."""
    folder = options.get("--file_storage")
    if not folder:
        return
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"-F {folder} is a file, not a folder: give -F a folder (a new or an existing one)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # permissions, a read-only file system, a full quota
            pass
    except OSError as error:
        raise InputError(
            f"-F {folder} cannot be written ({error.strerror or error}): give -F a folder you can write to"
        ) from None


def check_database_client(options: dict) -> None:
    """A sacred option hook: `-m` without pymongo (an optional extra) is one line, not sacred's traceback."""
    if not options.get("--mongo_db"):
        return
    try:
        import pymongo  # noqa: F401
    except ImportError:
        raise InputError(
            "-m (sacred's MongoDB observer) needs pymongo, which is not installed: "
            "`pip install -r requirements-mongo.txt`, or leave -m out"
        ) from None


def observe_with_run_records(ex: Experiment) -> None:
    """Make `-F DIR` observe the experiment's runs with RunRecords instead of sacred's own file observer (through
    an option hook: the run is built after it, with ex.observers), and refuse -m without pymongo in one line."""

    def use_run_records(options: dict) -> None:
        ex.observers[:] = [observer for observer in ex.observers if not isinstance(observer, RunRecords)]
        if options.get("--file_storage"):
            check_run_folder(options)
            ex.observers.append(RunRecords(options["--file_storage"]))
            options["--file_storage"] = None

    ex.option_hook(use_run_records)
    ex.option_hook(check_database_client)


def continue_with_checkpoint_settings(ex: Experiment) -> None:
    """`resume=PATH` continues a run with its checkpoint's settings. An option hook reads them before sacred builds
    the configuration, and a config hook of the experiment and of each ingredient hands sacred its part; sacred
    applies the command line's updates and named configs over a hook's, so a resumed run differs from the stopped
    one only in what the user typed (epochs, to extend it; utils/engine/checkpoint.py refuses the rest). A pre-run
    hook records the run it continues: info.json's "parent" (parent_record)."""
    saved: dict = {}

    def read_checkpoint(options: dict) -> None:
        saved.clear()
        updates, _ = get_config_updates(options.get("UPDATE") or [])
        if (options.get("COMMAND") or ex.default_command) == ex.default_command and updates.get("resume"):
            saved.update(settings_at(str(updates["resume"]), ex.path) or {})

    ingredients = {ingredient.path: ingredient for ingredient in all_ingredients(ex)}

    def hand_over(path: str | None) -> Callable:
        def checkpoint_settings(config: dict, command_name: str, logger: Any) -> dict:
            if path is None:  # the experiment's own keys; each ingredient hands over its own
                part = {key: value for key, value in saved.items() if key not in ingredients}
                # The experiment's hook runs last (sacred sets up the ingredients first): the settings are used up,
                # so a run created without the command line (ex.run, in a test or a notebook) gets none of them.
                saved.clear()
                return settings_known_to(config, part)
            return settings_known_to(config.get(path, {}), saved.get(path, {}))

        return checkpoint_settings

    def record_parent(_run: Run) -> None:
        """A resumed run names the run it continued in its info.json: `python -m utils.report` joins such links
        into one chain, counted once."""
        if _run.config.get("resume") and _run.main_function.signature.name == ex.default_command:
            _run.info["parent"] = parent_record(str(_run.config["resume"]))

    ex.option_hook(read_checkpoint)
    ex.config_hook(hand_over(None))
    for path, ingredient in ingredients.items():
        ingredient.config_hook(hand_over(path))
    ex.pre_run_hook(record_parent)


def parent_record(resume: str) -> dict[str, str | None]:
    """The run folder of resume=PATH (a run directory, or the folder of a checkpoint file) as an absolute path,
    and its sacred run id: the folder's name when it holds a run.json (sacred's -F layout), else None."""
    folder = Path(resume).expanduser().resolve()
    if not folder.is_dir():
        folder = folder.parent
    return {"folder": str(folder), "id": folder.name if (folder / "run.json").is_file() else None}


def all_ingredients(ingredient: Ingredient) -> list[Ingredient]:
    found = []
    for child in ingredient.ingredients:
        found += [child, *all_ingredients(child)]
    return found


def settings_known_to(config: dict, saved: dict) -> dict:
    """The saved settings whose keys the current config has (a key of another code version is left out), but
    resume itself."""
    known = {}
    for key, value in saved.items():
        if key not in config or key == "resume" or key.startswith("__"):
            continue
        nested = isinstance(value, dict) and isinstance(config[key], dict)
        known[key] = settings_known_to(config[key], value) if nested else value
    return known


class TeedOutput:
    """A text stream writing through to another one and keeping a copy; everything else is the other one's."""

    def __init__(self, stream: TextIO, copy: list[str]) -> None:
        self.stream, self.copy = stream, copy

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def write(self, text: str) -> int:
        self.copy.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def text(self) -> str:
        return "".join(self.copy)


@contextmanager
def teed_output() -> Iterator[TeedOutput]:
    """While open, a copy of everything written to sys.stdout and sys.stderr (in order)."""
    copy: list[str] = []
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = TeedOutput(stdout, copy), TeedOutput(stderr, copy)
    try:
        yield sys.stdout
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def keep_run_records(command: Callable) -> Callable:
    """Decorate a sacred command that takes `_run`, so that its RunRecords observer keeps the output printed just
    before a failure (see RunRecords), and a collective that timed out under torchrun ends it in one line."""

    @functools.wraps(command)  # sacred reads the configuration parameters from the command's signature
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        run: Run = kwargs["_run"]
        records = [observer for observer in run.observers if isinstance(observer, RunRecords)]
        with teed_output() as output:
            for observer in records:
                observer.output = output
            try:
                with distributed.timeouts_in_one_line(), signals_interrupt():
                    return command(*args, **kwargs)
            except BaseException:
                for observer in records:
                    observer.command_failed(run.captured_out_filter)
                raise

    return wrapper


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the command as Ctrl-C does (sacred records the run INTERRUPTED), where their default
    action would end the process with the run left RUNNING: the training driver stops cleanly on them while it
    trains, and this covers the rest (building the run, the pictures after the final evaluation)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def quiet_other_ranks(options: dict) -> None:
    """A sacred option hook: under torchrun only rank 0 observes the run (-F, other observers) and prints; the
    other ranks keep their errors (stderr)."""
    if int(os.environ.get("RANK", "0")) != 0:
        for option in [key for key in options if key.startswith("--") and options[key] and "storage" in key]:
            options[option] = None
        options["--loglevel"] = "ERROR"
        sys.stdout = open(os.devnull, "w")  # for the life of the process


def observers_config():
    # The checkpoint is a run's largest file (hundreds of MiB with a large classifier): with -F it stays where it is,
    # listed in run.json, but a database observer (-m) stores a copy of every artifact.
    checkpoint_artifact = True  # hand checkpoint.pt to sacred's observers with the pictures; False: the pictures only


register({"checkpoint_artifact": boolean()})


def add_artifacts(run: Run, directory: Path, checkpoint: bool) -> None:
    """Hand the run's pictures (the PNG files in directory) and, if checkpoint, its checkpoint to every observer of
    the run as sacred artifacts: -m stores them in MongoDB; -F, whose run folder is directory, lists them in
    run.json (sacred's file observer leaves a file that is already its own in place: no second copy)."""
    files = sorted(directory.glob("*.png")) + ([directory / CHECKPOINT] if checkpoint else [])
    for path in files:
        run.add_artifact(str(path), name=path.name)


def output_directory(run: Run, output_dir: str, name: str) -> Path:
    """The -F run directory, or a new folder in output_dir named after the run, the time and the process."""
    for observer in run.observers:
        if isinstance(observer, FileStorageObserver):
            return Path(observer.dir).resolve()
    return (Path(output_dir) / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}").resolve()


class SacredLogger(RunLogger):
    """The run's series (metrics.json) and info (info.json): the checkpoint's path, the frozen backbone's metrics
    (info["backbone"]), the best epoch and its final metrics."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def started(self, directory: Path, checkpoint: Path) -> None:
        self.run.info["checkpoint"] = str(checkpoint)

    def scalar(self, name: str, value: float, step: float) -> None:
        self.run.log_scalar(name, value, step)

    def baseline(self, metrics: dict[str, float]) -> None:
        self.run.info["backbone"] = metrics

    def final(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.info["best_epoch"] = epoch
        self.run.info["best_epoch_untrained"] = epoch == 0  # no epoch of training beat the initial weights
        self.run.info["metrics"] = metrics


def run_loggers(
    run: Run, visdom_port: int | None, plot_titles: dict[str, str], name: str, directory: Path
) -> list[RunLogger]:
    """The run's loggers: sacred's on every rank; live curves (with visdom_port, in the visdom environment named
    after the run's folder) and curves.png on rank 0 only; the tuner's trial when the run is one. plot_titles:
    metric-name suffix -> visdom window (VisdomCurves)."""
    loggers: list[RunLogger] = [SacredLogger(run)]
    if distributed.is_main():
        if visdom_port:
            loggers.append(VisdomCurves(visdom_port, plot_titles, visdom_env(run, directory)))
        loggers.append(CurvesPicture(name))
    if os.environ.get(TRIAL_VARIABLE):  # a trial of `python -m utils.tune`: its validation metric goes to the study
        loggers.append(TrialLogger.from_environment(run))
    return loggers


def visdom_env(run: Run, directory: Path) -> str:
    """The run's own visdom environment: the experiment and the run's folder, e.g. metric_learning_result_dir_3
    (-F result_dir) or metric_learning_outputs_small_cnn_digits_20250101-120000_4242. visdom keeps an environment
    in a file of that name, so characters other than letters, digits, '.', '-' and '_' become '-'."""
    name = f"{run.experiment_info['name']}_{directory.parent.name}_{directory.name}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def run_commandline(ex: Experiment) -> None:
    """ex.run_commandline(), then, as the very last line (after sacred's "Completed after" or the error), where
    the run's folder is: the -F run directory, or the folder of its checkpoint, once it exists."""
    try:
        ex.run_commandline()
    finally:
        run = ex.current_run
        folder = run_folder(run) if run is not None else None
        if folder is not None and folder.is_dir():
            what = "Results" if run.status == "COMPLETED" else f"Records of the {run.status.lower()} run"
            print(f"{what} in {folder}", flush=True)


def run_folder(run: Run) -> Path | None:
    """The folder that keeps what the run wrote, or None when it had none (e.g. a bad setting stopped it first)."""
    for observer in run.observers:
        if isinstance(observer, FileStorageObserver) and observer.dir:
            return Path(observer.dir).resolve()
    return Path(run.info["checkpoint"]).parent if "checkpoint" in run.info else None
