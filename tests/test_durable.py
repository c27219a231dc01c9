"""Durable runs, with real processes, real signals and a real small filesystem: a stopped run resumed with
resume=<its run directory> ends with exactly the metrics of the same run left uninterrupted (the oracle)."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import REPO, assert_input_error
from utils.engine.training import NonFiniteStep, train_one_epoch
from utils.reporting.sacred_run import save_json_atomically

# Digits' small splits, 40 balanced batches of 20 per epoch, Metrix on: long enough epochs to stop mid-way.
RUN = [
    "dataset.train_file=train_small.txt",
    "dataset.test_file=test_small.txt",
    "dataset.batch_size=20",
    "dataset.sampler=balanced",
    "dataset.images_per_class=4",
    "dataset.num_iterations=40",
    "epochs=3",
    "loss.contrastive",
    "metrix.feature",
    "evaluation.final_metrics=['recall','map_at_r']",
    "cpu=True",
]


def run_words(digits_path: Path, *extra: str) -> list[str]:
    return [*RUN, f"dataset.data_path={digits_path}", *extra]


@pytest.fixture(scope="module")
def uninterrupted(digits_path, tmp_path_factory) -> dict:
    """The final metrics of the run left alone, as a subprocess like the interrupted ones."""
    observed = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run(
        [sys.executable, str(REPO / "experiment.py"), "-F", str(observed), "with", *run_words(digits_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
    )
    assert done.returncode == 0, done.stderr
    return json.loads((observed / "1" / "info.json").read_text())["metrics"]


def start(observed: Path, words: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "experiment.py"), "-F", str(observed), "with", *words]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint goes on from (0 when there is none yet); it is always complete on disk."""
    return torch.load(path, weights_only=True)["epoch"] if path.exists() else 0


