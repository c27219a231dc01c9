"""A run's checkpoint and pictures reach every sacred observer as artifacts (the -F records list them without a second
copy; an observer of another kind receives the files), and -m without pymongo is one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sacred.observers import RunObserver

from tests.conftest import digits_updates
from utils.engine.checkpoint import CHECKPOINT

REPO = Path(__file__).resolve().parent.parent


class ReceivedFiles(RunObserver):
    """An observer of another kind than -F's, such as sacred's MongoDB one: it keeps each artifact's bytes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        self.files[name] = Path(filename).read_bytes()


@pytest.fixture
def received(experiment) -> ReceivedFiles:
    """A ReceivedFiles observing the runs of experiment.py (in this process, as the experiment fixture runs it)."""
    from experiment import ex

    observer = ReceivedFiles()
    ex.observers.append(observer)
    yield observer
    ex.observers.remove(observer)


def test_a_run_hands_its_checkpoint_and_pictures_to_every_observer(digits_path, experiment, received, tmp_path):
    outcome = experiment(f"-F {tmp_path / 'runs'} with epochs=1", *digits_updates(digits_path))
    assert outcome.code == 0, outcome.err
    folder = tmp_path / "runs" / "1"
    expected = {"curves.png", "retrieval.png", CHECKPOINT}
    assert set(json.loads((folder / "run.json").read_text())["artifacts"]) == expected
    # The -F observer left the files it lists where the run wrote them: one copy each, nothing beside the records.
    assert {path.name for path in (tmp_path / "runs").iterdir()} == {"1", "_sources"}
    assert {path.name for path in folder.iterdir()} == expected | {
        "config.json",
        "cout.txt",
        "info.json",
        "metrics.json",
        "run.json",
    }
    # The other observer received the files as they are in the run's folder.
    assert received.files == {name: (folder / name).read_bytes() for name in expected}


def test_checkpoint_artifact_false_hands_the_pictures_only(digits_path, experiment, received, tmp_path):
    outcome = experiment("with epochs=1 checkpoint_artifact=False", *digits_updates(digits_path))
    assert outcome.code == 0, outcome.err
    (folder,) = [path for path in tmp_path.iterdir() if path.name.startswith("small_cnn_digits_")]
    assert set(received.files) == {"curves.png", "retrieval.png"}
    assert (folder / CHECKPOINT).exists()  # written all the same, for evaluate and resume


def test_an_autoencoder_run_hands_over_its_reconstructions_too(digits_path, autoencoder_experiment, tmp_path):
    outcome = autoencoder_experiment(
        f"-F {tmp_path / 'runs'} with vae.ae epochs=1",
        f"dataset.data_path={digits_path}",
        "dataset.train_file=train_small.txt",
        "dataset.test_file=test_small.txt",
        "dataset.batch_size=32",
        "vae.hidden_dims=[8,16]",
        "vae.latent_dim=8",
    )
    assert outcome.code == 0, outcome.err
    record = json.loads((tmp_path / "runs" / "1" / "run.json").read_text())
    assert set(record["artifacts"]) == {"curves.png", "reconstructions.png", "retrieval.png", CHECKPOINT}


def test_mongo_observer_without_pymongo_is_one_line(tmp_path):
    # Whether or not pymongo is installed here, a module of that name that cannot be imported stands in for it.
    (tmp_path / "pymongo.py").write_text("raise ModuleNotFoundError(\"No module named 'pymongo'\", name='pymongo')\n")
    done = subprocess.run(
        [sys.executable, "experiment.py", "-m", "localhost:27017", "with", "epochs=1"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "utils.errors.InputError: -m (sacred's MongoDB observer) needs pymongo, which is not installed: "
        "`pip install -r requirements-mongo.txt`, or leave -m out"
    )
    assert done.stdout == ""
