"""Tiny stand-ins of the real data sets in their on-disk layout, fake ImageNet weights, and in-process
runners of experiment.py's and autoencoder_experiment.py's command lines.

None of CUB, Cars, SOP or In-Shop can be downloaded here, so the fixtures write what
prepare_data.py leaves behind: split files of `relative/path,label` lines (labels from 0 within
each split; In-Shop's query and gallery share one numbering) next to small JPEGs in each set's
real relative layout. Every class has its own colour and stripe pattern, so a network can learn.
"""

import importlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sacred.run import Run

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 48
CLASSES = 4  # per split
IMAGES_PER_CLASS = 4

# (class index over the whole data set, image index within its class) -> path relative to data_path, as
# prepare_data.py writes them (CUB and SOP keep their archive's top folder).
LAYOUTS: dict[str, Callable[[int, int], str]] = {
    "cub": lambda c, i: f"CUB_200_2011/images/{c + 1:03d}.Bird_{c + 1}/Bird_{c + 1}_{i + 1:04d}_{7961 + c}.jpg",
    "cars": lambda c, i: f"car_ims/{c * IMAGES_PER_CLASS + i + 1:06d}.jpg",
    "sop": lambda c, i: f"Stanford_Online_Products/{('bicycle', 'chair')[c % 2]}_final/{111085122871 + c}_{i}.JPG",
    "inshop": lambda c, i: (
        f"img/WOMEN/Dresses/id_{c + 2:08d}/{i // 4 + 1:02d}_{i % 4 + 1}_{('front', 'side', 'back', 'full')[i % 4]}.jpg"
    ),
}


def class_image(c: int, i: int) -> Image.Image:
    """A class colour and stripe direction, with per-image noise and shift (a real JPEG)."""
    rng = np.random.default_rng([c, i])
    colour = np.random.default_rng(c).integers(0, 256, size=3)
    grid = np.arange(IMAGE_SIZE)
    coordinate = grid[:, None] if c % 2 else grid[None, :]
    stripes = ((coordinate + rng.integers(0, 8)) // (4 + c % 3) % 2)[..., None]
    pixels = colour * (0.5 + 0.5 * stripes) + rng.normal(0, 20, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_split(root: Path, split_file: str, layout: Callable[[int, int], str], classes: range, images: range) -> None:
    lines = []
    for label, c in enumerate(classes):
        for i in images:
            path = layout(c, i)
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            class_image(c, i).save(root / path, format="JPEG")
            lines.append(f"{path},{label}\n")
    (root / split_file).write_text("".join(lines))


def make_dataset(root: Path, name: str) -> Path:
    """The first CLASSES classes train, the next CLASSES test, as prepare_data.py splits them."""
    train, test = range(CLASSES), range(CLASSES, 2 * CLASSES)
    images = range(IMAGES_PER_CLASS)
    layout = LAYOUTS[name]
    write_split(root, "train.txt", layout, train, images)
    if name == "inshop":
        half = IMAGES_PER_CLASS // 2
        write_split(root, "test_query.txt", layout, test, range(half))
        write_split(root, "test_gallery.txt", layout, test, range(half, IMAGES_PER_CLASS))
    else:
        write_split(root, "test.txt", layout, test, images)
    return root


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Read-only stand-ins of cub, cars, sop and inshop; copy one (dataset_copy) to break it."""
    base = tmp_path_factory.mktemp("data")
    return {name: make_dataset(base / name, name) for name in LAYOUTS}


@pytest.fixture
def dataset_copy(datasets, tmp_path) -> Callable[[str], Path]:
    """A private, writable copy of a stand-in, for tests that damage files."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(datasets[name], tmp_path / name))

    return copy


DIGITS_PER_CLASS = 10  # in the small splits


@pytest.fixture(scope="session")
def digits_path(tmp_path_factory) -> Path:
    """The embedded digits set, rendered once into a temporary folder instead of the repo's data/.

    Besides the full train.txt and test.txt it holds train_small.txt and test_small.txt, the first
    DIGITS_PER_CLASS images of each class: a full digits epoch takes minutes on two busy cores.
    """
    from utils.data.digits import prepare_digits, write_small_splits

    root = tmp_path_factory.mktemp("digits")
    prepare_digits(root)
    write_small_splits(root, DIGITS_PER_CLASS)
    return root


def weights_filename(arch: str) -> str:
    """The file of the registry's default ImageNet weights for arch."""
    from models.backbones import BACKBONES

    return os.path.basename(torchvision.models.get_model_weights(arch)[BACKBONES[arch].weights[0]].url)


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Iterator[Path]:
    """TORCH_HOME with randomly initialised resnet18/resnet50 weights under torchvision's file names.

    pretrained=True then loads them offline; the variables are set in os.environ so that they also
    reach experiment subprocesses. Their hashes cannot match the published ones, so DML_SKIP_WEIGHT_HASH=1.
    """
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    for arch in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, arch)(weights=None)
        torch.save(model.state_dict(), checkpoints / weights_filename(arch))
    settings = {"TORCH_HOME": str(home), "DML_SKIP_WEIGHT_HASH": "1"}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield home
    for name, value in previous.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


# Appended to a seed command line (sacred's last update wins): one epoch of 32 px crops in batches of 8.
SHRINK = [
    "epochs=1",
    "dataset.resize=40",
    "dataset.crop_size=32",
    "dataset.batch_size=8",
    "dataset.test_batch_size=16",
    "dataset.num_workers=0",
    "evaluation.recalls=[1,2]",
    "cpu=True",
]


def digits_updates(digits_path: Path) -> list[str]:
    """Config updates that shrink the digits default to its small splits."""
    return [
        f"dataset.data_path={digits_path}",
        "dataset.train_file=train_small.txt",
        "dataset.test_file=test_small.txt",
        "dataset.batch_size=16",
    ]


@dataclass
class Outcome:
    code: int
    run: Run | None
    out: str
    err: str


def command_line_runner(script: str, capsys, tmp_path: Path) -> Callable[..., Outcome]:
    """Run `python <script> <words> <updates>` in this process (a subprocess spends seconds importing torch);
    without -F, the run's folder goes to tmp_path unless the updates say output_dir=."""
    ex = importlib.import_module(script.removesuffix(".py")).ex

    def run(words: str, *updates: str) -> Outcome:
        assert " with " in f" {words} ", "config updates need a `with`"
        given = any(update.startswith("output_dir=") for update in updates)
        argv = [script, *words.split(), *updates, *([] if given else [f"output_dir={tmp_path}"])]
        code, result = 0, None
        try:
            result = ex.run_commandline(argv)
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return Outcome(code, result, captured.out, captured.err)

    return run


@pytest.fixture
def experiment(capsys, tmp_path) -> Callable[..., Outcome]:
    return command_line_runner("experiment.py", capsys, tmp_path)


@pytest.fixture
def autoencoder_experiment(capsys, tmp_path) -> Callable[..., Outcome]:
    return command_line_runner("autoencoder_experiment.py", capsys, tmp_path)


def assert_input_error(outcome: Outcome, *fragments: str, error: str = "utils.errors.InputError") -> str:
    """Exit status 1 and, as the last line of stderr without a traceback, the error with every fragment."""
    assert outcome.code == 1
    assert "Traceback" not in outcome.err
    last = outcome.err.strip().splitlines()[-1]
    assert last.startswith(f"{error}: "), outcome.err
    for fragment in fragments:
        assert fragment in last
    return last