def final_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "info.json").read_text())["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_stops_cleanly_and_resuming_ends_like_the_uninterrupted_run(
    stop, digits_path, uninterrupted, experiment, tmp_path
):
    observed = tmp_path / "runs"
    log = tmp_path / "log.txt"
    process = start(observed, run_words(digits_path), log)
    # In the middle of epoch 2: its progress bar (on stderr, in the log) shows 5 of its 40 steps done.
    wait_for(
        lambda: re.search(r"Training   \[002\]:[^\r]*\b([5-9]|[1-3]\d)/40", log.read_text(errors="replace")), process
    )
    process.send_signal(stop)
    assert process.wait(timeout=120) == 1
    last = log.read_text(errors="replace").strip().splitlines()[-1]
    assert last.startswith(f"utils.errors.RunInterrupted: stopped by {stop.name}")
    assert f"continue with `resume={observed.resolve() / '1'}`" in last
    run = json.loads((observed / "1" / "run.json").read_text())
    assert run["status"] == "INTERRUPTED"
    cout = (observed / "1" / "cout.txt").read_text()
    assert "Epoch   1 | cosine" in cout and "Train   1 |" in cout  # the captured output is complete
    checkpoint = torch.load(observed / "1" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and 5 <= checkpoint["iteration"] < 40  # mid-epoch

    outcome = experiment(f"-F {observed} with", *run_words(digits_path), f"resume={observed / '1'}")
    assert outcome.code == 0, outcome.err
    assert (
        f"Resumed from {observed / '1'}: epoch {checkpoint['epoch']}, iteration {checkpoint['iteration']}"
        in outcome.out
    )
    assert final_metrics(observed / "2") == uninterrupted


@pytest.mark.slow
def test_sigkill_loses_only_the_work_since_the_last_checkpoint(digits_path, uninterrupted, experiment, tmp_path):
    observed = tmp_path / "runs"
    process = start(observed, run_words(digits_path), tmp_path / "log.txt")
    wait_for(lambda: checkpoint_epoch(observed / "1" / "checkpoint.pt") == 2, process)  # epoch 1 is complete
    process.kill()
    process.wait(timeout=60)
    outcome = experiment(f"-F {observed} with", *run_words(digits_path), f"resume={observed / '1'}")
    assert outcome.code == 0, outcome.err
    assert final_metrics(observed / "2") == uninterrupted


@pytest.mark.slow
def test_a_corrupt_image_mid_run_keeps_the_last_epoch_and_resuming_loses_nothing(
    digits_path, uninterrupted, experiment, tmp_path
):
    data = tmp_path / "digits"
    shutil.copytree(digits_path, data)
    words = run_words(data, "dataset.preload=False")
    image = data / (data / "train_small.txt").read_text().split(",", 1)[0]
    original = image.read_bytes()
    observed = tmp_path / "runs"
    log = tmp_path / "log.txt"
    process = start(observed, words, log)
    wait_for(lambda: checkpoint_epoch(observed / "1" / "checkpoint.pt") == 2, process)
    image.write_bytes(b"not an image")
    assert process.wait(timeout=120) == 1
    assert f"image {image} cannot be read" in log.read_text(errors="replace").strip().splitlines()[-1]
    assert json.loads((observed / "1" / "run.json").read_text())["status"] == "FAILED"
    assert checkpoint_epoch(observed / "1" / "checkpoint.pt") == 2  # the last complete epoch survives

    image.write_bytes(original)
    outcome = experiment(f"-F {observed} with", *words, f"resume={observed / '1'}")
    assert outcome.code == 0, outcome.err
    assert final_metrics(observed / "2") == uninterrupted


def test_a_nonfinite_loss_fails_the_run_and_keeps_the_last_good_checkpoint(digits_path, experiment, tmp_path):
    observed = tmp_path / "runs"
    outcome = experiment(
        f"-F {observed} with", *run_words(digits_path, "optimizer=sgd", "lr=1e38", "checkpoint_every=1")
    )
    last = outcome.err.strip().splitlines()[-1]
    assert outcome.code == 1 and "Traceback" not in outcome.err
    assert last.startswith("utils.errors.RunFailed: non-finite loss or gradient at epoch 1, iteration ")
    assert "mixed_contrastive=" in last and f"the last good checkpoint is {observed.resolve() / '1'}" in last
    failed_at = int(last.split("iteration ")[1].split(" ")[0])
    checkpoint = torch.load(observed / "1" / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == failed_at - 1  # written after the last good step
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values() if value.is_floating_point())
    assert json.loads((observed / "1" / "run.json").read_text())["status"] == "FAILED"


def cross_entropy_words(digits_path: Path, *extra: str) -> list[str]:
    """RUN with the default loss (cross-entropy, no Metrix): at lr=1e30 an update overflows the weights while the
    loss is still finite."""
    return [word for word in run_words(digits_path, *extra) if word not in ("loss.contrastive", "metrix.feature")]


def finite(state: dict) -> bool:
    return all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())


def test_overflowing_weights_are_never_checkpointed(digits_path, experiment, tmp_path):
    observed = tmp_path / "runs"
    words = cross_entropy_words(digits_path, "optimizer=sgd", "lr=1e30", "scheduler=constant", "checkpoint_every=1")
    outcome = experiment(f"-F {observed} with", *words)
    last = outcome.err.strip().splitlines()[-1]
    assert outcome.code == 1 and "Traceback" not in outcome.err
    assert last.startswith("utils.errors.RunFailed: non-finite weights at epoch 1, iteration ")
    assert f"the last good checkpoint is {observed.resolve() / '1' / 'checkpoint.pt'}" in last
    checkpoint = torch.load(observed / "1" / "checkpoint.pt", weights_only=True)
    assert f"iteration {checkpoint['iteration'] + 1} " in last  # written after the last step with finite weights
    assert finite(checkpoint["model"]) and finite(checkpoint["objective"])
    assert json.loads((observed / "1" / "run.json").read_text())["status"] == "FAILED"
    # What was printed before the failure is kept, though sacred's capture was closed before its last read.
    assert "Epoch   0 | cosine" in (observed / "1" / "cout.txt").read_text()


