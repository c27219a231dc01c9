"""After training: evaluate and embed with a checkpoint, and the pieces used in a plain PyTorch loop."""

import contextlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.ingredient import rebuild_model
from tests.conftest import assert_input_error, digits_updates
from utils.data.images import load_image
from utils.data.transforms import build_transforms
from utils.engine.checkpoint import best_model


@pytest.fixture(scope="module")
def finished(digits_path, tmp_path_factory) -> Path:
    """A short -F run of the digits default on the small splits."""
    from experiment import ex

    observed = tmp_path_factory.mktemp("finished")
    ex.run_commandline(["experiment.py", "-F", str(observed), "with", "epochs=2", *digits_updates(digits_path)])
    return observed / "1"


def test_evaluate_reproduces_the_runs_final_numbers(finished, experiment):
    outcome = experiment(f"evaluate with checkpoint={finished}")
    assert outcome.code == 0, outcome.err
    recorded = json.loads((finished / "info.json").read_text())
    assert outcome.run.info["metrics"] == recorded["metrics"]
    assert outcome.run.result == json.loads((finished / "run.json").read_text())["result"]
    assert f"Best  {recorded['best_epoch']:3d} | cosine" in outcome.out


def test_evaluate_takes_other_evaluation_settings(finished, experiment):
    outcome = experiment(
        f"evaluate with checkpoint={finished}",
        "evaluation.backend=torch",
        "evaluation.final_metrics=['recall']",
        "evaluation.recalls=[1,3]",
    )
    assert outcome.code == 0, outcome.err
    recorded = json.loads((finished / "info.json").read_text())["metrics"]
    assert set(outcome.run.info["metrics"]) == {f"{d}/R@{k}" for d in ("l2", "cosine") for k in (1, 3)}
    assert outcome.run.info["metrics"]["cosine/R@1"] == recorded["cosine/R@1"]


@pytest.fixture(scope="module")
def autoencoder_finished(digits_path, tmp_path_factory) -> Path:
    """A short -F run of the VAE on the small digits splits."""
    from autoencoder_experiment import ex

    observed = tmp_path_factory.mktemp("autoencoder")
    tiny = ["vae.hidden_dims=[8,16,32]", "vae.latent_dim=8", "epochs=1"]
    ex.run_commandline(
        ["autoencoder_experiment.py", "-F", str(observed), "with", "vae.vae", *tiny, *digits_updates(digits_path)]
    )
    return observed / "1"


def test_autoencoder_evaluate_reproduces_the_runs_final_numbers(autoencoder_finished, autoencoder_experiment):
    outcome = autoencoder_experiment(f"evaluate with checkpoint={autoencoder_finished}")
    assert outcome.code == 0, outcome.err
    assert outcome.run.info["metrics"] == json.loads((autoencoder_finished / "info.json").read_text())["metrics"]


def test_a_checkpoint_of_the_other_experiment_is_refused_naming_its_script(
    finished, autoencoder_finished, experiment, autoencoder_experiment, tmp_path
):
    outcome = experiment(f"embed with checkpoint={autoencoder_finished} images={tmp_path} out={tmp_path / 'e.npz'}")
    assert_input_error(
        outcome,
        "was written by autoencoder_experiment.py (experiment 'autoencoder')",
        "python autoencoder_experiment.py",
    )
    outcome = autoencoder_experiment(f"evaluate with checkpoint={finished}")
    assert_input_error(outcome, "was written by experiment.py (experiment 'metric_learning')", "python experiment.py")


def test_evaluate_needs_only_the_best_weights_of_a_checkpoint(finished, experiment, tmp_path):
    """A checkpoint without the training state (another code version's) still serves evaluate; one without its best
    weights is refused in one line."""
    checkpoint = torch.load(finished / "checkpoint.pt", weights_only=True)
    for key in ("scaler", "rng", "optimizer"):
        del checkpoint[key]
    torch.save(checkpoint, tmp_path / "weights.pt")
    outcome = experiment(f"evaluate with checkpoint={tmp_path / 'weights.pt'}")
    assert outcome.code == 0, outcome.err
    assert outcome.run.info["metrics"] == json.loads((finished / "info.json").read_text())["metrics"]
    del checkpoint["rebuild"]
    torch.save(checkpoint, tmp_path / "broken.pt")
    outcome = experiment(f"evaluate with checkpoint={tmp_path / 'broken.pt'}")
    assert_input_error(outcome, "lacks rebuild (written by another version of the code)", "checkpoint= cannot")


def test_evaluate_needs_a_checkpoint(experiment):
    assert_input_error(experiment("evaluate with"), "needs checkpoint=PATH")


