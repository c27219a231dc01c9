"""python -m utils.tune: real studies (SQLite, and a PostgreSQL server started here) whose trials are real runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from tests.conftest import digits_updates

REPO = Path(__file__).resolve().parent.parent
# Debian's postgresql package (the newest installed version); .ci/run installs it.
POSTGRES_BIN = max(
    Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/nonexistent"), key=lambda p: int(p.parent.name)
)


def tune(folder: Path, *arguments: str, **popen) -> subprocess.Popen:
    """`python -m utils.tune -F folder ...` as a process of its own, one torch thread per run."""
    return subprocess.Popen(
        [sys.executable, "-m", "utils.tune", "-F", str(folder), *arguments],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def one_line_error(folder: Path, *arguments: str) -> str:
    code, _, err = finish(tune(folder, *arguments))
    assert code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("dimension", "fragment"),
    [
        ("lr=log:1e-2:1e-4", "an empty range"),
        ("epochs=int:3:3", "an empty range"),
        ("lr=log:0:1", "must be positive"),
        ("optimizer=choice:", "no choices"),
        ("lr=uniform:a:b", "give two uniform bounds"),
    ],
)
def test_a_bad_dimension_is_one_line(tmp_path: Path, dimension: str, fragment: str) -> None:
    line = one_line_error(tmp_path, "--", dimension)
    assert fragment in line and dimension in line


def test_an_unknown_setting_in_the_space_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(tmp_path, "--", "lrr=log:1e-4:1e-2", "epochs=1")
    assert "the search space" in line and "lrr" in line and "print_config" in line
    assert not (tmp_path / "tune.db").exists()  # no study was created for it


def test_a_storage_that_cannot_be_reached_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(tmp_path, "--storage", "postgresql://me:secret@127.0.0.1:1/db", "--", "lr=log:1e-4:1e-2")
    assert "cannot be reached" in line and "secret" not in line and "127.0.0.1:1" in line


def test_a_study_whose_space_changed_is_one_line(tmp_path: Path, digits_path: Path) -> None:
    common = [*digits_updates(digits_path), "cpu=True", "epochs=1", "dataset.num_iterations=1"]
    code, out, err = finish(tune(tmp_path, "--trials", "1", "--pruner", "none", "--", "lr=log:1e-4:1e-2", *common))
    assert code == 0, out + err
    line = one_line_error(tmp_path, "--trials", "2", "--", "lr=log:1e-5:1e-2", *common)
    assert "defined otherwise" in line and "lr=log:1e-05:0.01" in line and "--study" in line


@pytest.mark.slow
def test_a_hopeless_trial_is_pruned_after_an_epoch_with_its_checkpoint(tmp_path: Path, digits_path: Path) -> None:
    settings = ["lr=log:1e-4:1e-2", *digits_updates(digits_path), "cpu=True", "epochs=2", "dataset.num_iterations=2"]
    code, out, err = finish(tune(tmp_path, "--trials", "1", "--", *settings))
    assert code == 0, out + err
    # Two finished trials far better than any real one at every epoch: the median pruner must stop the next.
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{tmp_path / 'tune.db'}")
    for _ in range(2):
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": 1e-3},
                distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)},
                value=1.0,
                intermediate_values={0: 1.0, 1: 1.0, 2: 1.0},
            )
        )
    code, out, err = finish(tune(tmp_path, "--trials", "4", "--seeds", "1", "--", *settings))
    assert code == 0, out + err
    pruned = study.trials[3]
    assert pruned.state == optuna.trial.TrialState.PRUNED and "trial 3:" in out and "pruned" in out
    run = tmp_path / "trial-3"
    assert json.loads((run / "run.json").read_text())["status"] == "INTERRUPTED"
    assert json.loads((run / "info.json").read_text())["pruned"] is True
    assert (run / "checkpoint.pt").exists() and "pruned: trial 3" in (tmp_path / "trial-3.log").read_text()
    series = json.loads((run / "metrics.json").read_text())["val.cosine/MAP@R"]
    assert series["steps"] == [0, 1] and list(pruned.intermediate_values.values()) == series["values"]
    # The first trial's value is its run's validation metric at its best epoch.
    first = tmp_path / "trial-0"
    best_epoch = json.loads((first / "info.json").read_text())["best_epoch"]
    first_series = json.loads((first / "metrics.json").read_text())["val.cosine/MAP@R"]
    assert study.trials[0].value == first_series["values"][first_series["steps"].index(best_epoch)]
    # The best trial (an added one) is printed as a command line and run again with seed 1, on the test set at its end.
    assert "best: trial 1, val cosine/MAP@R 1.0000" in out and "lr=0.001 evaluation.protocol=validation" in out
    again = tmp_path / "best" / "seed=1"
    config = json.loads((again / "config.json").read_text())
    assert config["lr"] == 0.001 and config["seed"] == 1 and config["evaluation"]["protocol"] == "validation"
    assert json.loads((again / "run.json").read_text())["status"] == "COMPLETED"


def start_postgres(folder: Path) -> str:
    """A PostgreSQL server on 127.0.0.1 with its data in folder; its URL. As root it runs as `nobody`."""
    if not (POSTGRES_BIN / "initdb").exists():
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "nobody")
    data = folder / "data"
    subprocess.run(
        [*as_user, POSTGRES_BIN / "initdb", "-A", "trust", "-U", "tuner", "-D", data], check=True, capture_output=True
    )
    with socket_port() as port:
        pass
    subprocess.run(
        [
            *as_user,
            POSTGRES_BIN / "pg_ctl",
            "-D",
            data,
            "-l",
            folder / "log",
            "-w",
            "start",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {folder}",
        ],
        check=True,
        capture_output=True,
    )
    return f"postgresql://tuner@127.0.0.1:{port}/postgres"


class socket_port:
    """A free TCP port on 127.0.0.1."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.socket.close()


@pytest.fixture
def postgres() -> str:
    folder = Path(tempfile.mkdtemp(prefix="postgres-", dir="/tmp"))
    try:
        yield start_postgres(folder)
    finally:
        as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*as_user, POSTGRES_BIN / "pg_ctl", "-D", folder / "data", "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study_and_a_killed_one_does_not_block_it(
    tmp_path: Path, digits_path: Path, postgres: str
) -> None:
    arguments = ["--storage", postgres, "--trials", "4", "--heartbeat", "2", "--pruner", "none", "--"]
    arguments += ["lr=log:1e-4:1e-2", *digits_updates(digits_path), "cpu=True", "epochs=1", "dataset.num_iterations=2"]
    doomed = tune(tmp_path, *arguments)
    survivor = tune(tmp_path, *arguments)
    while len(list(tmp_path.glob("trial-*/run.json"))) < 2:  # each worker's first run has started
        assert doomed.poll() is None, doomed.communicate()
        time.sleep(1)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    code, out, err = finish(survivor)
    assert code == 0, out + err
    study = optuna.load_study(study_name="tune", storage=postgres.replace("postgresql://", "postgresql+psycopg://"))
    numbers = [trial.number for trial in study.trials]
    assert sorted(numbers) == list(range(len(numbers))) and len(numbers) >= 4
    states = {trial.state for trial in study.trials}
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.FAIL in states
    best = tmp_path / f"trial-{study.best_trial.number}"
    assert json.loads((best / "run.json").read_text())["status"] == "COMPLETED"
    assert f"python experiment.py -F {tmp_path / 'best'} with" in out
