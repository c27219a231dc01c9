"""torchrun on the CPU (gloo): 2 processes leave one -F run directory (both experiments), two local 'nodes' train
together, a run resumes under another number of processes with the global batch unchanged, SIGTERM to torchrun
(a scheduler's preemption) stops every rank cleanly and the resumed run ends like the uninterrupted one, and a
corrupt image read by one rank ends every rank with that rank's message."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, digits_updates

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *arguments]


def training(observed: Path, digits_path: Path, *extra: str, script: str = "experiment.py") -> list[str]:
    return [str(REPO / script), "-F", str(observed), "with", "cpu=True", *digits_updates(digits_path), *extra]


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_status(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.mark.parametrize(("script", "extra"), [("experiment.py", ()), ("autoencoder_experiment.py", ("vae.ae",))])
def test_two_processes_leave_one_run_directory(script, extra, digits_path, tmp_path):
    observed = tmp_path / "runs"
    done = run(
        torchrun(
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            *training(observed, digits_path, "epochs=1", *extra, script=script),
        )
    )
    assert sorted(path.name for path in observed.iterdir() if path.name != "_sources") == ["1"]
    assert run_status(observed / "1")["status"] == "COMPLETED"
    assert done.stdout.count("Best epoch 1") + done.stdout.count("Best epoch 0") == 1  # rank 0 prints, alone
    assert (observed / "1" / "checkpoint.pt").is_file() and (observed / "1" / "retrieval.png").is_file()


def test_two_local_nodes_train_together(digits_path, tmp_path):
    observed, port = tmp_path / "runs", free_port()
    nodes = [
        subprocess.Popen(
            torchrun(
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                *training(observed, digits_path, "epochs=1"),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ,
            cwd=REPO,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert sorted(path.name for path in observed.iterdir() if path.name != "_sources") == ["1"]
    assert "Best epoch" in outputs[0][0] and "Best epoch" not in outputs[1][0]


def test_resume_under_another_number_of_processes(digits_path, tmp_path):
    observed = tmp_path / "runs"
    run(torchrun("--nproc_per_node=2", f"--master_port={free_port()}", *training(observed, digits_path, "epochs=1")))
    run([sys.executable, *training(observed, digits_path, "epochs=2", f"resume={observed / '1'}")])
    run(
        torchrun(
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            *training(observed, digits_path, "epochs=3", f"resume={observed / '2'}"),
        )
    )
    infos = [json.loads((observed / str(i) / "info.json").read_text()) for i in (2, 3)]
    assert all("metrics" in info for info in infos)
    metrics = json.loads((observed / "3" / "metrics.json").read_text())
    assert metrics["eval.cosine/R@1"]["steps"] == [3]  # only the epoch it trained


# 40 class-balanced global batches of 16 per epoch (2 classes whole on each rank), Metrix in feature mode.
LONG_EPOCHS = (
    "dataset.sampler=balanced",
    "dataset.images_per_class=4",
    "dataset.num_iterations=40",
    "epochs=2",
    "loss.contrastive",
    "metrix.feature",
    "lr=0.01",
    "evaluation.final_metrics=['recall','map_at_r']",
)


def test_sigterm_to_torchrun_stops_every_rank_and_resuming_ends_like_the_uninterrupted_run(digits_path, tmp_path):
    left_alone, stopped = tmp_path / "left_alone", tmp_path / "stopped"
    run(
        torchrun("--nproc_per_node=2", f"--master_port={free_port()}", *training(left_alone, digits_path, *LONG_EPOCHS))
    )
    log = (tmp_path / "stopped.txt").open("w")
    launcher = subprocess.Popen(
        torchrun("--nproc_per_node=2", f"--master_port={free_port()}", *training(stopped, digits_path, *LONG_EPOCHS)),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ,
        cwd=REPO,
    )
    checkpoint = stopped / "1" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not (checkpoint.exists() and torch.load(checkpoint, weights_only=True)["epoch"] == 2):  # in epoch 2
        assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "stopped.txt").read_text()
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # what a scheduler sends torchrun; torchrun passes it to every rank
    assert launcher.wait(timeout=120) != 0
    output = (tmp_path / "stopped.txt").read_text()
    assert run_status(stopped / "1")["status"] == "INTERRUPTED", output[-3000:]
    assert re.search(r"stopped by SIGTERM at epoch 2, iteration \d+; the checkpoint is", output), output[-3000:]
    run(
        torchrun(
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            *training(stopped, digits_path, *LONG_EPOCHS, f"resume={stopped / '1'}"),
        )
    )
    final = [torch.load(run_dir / "checkpoint.pt", weights_only=True) for run_dir in (left_alone / "1", stopped / "2")]
    assert final[0]["epoch"] == final[1]["epoch"] == 3
    for name, weight in final[0]["model"].items():
        assert torch.equal(weight, final[1]["model"][name]), name
    assert [(f["best"]["epoch"], f["best"]["metrics"]) for f in final] == [
        (final[0]["best"]["epoch"], final[0]["best"]["metrics"])
    ] * 2
    infos = [json.loads((run_dir / "info.json").read_text()) for run_dir in (left_alone / "1", stopped / "2")]
    assert infos[0]["metrics"] == infos[1]["metrics"]


@pytest.mark.parametrize("split", ["train_small.txt", "test_small.txt"])
def test_a_corrupt_image_on_one_rank_ends_every_rank_with_its_message(split, digits_path, tmp_path):
    """A training image (read by whichever rank draws it) or a test image in rank 1's shard of the evaluation:
    the healthy rank ends at once with the failed rank's line instead of waiting in a collective."""
    data = tmp_path / "digits"
    shutil.copytree(digits_path, data)
    lines = (data / split).read_text().splitlines()
    image = data / lines[-1 if split == "test_small.txt" else len(lines) // 2].split(",", 1)[0]
    image.write_bytes(b"not an image")
    observed = tmp_path / "runs"
    done = subprocess.run(
        torchrun(
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            *training(observed, data, "epochs=1", "dataset.preload=False"),
        ),
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ,
        cwd=REPO,
    )
    assert done.returncode != 0
    message = f"InputError: image {image} cannot be read"
    failed_rank = "1" if split == "test_small.txt" else "[01]"
    assert re.search(f"rank {failed_rank} failed: {re.escape(message)}", done.stderr), done.stderr[-3000:]
    status = run_status(observed / "1")
    assert status["status"] == "FAILED" and f"image {image} cannot be read" in status["fail_trace"][-1]
    assert "Connection closed" not in done.stderr


STOP_RANK_1 = """
import os, runpy, signal, sys, threading, time

import torch.distributed as dist


def stop_in_training() -> None:
    while not dist.is_initialized():
        time.sleep(0.05)
    time.sleep(2)  # into the first epoch's collectives
    os.kill(os.getpid(), signal.SIGSTOP)


if os.environ["RANK"] == "1":
    threading.Thread(target=stop_in_training, daemon=True).start()
sys.path.insert(0, os.path.dirname(sys.argv[1]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_stopped_rank_ends_the_run_after_dist_timeout_in_one_line(digits_path, tmp_path):
    """Rank 1 stops itself (SIGSTOP) while training: rank 0 gives up after dist_timeout seconds with one line
    instead of waiting torch's 30 minutes; torchrun then kills the stopped rank (after its 30 s of SIGTERM grace)."""
    wrapper = tmp_path / "stop_rank_1.py"
    wrapper.write_text(STOP_RANK_1)
    observed = tmp_path / "runs"
    command = torchrun(
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(wrapper),
        *training(observed, digits_path, "epochs=100", "dist_timeout=10"),
    )
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ, cwd=REPO)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert elapsed < 150, f"{elapsed:.0f} s"
    line = re.search(
        r"utils\.errors\.RunFailed: rank 0 of 2: a collective in \S+ \(\S+:\d+\) timed out .*", done.stderr
    )
    assert line, done.stderr[-3000:]
    assert "raise dist_timeout" in line.group(0) and "[rank0]: Traceback" not in done.stderr
    assert run_status(observed / "1")["status"] == "FAILED"
