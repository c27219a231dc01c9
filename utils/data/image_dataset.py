"""Images listed in a split file of `relative/path,label` lines."""

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from utils.errors import InputError


def read_split(split_file: Path) -> list[tuple[str, int]]:
    """Parse a split file into (relative path, label) pairs; a bad line names its file and number."""
    samples = []
    for number, line in enumerate(split_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        path, _, label = line.rpartition(",")
        if not path or not label.strip().lstrip("-").isdigit():
            raise InputError(f"{split_file}, line {number}: expected 'relative/path,label', got {line!r}")
        samples.append((path.strip(), int(label)))
    if not samples:
        raise InputError(f"{split_file} lists no images; re-create it with prepare_data.py")
    return samples


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"image {path} is missing; re-run prepare_data.py or fix the split file") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(f"image {path} cannot be read ({error}); replace the file or remove its line") from None


class ImageDataset(Dataset):
    """(image, label) pairs from a split file, optionally decoded into RAM once (preload)."""

    def __init__(self, root: str | Path, split_file: str, transform: Callable | None = None,
                 preload: bool = False) -> None:
        self.root = Path(root)
        self.split_file = self.root / split_file
        if not self.split_file.is_file():
            raise InputError(f"split file {self.split_file} not found; run `python prepare_data.py` "
                             f"or point dataset.data_path at the prepared folder")
        samples = read_split(self.split_file)
        self.paths = [self.root / path for path, _ in samples]
        self.targets = [label for _, label in samples]
        self.transform = transform
        missing = next((path for path in self.paths if not path.is_file()), None)
        if missing is not None:
            raise InputError(f"image {missing} (listed in {self.split_file}) is missing; "
                             f"re-run prepare_data.py or fix the split file")
        self.images = [load_image(path) for path in self.paths] if preload else None

    def with_transform(self, transform: Callable | None) -> "ImageDataset":
        """The same images (preloaded ones shared, not decoded again) under another transform."""
        twin = copy.copy(self)
        twin.transform = transform
        return twin

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index] if self.images is not None else load_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

