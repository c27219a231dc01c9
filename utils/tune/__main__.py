"""Tune settings with an Optuna study whose trials are ordinary sacred runs under evaluation.protocol=validation,
maximising a validation metric (the best epoch's value of val.<metric>).

    python -m utils.tune -F tune_dir --trials 20 -- lr=log:1e-4:1e-2 loss.contrastive epochs=3
    python -m utils.tune -F tune_dir --space space.txt --seeds 1,2,3      # then the best over seeds, on the test set
    python -m utils.tune -F tune_dir --storage postgresql://user@host/db --trials 50 -- ...   # several workers

The arguments after `--` (and the lines of --space FILE) are dimensions, KEY=log|uniform:LOW:HIGH,
KEY=int:LOW:HIGH or KEY=choice:A,B (utils/tune/space.py), or settings of every trial. Each trial is the run
tune_dir/trial-<number>; the median pruner stops a trial whose metric after an epoch is below the median of the
earlier trials at that epoch (the run ends INTERRUPTED, "pruned" in its info.json, its checkpoint kept). The study
lives in tune_dir/tune.db (SQLite) unless --storage names a database that several workers, on several machines,
share: each runs trials until the study holds --trials of them. A worker that dies leaves its trial RUNNING until
its heartbeat is older than twice --heartbeat; then any worker marks it failed. At the end the best settings are
printed as the command line that reproduces them, and with --seeds that command runs once per seed in
tune_dir/best (the test set evaluated once, at the end of each run): `python -m utils.report tune_dir/best`.
"""

import argparse
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.errors import InputError
from utils.sweep.runs import SCRIPTS, Stop, check_tokens, run_command, run_locally, seed_list, start
from utils.tune.space import Dimension, read_arguments, sample_tokens, split
from utils.tune.trial import TRIAL_VARIABLE, pruner, trial_variable

PROTOCOL = "evaluation.protocol=validation"


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m utils.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("-F", dest="folder", type=Path, required=True, help="the -F folder of every trial")
    parser.add_argument("--experiment", choices=sorted(SCRIPTS), default="experiment")
    parser.add_argument("--trials", type=int, default=20, help="trials in the study, all workers together")
    parser.add_argument("--metric", default="cosine/MAP@R", help="the validation metric to maximise")
    parser.add_argument("--space", type=Path, help="a file of dimensions and settings, one per line")
    parser.add_argument("--storage", help="a database URL (default: sqlite:///<-F folder>/tune.db)")
    parser.add_argument("--study", default="tune", help="the study's name in the storage")
    parser.add_argument("--pruner", choices=("median", "none"), default="median")
    parser.add_argument("--heartbeat", type=int, default=60, help="seconds between a worker's signs of life")
    parser.add_argument("--seeds", default="", help="then run the best settings with these seeds, e.g. 1,2,3")
    parser.add_argument("arguments", nargs="*", help="after --: dimensions and settings")
    return parser.parse_args(argv)


def open_study(args: argparse.Namespace, definition: dict[str, Any]) -> Any:
    """The study (created, or loaded when it exists with the same definition), or one line saying why not."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The heartbeat is what lets another worker fail a dead worker's trial; optuna calls it experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    url = storage_url(args)
    for attempt in range(3):
        try:
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=args.heartbeat, grace_period=2 * args.heartbeat
            )
            study = optuna.create_study(
                study_name=args.study,
                storage=storage,
                direction="maximize",
                load_if_exists=True,
                pruner=pruner(args.pruner),
            )
            break
        except Exception as error:  # the database's driver raises its own errors: each is one line here
            # Workers starting together on a new database race to create optuna's tables: the losers try again.
            if attempt < 2 and ("already exists" in str(error) or "UniqueViolation" in str(error)):
                time.sleep(1 + attempt)
                continue
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(
                f"--storage {hide_password(url)} cannot be reached ({reason}): start the database or fix the URL, or "
                "leave --storage out for a SQLite file in the -F folder"
            ) from None
    # One attribute, written once: a worker starting beside the first one never reads half a definition.
    stored = study.user_attrs.get("definition")
    if stored is None:
        study.set_user_attr("definition", definition)
    elif stored != definition:
        changed = ", ".join(
            f"{key} {stored.get(key)} -> {definition[key]}" for key in definition if stored.get(key) != definition[key]
        )
        raise InputError(
            f"study {args.study!r} in {hide_password(url)} was defined otherwise ({changed}): give its definition "
            "again, or start another study with --study NAME"
        )
    return study


def storage_url(args: argparse.Namespace) -> str:
    """The study's database: SQLite in the -F folder by default; postgresql:// through psycopg (version 3)."""
    url = args.storage or f"sqlite:///{args.folder / 'tune.db'}"
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