def test_embed_a_folder_of_images(finished, experiment, digits_path, tmp_path):
    folder = tmp_path / "mine"
    (folder / "more").mkdir(parents=True)
    sources = sorted((digits_path / "images").glob("*.png"))[:5]
    for i, source in enumerate(sources):
        Image.open(source).save(folder / ("more" if i % 2 else "") / f"{i}.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "embeddings.npz"

    stopped = experiment(f"embed with checkpoint={finished} images={folder} out={out}")
    assert_input_error(stopped, f"image {folder / 'broken.png'} cannot be read")
    assert not out.exists()

    outcome = experiment(f"embed with checkpoint={finished} images={folder} out={out} bad_images=skip")
    assert outcome.code == 0, outcome.err
    saved = np.load(out)
    paths = sorted(str(path) for path in folder.rglob("*.jpg"))
    assert sorted(saved["paths"]) == paths and list(saved["skipped"]) == [str(folder / "broken.png")]
    assert (saved["labels"] == -1).all() and saved["embeddings"].dtype == np.float32
    # The oracle: the checkpoint's model on the test transform of the run's data set, image by image.
    checkpoint = torch.load(finished / "checkpoint.pt", weights_only=True)
    model = best_model(checkpoint, rebuild_model).eval()
    data = checkpoint["config"]["dataset"]
    _, transform = build_transforms(data["crop_size"], data["resize"], data["scale"], data["ratio"], None, None, False)
    for path, embedding in zip(saved["paths"], saved["embeddings"], strict=True):
        with torch.no_grad():
            expected = model(transform(load_image(Path(path)))[None])[0]
        np.testing.assert_allclose(embedding, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_embed_a_split_file_keeps_its_labels(finished, experiment, digits_path, tmp_path):
    out = tmp_path / "test"
    outcome = experiment(f"embed with checkpoint={finished} images={digits_path / 'test_small.txt'} out={out}")
    assert outcome.code == 0, outcome.err
    saved = np.load(tmp_path / "test.npz")
    lines = (digits_path / "test_small.txt").read_text().splitlines()
    assert list(saved["labels"]) == [int(line.rsplit(",", 1)[1]) for line in lines]
    assert len(saved["embeddings"]) == len(lines)


def copy_digits(digits_path: Path, folder: Path, names: list[str]) -> None:
    """Digits images saved in folder under names (the first ones of the set, as JPEG)."""
    folder.mkdir(parents=True, exist_ok=True)
    for source, name in zip(sorted((digits_path / "images").glob("*.png")), names, strict=False):
        Image.open(source).save(folder / name, format="JPEG")


def test_embed_refuses_what_is_not_a_regular_file(finished, experiment, digits_path, tmp_path):
    """A FIFO named like an image would block the command forever on its first read."""
    folder = tmp_path / "mine"
    copy_digits(digits_path, folder, ["0.jpg", "1.jpg"])
    os.mkfifo(folder / "pipe.jpg")
    out = tmp_path / "e.npz"
    stopped = experiment(f"embed with checkpoint={finished} images={folder} out={out}")
    assert_input_error(stopped, f"image {folder / 'pipe.jpg'} is not a regular file")
    assert not out.exists()
    outcome = experiment(f"embed with checkpoint={finished} images={folder} out={out} bad_images=skip")
    assert outcome.code == 0, outcome.err
    saved = np.load(out)
    assert list(saved["skipped"]) == [str(folder / "pipe.jpg")] and len(saved["paths"]) == 2


def test_embed_into_a_folder_writes_embeddings_npz_there(finished, experiment, digits_path, tmp_path):
    copy_digits(digits_path, tmp_path / "mine", ["0.jpg", "1.jpg"])
    (tmp_path / "vectors").mkdir()
    outcome = experiment(f"embed with checkpoint={finished} images={tmp_path / 'mine'} out={tmp_path / 'vectors'}")
    assert outcome.code == 0, outcome.err
    assert len(np.load(tmp_path / "vectors" / "embeddings.npz")["paths"]) == 2
    assert not (tmp_path / "vectors.npz").exists()


def test_embed_prints_a_name_that_is_not_utf8(finished, experiment, digits_path, tmp_path):
    """The name is printed with its bad bytes escaped; cout.txt of the -F run keeps the command's output."""
    folder = tmp_path / "mine"
    copy_digits(digits_path, folder, ["0.jpg"])
    bad = Path(os.fsdecode(bytes(folder) + b"/caf\xe9.jpg"))
    bad.write_bytes(b"not an image")
    observed, out = tmp_path / "observed", tmp_path / "e.npz"
    outcome = experiment(f"embed -F {observed} with checkpoint={finished} images={folder} out={out} bad_images=skip")
    assert outcome.code == 0, outcome.err
    printed = f"Embedded 1 images into {out} ("
    skipped = f"; skipped 1 unreadable: {folder}/caf\\xe9.jpg"
    assert printed in outcome.out and skipped in outcome.out
    assert skipped in (observed / "1" / "cout.txt").read_text()
    assert [os.fsencode(name) for name in np.load(out)["skipped"]] == [os.fsencode(bad)]


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled up (mounting needs root: skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'mount failed'})")
    with open(disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"x" * 4096)
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_embed_on_a_full_disk_fails_in_one_line_leaving_nothing(finished, experiment, digits_path, tmp_path, full_disk):
    disk = full_disk
    copy_digits(digits_path, tmp_path / "mine", ["0.jpg", "1.jpg"])
    outcome = experiment(f"embed with checkpoint={finished} images={tmp_path / 'mine'} out={disk / 'e.npz'}")
    assert_input_error(outcome, f"out={disk / 'e.npz'}: cannot write it", "No space left on device")
    assert sorted(path.name for path in disk.iterdir()) == ["filler"]
