"""The embedded default data set: scikit-learn's digits rendered as colour images.

Each 8x8 digit is drawn on a larger canvas with a random scale, rotation, position, random
foreground and background colours and background noise, so that nearest neighbours on raw pixels do poorly and a
network has something to learn. Rendering is deterministic per image. Digits 0-4 are the
training classes and 5-9 the test classes, as in the zero-shot protocol of the real data sets.
"""

import fcntl
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from utils.files import atomic_write

CANVAS = 32
TRAIN_CLASSES = range(0, 5)
SPLITS = ("train", "test")


def render_digit(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Draw an 8x8 digit (values 0-16) on a noisy CANVAS x CANVAS colour image."""
    size = int(rng.integers(10, 21))
    mask = Image.fromarray((digit * (255 / 16)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    mask = mask.rotate(float(rng.uniform(-60, 60)), resample=Image.BILINEAR, expand=True)
    # Random colours, but always a light digit on a dark background: a consistent contrast
    # polarity keeps the shape learnable from a few hundred images, while position, size,
    # rotation, colour and noise keep raw-pixel neighbours poor.
    background = rng.integers(0, 100, size=3) + rng.normal(0, 40, size=(CANVAS, CANVAS, 3))
    foreground = tuple(int(c) for c in rng.integers(156, 256, size=3))
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    x, y = (int(rng.integers(min(0, CANVAS - s), max(0, CANVAS - s) + 1)) for s in mask.size)
    canvas.paste(Image.new("RGB", mask.size, foreground), (x, y), mask)
    return canvas


def prepare_digits(root: str | Path, seed: int = 0) -> None:
    """Render every digit into root/images and write root/train.txt and root/test.txt, unless done before.

    Safe when several runs start together on a fresh checkout: one renders under a lock while the others
    wait, and the split files appear atomically, train.txt (the mark of a complete rendering) last.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".render.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if not all((root / f"{split}.txt").is_file() for split in SPLITS):
            _render(root, seed)


def _render(root: Path, seed: int) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for index, (digit, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        path = f"images/{index:04d}.png"
        render_digit(digit, np.random.default_rng([seed, index])).save(root / path)
        splits["train" if label in TRAIN_CLASSES else "test"].append(f"{path},{label}\n")
    for split in ("test", "train"):  # train.txt last: runs that find it take the rendering as complete
        with atomic_write(root / f"{split}.txt") as file:
            file.write("".join(splits[split]))


def write_small_splits(root: Path, per_class: int) -> None:
    """train_small.txt and test_small.txt beside the digits' splits: the first per_class images of each class (the
    tests' and the GPU check's quick runs)."""
    for split in ("train", "test"):
        counts: dict[str, int] = {}
        lines = []
        for line in (root / f"{split}.txt").read_text().splitlines(keepends=True):
            label = line.rsplit(",", 1)[1]
            counts[label] = counts.get(label, 0) + 1
            if counts[label] <= per_class:
                lines.append(line)
        (root / f"{split}_small.txt").write_text("".join(lines))