def hide_password(url: str) -> str:
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}://{credentials.split(':')[0]}:***@{host}" if at and ":" in credentials else url


def trial_value(run: Path, metric: str) -> float | None:
    """The validation metric at the run's best epoch, or None when the run did not complete."""
    status = json.loads((run / "run.json").read_text()).get("status") if (run / "run.json").exists() else None
    if status != "COMPLETED":
        return None
    info = json.loads((run / "info.json").read_text())
    series = json.loads((run / "metrics.json").read_text())[f"val.{metric}"]
    return series["values"][series["steps"].index(info["best_epoch"])]


def was_pruned(run: Path) -> bool:
    info = run / "info.json"
    return info.exists() and json.loads(info.read_text()).get("pruned", False)


def run_trial(study: Any, args: argparse.Namespace, dimensions: list[Dimension], fixed: list[str], stop: Stop) -> None:
    """Ask the study for a trial, run it, and tell the study how it ended."""
    from optuna.trial import TrialState

    trial = study.ask()
    chosen = [f"{d.key}={d.suggest(trial)}" for d in dimensions]
    run_id = f"trial-{trial.number}"
    command = run_command(args.experiment, args.folder, run_id, [*fixed, *chosen, PROTOCOL])
    env = {TRIAL_VARIABLE: trial_variable(storage_url(args), study.study_name, trial._trial_id)}
    process = start(command, log=args.folder / f"{run_id}.log", env=env)
    stop.running.append(process)
    while process.poll() is None:
        study._storage.record_heartbeat(trial._trial_id)  # optuna's workers beat only inside study.optimize
        try:
            process.wait(timeout=args.heartbeat)
        except subprocess.TimeoutExpired:  # alive: beat again
            pass
    stop.running.remove(process)
    run = args.folder / run_id
    value = trial_value(run, args.metric)
    if value is not None:
        study.tell(trial, value)
        print(f"trial {trial.number}: {' '.join(chosen)} -> val {args.metric} {value:.4f}", flush=True)
    elif was_pruned(run):
        study.tell(trial, state=TrialState.PRUNED)
        print(f"trial {trial.number}: {' '.join(chosen)} -> pruned ({run})", flush=True)
    else:
        study.tell(trial, state=TrialState.FAIL)
        print(f"trial {trial.number}: {' '.join(chosen)} -> failed: see {run}.log", flush=True)


def best_command(study: Any, args: argparse.Namespace, fixed: list[str]) -> list[str] | None:
    """The settings of the best trial, or None when no trial completed."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    print(f"best: trial {best.number}, val {args.metric} {best.value:.4f} ({args.folder}/trial-{best.number})")
    return [*fixed, *(f"{key}={value}" for key, value in best.params.items()), PROTOCOL]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    args.folder = args.folder.resolve()
    try:
        if args.trials < 1 or args.heartbeat < 1:
            raise InputError("--trials and --heartbeat must be >= 1")
        seeds = seed_list(args.seeds) if args.seeds else []
        dimensions, fixed = split(read_arguments(args.arguments, args.space))
        check_tokens(args.experiment, [*fixed, *sample_tokens(dimensions), PROTOCOL], "the search space")
        args.folder.mkdir(parents=True, exist_ok=True)
        definition = {
            "space": [d.text() for d in dimensions],
            "fixed": fixed,
            "experiment": args.experiment,
            "metric": args.metric,
            "pruner": args.pruner,
        }
        study = open_study(args, definition)
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
    from optuna.storages import fail_stale_trials

    stop = Stop()
    while stop.received is None:
        fail_stale_trials(study)  # a dead worker's trial: failed, so that it no longer counts as running
        if len(study.get_trials(deepcopy=False)) >= args.trials:
            break
        run_trial(study, args, dimensions, fixed, stop)
    if stop.received is not None:
        print(f"stopped by {stop.received}; run the same command again to go on with the study")
        return 1
    settings = best_command(study, args, fixed)
    if settings is None:
        print("no trial completed: see the trials' logs in", args.folder)
        return 1
    script = SCRIPTS[args.experiment]
    print(f"reproduce: python {script} -F {args.folder / 'best'} with {' '.join(settings)}")
    if not seeds:
        return 0
    points = [(f"seed={seed}", [*settings, f"seed={seed}"]) for seed in seeds]
    unfinished = run_locally(args.experiment, args.folder / "best", points, jobs=1, gpus=0, launcher=[sys.executable])
    print(f"the best settings over seeds {args.seeds}: python -m utils.report {args.folder / 'best'}")
    return 1 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
