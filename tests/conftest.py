"""Shared fixtures: tiny stand-ins of each data set's on-disk layout, fake pretrained weights, a runner.

The real data sets and ImageNet weights cannot be downloaded here, so the tests build folders in the
layout prepare_data.py writes (split files of `relative/path,label` lines next to real JPEGs) and
save randomly initialised torchvision weights where torch's cache would hold the real ones.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# One image path per (class, image) in each data set's real layout.
LAYOUTS = {
    "cub": lambda c, i: f"CUB_200_2011/images/{c + 1:03d}.Bird_{c}/Bird_{c}_{i:04d}_{c * 100 + i}.jpg",
    "cars": lambda c, i: f"car_ims/{c * 100 + i + 1:06d}.jpg",
    "sop": lambda c, i: f"Stanford_Online_Products/bicycle_final/{111085122871 + c}_{i}.JPG",
    "inshop": lambda c, i: f"img/WOMEN/Dresses/id_{c + 1:08d}/{i + 1:02d}_1_front.jpg",
}
CLASSES, IMAGES_PER_CLASS = 4, 4


def class_image(rng: np.random.Generator, c: int) -> Image.Image:
    """A 48 px image whose colour depends on its class, plus noise: learnable, not trivial."""
    base = np.array([60 * c % 256, 255 - 50 * c % 256, 120], dtype=float)
    pixels = base + rng.normal(0, 30, size=(48, 48, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_split(root: Path, name: str, lines: list[str]) -> None:
    (root / name).write_text("".join(f"{line}\n" for line in lines))


def make_standin(name: str, root: Path) -> Path:
    """A folder in the layout of data set `name` with CLASSES train and CLASSES test classes."""
    rng = np.random.default_rng(0)
    path_of = LAYOUTS[name]
    splits: dict[str, list[str]] = {}
    for c in range(2 * CLASSES):
        for i in range(IMAGES_PER_CLASS):
            relative = path_of(c, i)
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            class_image(rng, c).save(root / relative)
            if c < CLASSES:
                splits.setdefault("train.txt", []).append(f"{relative},{c}")
            elif name == "inshop":  # half of each test item's images are queries, half the gallery
                split = "test_query.txt" if i % 2 == 0 else "test_gallery.txt"
                splits.setdefault(split, []).append(f"{relative},{c - CLASSES}")
            else:
                splits.setdefault("test.txt", []).append(f"{relative},{c - CLASSES}")
    for split, lines in splits.items():
        write_split(root, split, lines)
    return root


@pytest.fixture(scope="session")
def standins(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("standins")
    return {name: make_standin(name, base / name) for name in LAYOUTS}


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose cache holds random weights under the file names of torchvision's ImageNet weights."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for arch in ("resnet18", "resnet50"):
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
        torch.save(getattr(torchvision.models, arch)(weights=None).state_dict(), checkpoints / os.path.basename(url))
    return home


SHRINK = ["epochs=1", "dataset.resize=40", "dataset.crop_size=32", "dataset.batch_size=8",
          "dataset.test_batch_size=16", "dataset.num_workers=0", "dataset.recalls=[1,2]", "cpu=True"]


def run_script(args: list[str], torch_home: Path | None = None, cwd: Path = REPO,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a repo script as a user would, in a subprocess; TORCH_HOME points at the fake weights."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if torch_home is not None:
        env["TORCH_HOME"] = str(torch_home)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with exit 1 and one `InputError: ...` line that contains every fragment."""
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "InputError: " in line]
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
