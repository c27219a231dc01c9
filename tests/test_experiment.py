"""experiment.py end to end: the seed command lines, the -F directory, determinism, the digits default."""

import json
import re

import pytest
import torch

from tests.conftest import SHRINK, run_script

SEED_COMMANDS = {
    "cub": "with dataset.cub",
    "cub_resnet50": "with dataset.cub model.resnet50 epochs=30 lr=0.02",
    "cars": "with dataset.cars model.resnet50 epochs=100 lr=0.05 model.norm_layer=batch",
    "sop": "with dataset.sop model.resnet50 epochs=100 lr=0.003 momentum=0.99 nesterov=True model.norm_layer=batch",
    "inshop": "with dataset.inshop model.resnet50 epochs=100 lr=0.003 momentum=0.99 nesterov=True "
              "model.norm_layer=batch",
}
EPOCH_LINE = re.compile(r"Epoch +(\d+) \| cosine +\| R@1 ([0-9.]+)")


def cosine_r1_by_epoch(stdout: str) -> dict[int, float]:
    return {int(epoch): float(r1) for epoch, r1 in EPOCH_LINE.findall(stdout)}


@pytest.mark.parametrize("name", SEED_COMMANDS)
def test_seed_command_runs_on_a_standin(name, standins, torch_home):
    dataset = name.split("_")[0]
    args = ["experiment.py", *SEED_COMMANDS[name].split(), f"dataset.data_path={standins[dataset]}", *SHRINK]
    result = run_script(args, torch_home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(cosine_r1_by_epoch(result.stdout)) == {0, 1}
    assert "Best epoch" in result.stdout


def test_file_observer_directory(tmp_path, standins, torch_home):
    result_dir = tmp_path / "result_dir"
    args = ["experiment.py", "-F", str(result_dir), "with", "dataset.cub", f"dataset.data_path={standins['cub']}",
            *SHRINK]
    result = run_script(args, torch_home)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = result_dir / "1"
    files = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "run.json", "info.json", "metrics.json", "cout.txt", "checkpoint.pt"} <= files

    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"]["name"] == "cub" and config["model"]["arch"] == "resnet18"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "COMPLETED"
    info = json.loads((run_dir / "info.json").read_text())
    assert run["result"] == info["metrics"]["cosine/R@1"]
    assert {"l2/R@1", "l2/R@2", "cosine/R@1", "cosine/R@2"} <= set(info["metrics"])
    assert "checkpoint.pt" in run["artifacts"]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval.cosine/R@1"]["steps"] == [0, 1]
    assert len(metrics["train.loss"]["values"]) == len(metrics["train.accuracy"]["values"]) > 0
    cout = (run_dir / "cout.txt").read_text()
    assert "Epoch   1 | cosine" in cout and "\r" not in cout

    state = torch.load(run_dir / "checkpoint.pt")
    assert "classifier.linear.weight" in state and "backbone.1.0.weight" in state


def test_digits_default_is_deterministic(tmp_path):
    """Same seed, same machine, CPU: the same metrics (the default command, shortened to one epoch)."""
    command = ["experiment.py", "with", "epochs=1", "dataset.num_iterations=5", "cpu=True", f"temp_dir={tmp_path}"]
    runs = [run_script(command) for _ in range(2)]
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
        assert set(cosine_r1_by_epoch(result.stdout)) == {0, 1}
        assert "Epoch   1 | l2     | R@1" in result.stdout
    assert cosine_r1_by_epoch(runs[0].stdout) == cosine_r1_by_epoch(runs[1].stdout)
    lines = [[line for line in r.stdout.splitlines() if line.startswith("Epoch")] for r in runs]
    assert lines[0] == lines[1]
