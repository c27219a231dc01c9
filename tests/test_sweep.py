"""python -m utils.sweep: real runs in a temporary -F folder, a real SIGTERM, the SLURM script read back and run."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import digits_updates

REPO = Path(__file__).resolve().parent.parent


def sweep(folder: Path, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "utils.sweep", "-F", str(folder), *arguments],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=900)
    return process.returncode, out, err


def status(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["status"]


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--seeds", "1,x", "--", "epochs=1"], "--seeds 1,x: give integers"),
        (["--seeds", "1,1", "--", "epochs=1"], "a seed is repeated"),
        (["--", "lr=1e-3,", "epochs=1"], "'lr=1e-3,' has an empty alternative"),
        (["--", "lrr=1e-3,1e-4"], "the grid: unknown setting lrr;"),
        (["--", "loss.nonexistent,loss.contrastive"], "nonexistent"),
        (["--task", "2", "--", "lr=1e-3,1e-4"], "--task 2: the grid has 2 runs"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, arguments: list[str], fragment: str) -> None:
    code, out, err = finish(sweep(tmp_path, *arguments))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


def test_the_slurm_script_holds_one_task_per_run_and_a_task_runs_its_point(tmp_path: Path, digits_path: Path) -> None:
    folder, script = tmp_path / "runs", tmp_path / "sweep.sbatch"
    settings = [*digits_updates(digits_path), "cpu=True", "epochs=1", "dataset.num_iterations=1"]
    code, out, err = finish(
        sweep(
            folder,
            "--seeds",
            "1,2",
            "--slurm",
            str(script),
            "--sbatch=--time=1:00:00",
            "--",
            "lr=1e-3,1e-4",
            *settings,
        )
    )
    assert code == 0 and f"sbatch {script}" in out, err
    text = script.read_text()
    directives = re.findall(r"^#SBATCH (\S+)$", text, flags=re.M)
    assert {"--array=0-3", "--signal=TERM@120", "--requeue", "--time=1:00:00"} <= set(directives)
    tasks = dict(re.findall(r"^#   (\d+): (\S+)$", text, flags=re.M))
    assert sorted(tasks.values()) == sorted(
        f"lr={lr}_{'_'.join(settings)}_seed={seed}".replace("/", "_") for lr in ("1e-3", "1e-4") for seed in (1, 2)
    )
    if shutil.which("sbatch"):
        assert subprocess.run(["sbatch", "--test-only", script], capture_output=True).returncode == 0
    # What srun runs in array task 1, here.
    line = next(line for line in text.splitlines() if line.startswith("srun "))
    command = shlex.split(line.replace('"$SLURM_ARRAY_TASK_ID"', "1"))[1:]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert [path.name for path in folder.iterdir() if path.is_dir() and path.name != "_sources"] == [tasks["1"]]
    assert status(folder / tasks["1"]) == "COMPLETED"


@pytest.mark.slow
def test_a_killed_sweep_started_again_resumes_the_stopped_run_and_starts_the_rest(
    tmp_path: Path, digits_path: Path
) -> None:
    arguments = [
        "--seeds",
        "1,2",
        "--",
        *digits_updates(digits_path),
        "cpu=True",
        "epochs=3",
        "dataset.num_iterations=2",
    ]
    first = sweep(tmp_path, *arguments)
    runs = sorted(f"{'_'.join(arguments[3:])}_seed={seed}".replace("/", "_") for seed in (1, 2))
    while not (tmp_path / runs[0] / "checkpoint.pt").exists():  # its first epoch is saved
        assert first.poll() is None, first.communicate()
        time.sleep(0.5)
    first.send_signal(signal.SIGTERM)
    code, out, _ = finish(first)
    assert code == 1 and "sweep stopped by SIGTERM" in out
    assert status(tmp_path / runs[0]) == "INTERRUPTED" and not (tmp_path / runs[1]).exists()
    code, out, err = finish(sweep(tmp_path, *arguments))
    assert code == 0, out + err
    assert f"resume   {runs[0]}.r2" in out and f"start    {runs[1]}" in out
    assert status(tmp_path / f"{runs[0]}.r2") == status(tmp_path / runs[1]) == "COMPLETED"
    code, out, _ = finish(sweep(tmp_path, *arguments))
    assert code == 0 and out.count("done") == 2 and not re.search(r"^(start|resume) ", out, flags=re.M)
    report = subprocess.run(
        [sys.executable, "-m", "utils.report", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert "2 completed runs in 1 row(s)" in report.stdout, report.stdout + report.stderr
