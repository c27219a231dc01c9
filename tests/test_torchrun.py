"""torchrun on the CPU (gloo): 2 processes leave one -F run directory, two local 'nodes' train together, and a
run resumes under another number of processes with the global batch unchanged."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, digits_updates

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *arguments]


def training(observed: Path, digits_path: Path, *extra: str) -> list[str]:
    return [str(REPO / "experiment.py"), "-F", str(observed), "with", "cpu=True", *digits_updates(digits_path),
            *extra]


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_leave_one_run_directory(digits_path, tmp_path):
    observed = tmp_path / "runs"
    done = run(torchrun("--nproc_per_node=2", f"--master_port={free_port()}",
                        *training(observed, digits_path, "epochs=1")))
    assert sorted(path.name for path in observed.iterdir() if path.name != "_sources") == ["1"]
    assert json.loads((observed / "1" / "run.json").read_text())["status"] == "COMPLETED"
    assert done.stdout.count("Best epoch 1") + done.stdout.count("Best epoch 0") == 1  # rank 0 prints, alone
    assert (observed / "1" / "checkpoint.pt").is_file() and (observed / "1" / "retrieval.png").is_file()


def test_two_local_nodes_train_together(digits_path, tmp_path):
    observed, port = tmp_path / "runs", free_port()
    nodes = [subprocess.Popen(torchrun("--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                                       "--master_addr=127.0.0.1", f"--master_port={port}",
                                       *training(observed, digits_path, "epochs=1")),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ, cwd=REPO)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert sorted(path.name for path in observed.iterdir() if path.name != "_sources") == ["1"]
    assert "Best epoch" in outputs[0][0] and "Best epoch" not in outputs[1][0]


def test_resume_under_another_number_of_processes(digits_path, tmp_path):
    observed = tmp_path / "runs"
    run(torchrun("--nproc_per_node=2", f"--master_port={free_port()}", *training(observed, digits_path, "epochs=1")))
    run([sys.executable, *training(observed, digits_path, "epochs=2", f"resume={observed / '1'}")])
    run(torchrun("--nproc_per_node=2", f"--master_port={free_port()}",
                 *training(observed, digits_path, "epochs=3", f"resume={observed / '2'}")))
    infos = [json.loads((observed / str(i) / "info.json").read_text()) for i in (2, 3)]
    assert all("metrics" in info for info in infos)
    metrics = json.loads((observed / "3" / "metrics.json").read_text())
    assert metrics["eval.cosine/R@1"]["steps"] == [3]  # only the epoch it trained
