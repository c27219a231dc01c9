"""A torch Dataset of the images listed in a split file of `relative/path,label` lines."""

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.data.images import load_image, read_split
from utils.errors import InputError


class ImageDataset(Dataset):
    """(image, label) pairs from a split file, optionally decoded into RAM once (preload).

    min_classes: refuse a split with fewer classes (a test split needs two for retrieval to mean anything).
    decode: path -> image, what transform takes (preloaded images are always load_image's PIL images).
    """

    def __init__(
        self,
        root: str | Path,
        split_file: str,
        transform: Callable | None = None,
        preload: bool = False,
        min_classes: int = 1,
        decode: Callable[[Path], Any] = load_image,
    ) -> None:
        self.root = Path(root)
        self.split_file = self.root / split_file
        if not self.split_file.is_file():
            raise InputError(
                f"split file {self.split_file} not found; run `python prepare_data.py` "
                f"or point dataset.data_path at the prepared folder"
            )
        samples = read_split(self.split_file)
        self.paths = [self.root / path for path, _ in samples]
        self.targets = [label for _, label in samples]
        self.transform, self.decode = transform, decode
        classes = len(set(self.targets))
        if classes < min_classes:
            raise InputError(
                f"{self.split_file} holds {classes} class(es) but at least {min_classes} are needed "
                f"(retrieval among one class scores 1.0 on every metric): list more classes in it"
            )
        missing = next((path for path in self.paths if not path.is_file()), None)
        if missing is not None:
            raise InputError(
                f"image {missing} (listed in {self.split_file}) is missing; "
                f"re-run prepare_data.py or fix the split file"
            )
        self.images = [load_image(path) for path in self.paths] if preload else None

    def with_transform(self, transform: Callable | None) -> "ImageDataset":
        """The same images (preloaded ones shared, not decoded again) under another transform of PIL images."""
        twin = copy.copy(self)
        twin.transform, twin.decode = transform, load_image
        return twin

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, int]]:
        """A batch (what a DataLoader asks for), its random augmentations drawn from torch's generator seeded by
        the batch's indices in order: the same whichever process loads it, so dataset.num_workers does not change
        a run (the sampler's batches already depend on the seed and the epoch; only the same images in the same
        order would draw the same augmentations again). The global generator is left as it was: with
        num_workers=0 this runs in the training process."""
        digest = hashlib.blake2b(np.asarray(indices, dtype=np.int64).tobytes(), digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest) >> 1)  # manual_seed takes at most 2**63 - 1
            return [self[index] for index in indices]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index] if self.images is not None else self.decode(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]