def test_overflowing_weights_stop_before_the_evaluation(digits_path, experiment, tmp_path):
    """With nonfinite=skip the steps whose loss is NaN are skipped, but an earlier update already overflowed."""
    words = cross_entropy_words(digits_path, "optimizer=sgd", "lr=1e30", "scheduler=constant", "nonfinite=skip")
    outcome = experiment(f"-F {tmp_path} with", *words)
    last = outcome.err.strip().splitlines()[-1]
    assert outcome.code == 1 and "Traceback" not in outcome.err
    assert last.startswith("utils.errors.RunFailed: non-finite weights at the end of epoch 1")
    assert "no checkpoint was written yet: lower lr and run again" in last and "resume" not in last


def test_a_nonfinite_loss_before_any_checkpoint_says_to_run_again(digits_path, experiment, tmp_path):
    words = cross_entropy_words(digits_path, "optimizer=sgd", "lr=1e30", "scheduler=constant")
    outcome = experiment(f"-F {tmp_path} with", *words)
    last = outcome.err.strip().splitlines()[-1]
    assert outcome.code == 1 and "Traceback" not in outcome.err
    assert last.startswith("utils.errors.RunFailed: non-finite loss or gradient at epoch 1")
    assert "no checkpoint was written yet: lower lr and run again" in last and "resume" not in last


class ScriptedObjective(nn.Module):
    """A loss that is NaN at chosen iterations: the training loop must stop there, or skip and count them."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        loss = model(images).square().mean() * (float("nan") if self.calls in self.bad else 1.0)
        self.calls += 1
        return loss, {"loss": loss.detach()}


@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_steps_stop_or_are_skipped_before_the_update(skip):
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)) for _ in range(5)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    before = [p.detach().clone() for p in model.parameters()]

    def train():
        return train_one_epoch(
            model, ScriptedObjective({0, 3}), batches, optimizer, schedule, torch.device("cpu"), 1, skip_nonfinite=skip
        )

    if not skip:
        with pytest.raises(NonFiniteStep) as stopped:
            train()
        assert stopped.value.iteration == 0
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no update
    else:
        history, counters = train()
        assert counters["skipped"] == 2 and counters["iterations"] == 5 and len(history["loss"]) == 3
        assert all(torch.isfinite(p).all() for p in model.parameters())


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'mount failed'})")


@pytest.fixture
def small_filesystem(tmp_path):
    mounted = []

    def make(size: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def test_no_room_for_checkpoints_is_refused_before_training(digits_path, experiment, small_filesystem):
    disk = small_filesystem("8m")
    outcome = experiment(f"-F {disk} with", *run_words(digits_path))
    assert_input_error(outcome, f"the output folder {disk / '1'} has", "MiB free", "needs room for 3")
    assert "Train " not in outcome.out


@pytest.mark.slow
def test_a_full_disk_during_the_run_fails_it_and_keeps_no_broken_checkpoint(digits_path, small_filesystem, tmp_path):
    disk = small_filesystem("80m")
    log = tmp_path / "log.txt"
    process = start(disk, run_words(digits_path), log)
    wait_for(lambda: "Epoch   0 |" in log.read_text(errors="replace"), process)
    with open(disk / "filler", "wb") as filler:  # another job fills the disk
        try:
            while True:
                filler.write(b"\0" * 2**20)
        except OSError:
            pass
    assert process.wait(timeout=300) == 1
    last = log.read_text(errors="replace").strip().splitlines()[-1]
    assert last.startswith(f"utils.errors.RunFailed: could not write the checkpoint {disk.resolve() / '1'}")
    (disk / "filler").unlink()
    # run.json is never truncated: FAILED where the disk had room for it, else the last complete heartbeat's.
    assert json.loads((disk / "1" / "run.json").read_text())["status"] in ("FAILED", "RUNNING")
    assert not list((disk / "1").glob("checkpoint.pt*")) and not list((disk / "1").glob("*.tmp"))


def test_run_json_is_replaced_whole_or_not_at_all(small_filesystem):
    """sacred rewrote run.json in place; on a full disk that left a truncated file (seen in the test above)."""
    disk = small_filesystem("1m")
    save_json_atomically(str(disk), {"status": "RUNNING"}, "run.json")
    with open(disk / "filler", "wb", buffering=0) as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 2**16)
    with pytest.raises(OSError):
        save_json_atomically(str(disk), {"status": "FAILED", "fail_trace": ["x" * 2**16]}, "run.json")
    assert json.loads((disk / "run.json").read_text()) == {"status": "RUNNING"}
    assert sorted(path.name for path in disk.iterdir()) == ["filler", "run.json"]


def test_an_unwritable_output_folder_is_refused_before_training(digits_path, experiment, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    outcome = experiment("with", *run_words(digits_path), f"output_dir={blocker / 'runs'}")
    assert_input_error(outcome, "cannot write in the output folder", str(blocker / "runs"), "output_dir=")


@pytest.fixture(scope="module")
def finished_run(digits_path, tmp_path_factory) -> Path:
    observed = tmp_path_factory.mktemp("finished")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiment.py"),
            "-F",
            str(observed),
            "with",
            *run_words(digits_path, "epochs=1", "dataset.num_iterations=3"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
    )
    assert done.returncode == 0, done.stderr
    return observed / "1"


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (["lr=0.5"], ["lr=0.5 (checkpoint: 0.001)", "would change the training"]),
        (["loss.margin=0.3", "seed=4"], ["loss.margin=0.3 (checkpoint: 0.5)", "seed=4 (checkpoint: 0)"]),
        (["epochs=0"], ["epochs=0 but the checkpoint has done 1"]),
    ],
)
def test_resume_refuses_settings_that_change_the_training(change, fragments, finished_run, digits_path, experiment):
    words = run_words(digits_path, "epochs=1", "dataset.num_iterations=3", *change, f"resume={finished_run}")
    assert_input_error(experiment("with", *words), *fragments)


def test_resume_extends_a_finished_run(finished_run, digits_path, experiment, tmp_path):
    words = run_words(
        digits_path, "epochs=2", "dataset.num_iterations=3", "evaluation.backend=torch", f"resume={finished_run}"
    )
    outcome = experiment(f"-F {tmp_path} with", *words)
    assert outcome.code == 0, outcome.err
    assert "Resumed from" in outcome.out and "epoch 2, iteration 0" in outcome.out and "Train   2 |" in outcome.out


def test_resume_alone_continues_with_the_checkpoints_settings(finished_run, experiment, tmp_path):
    """Nothing but resume=: every setting is the checkpoint's (not the config's defaults, such as 30 epochs), and a
    typed one still wins."""
    outcome = experiment(f"-F {tmp_path} with", f"resume={finished_run}", "evaluation.backend=torch")
    assert outcome.code == 0, outcome.err
    saved = json.loads((finished_run / "config.json").read_text())
    resumed = json.loads((tmp_path / "1" / "config.json").read_text())
    assert resumed["epochs"] == 1 and resumed["evaluation"]["backend"] == "torch"
    for key in ("epochs", "dataset", "model", "loss", "lr", "seed"):
        if key != "evaluation":
            assert resumed[key] == saved[key], key


def test_checkpoints_keep_format_1(finished_run):
    """Checkpoints written before the schema had one owner (FORMAT 1) hold exactly these keys: they still load.
    The early-stopping counter came later, within FORMAT 1: a checkpoint without it resumes with 0
    (tests/test_protocol.py)."""
    checkpoint = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    assert checkpoint["format"] == 1 and set(checkpoint) == {
        *("format", "epoch", "iteration", "iterations", "model", "objective", "optimizer", "scheduler", "scaler"),
        *("best", "rng", "config", "code", "rebuild", "curves"),
    }
    assert set(checkpoint["best"]) == {"epoch", "metrics", "model", "stale_evaluations"}
    assert checkpoint["code"]["name"] == "metric_learning" and checkpoint["code"]["mainfile"] == "experiment.py"


def test_resume_refuses_a_checkpoint_without_the_training_state(finished_run, digits_path, experiment, tmp_path):
    """What another version of the code wrote: its best weights are there, not all that training needs."""
    checkpoint = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    del checkpoint["scaler"], checkpoint["rng"]
    torch.save(checkpoint, tmp_path / "older.pt")
    words = run_words(digits_path, "epochs=2", "dataset.num_iterations=3", f"resume={tmp_path / 'older.pt'}")
    assert_input_error(
        experiment("with", *words), "lacks scaler, rng (written by another version of the code)", "resume= cannot"
    )


def test_resume_names_the_sources_that_changed(finished_run, digits_path, experiment, tmp_path):
    checkpoint = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    checkpoint["code"]["sources"] = [
        [path, "_sources/older.py" if path == "losses/criterion.py" else stored]
        for path, stored in checkpoint["code"]["sources"]
    ]
    torch.save(checkpoint, tmp_path / "older.pt")
    words = run_words(digits_path, "epochs=2", "dataset.num_iterations=3", f"resume={tmp_path / 'older.pt'}")
    outcome = experiment(f"-F {tmp_path / 'runs'} with", *words)
    assert outcome.code == 0, outcome.err
    assert "resume: these sources differ from the checkpoint's code: losses/criterion.py\n" in outcome.out


@pytest.mark.parametrize("content", ["weights only", "garbage", "missing"])
def test_resume_refuses_what_is_not_a_checkpoint(content, digits_path, experiment, tmp_path):
    path = tmp_path / "checkpoint.pt"
    if content == "weights only":  # what runs wrote before they could resume
        torch.save(nn.Linear(2, 2).state_dict(), path)
        expected = "holds only weights"
    elif content == "garbage":
        path.write_bytes(b"\x00not a checkpoint")
        expected = "cannot be read as a checkpoint"
    else:
        expected = "no checkpoint there"
    outcome = experiment("with", *run_words(digits_path), f"resume={path}")
    assert_input_error(outcome, expected)


def test_a_signal_during_the_final_evaluation_lets_it_finish(digits_path, experiment, tmp_path, monkeypatch):
    """The training is done and checkpointed; a scheduler's signal then must not end the process unmarked."""
    from utils.evaluation.ingredient import Evaluator

    evaluate = Evaluator.__call__

    def signalled(self, embed, metrics):
        if "map_at_r" in metrics:  # only the final evaluation computes it (RUN's final_metrics)
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(self, embed, metrics)

    def unhandled(signum, frame):  # what the process would do without the run's handler: end, unmarked
        raise AssertionError("the signal reached the process's own handler")

    monkeypatch.setattr(Evaluator, "__call__", signalled)
    previous = signal.signal(signal.SIGINT, unhandled)
    try:
        observed = tmp_path / "runs"
        outcome = experiment(f"-F {observed} with", *run_words(digits_path, "epochs=1", "dataset.num_iterations=3"))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert outcome.code == 0, outcome.err
    assert json.loads((observed / "1" / "run.json").read_text())["status"] == "COMPLETED"
    assert "cosine/MAP@R" in final_metrics(observed / "1")


def test_the_end_of_a_run_says_where_its_results_are(digits_path, experiment, tmp_path):
    outcome = experiment(
        "with", *run_words(digits_path, "epochs=1", "dataset.num_iterations=3"), f"output_dir={tmp_path}"
    )
    assert outcome.code == 0, outcome.err
    directory = next(tmp_path.iterdir())
    assert directory.name.startswith("small_cnn_digits_")
    assert f"results in {directory} (checkpoint.pt, curves.png, retrieval.png)" in outcome.out
    assert {path.name for path in directory.iterdir()} == {"checkpoint.pt", "curves.png", "retrieval.png"}
