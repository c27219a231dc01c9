"""Batch samplers that put several images of the same class in every batch.

Pairwise losses need positives in the batch; a plain random sampler rarely gives them on data
sets with many small classes (SOP, In-Shop).

Under torchrun every rank draws the same global batches (from a generator seeded alike on every rank) and
RankSlice keeps its contiguous part of each: the ranks' parts never overlap, and a class-balanced batch, whose
classes come in contiguous runs of images_per_class, keeps each class on one rank when the part is a whole
number of classes (utils.distributed.check_batch).
"""

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from utils.errors import InputError


class ClassBatchSampler(Sampler[list[int]]):
    """Batches of batch_size // images_per_class distinct classes, images_per_class images each.

    replace=False (`random_id`, the CE paper's identity sampler): only classes with at least
    images_per_class images are drawn, their images without replacement.
    replace=True (`balanced`, Metrix's sampler): any class, its images drawn with replacement.
    Classes are drawn afresh for every batch; an epoch has num_batches batches.
    """

    def __init__(self, labels: Sequence[int], batch_size: int, images_per_class: int, num_batches: int,
                 replace: bool, generator: torch.Generator | None = None) -> None:
        if images_per_class < 1 or batch_size % images_per_class:
            raise InputError(f"dataset.batch_size={batch_size} must be a multiple of "
                             f"dataset.images_per_class={images_per_class}")
        self.classes_per_batch = batch_size // images_per_class
        self.images_per_class = images_per_class
        self.num_batches = num_batches
        self.replace = replace
        self.generator = generator
        labels = torch.as_tensor(labels)
        groups = [torch.nonzero(labels == c).squeeze(1) for c in labels.unique()]
        self.groups = [g for g in groups if replace or len(g) >= images_per_class]
        if self.classes_per_batch < 2:
            raise InputError(f"dataset.batch_size={batch_size} holds a single class of {images_per_class} images: "
                             f"raise it to at least {2 * images_per_class} so that batches contain negatives")
        if self.classes_per_batch > len(self.groups):
            raise InputError(f"dataset.batch_size={batch_size} needs {self.classes_per_batch} classes of "
                             f"{images_per_class} images per batch, but the training set has {len(self.groups)} such "
                             f"classes: lower dataset.batch_size or dataset.images_per_class")

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            batch = []
            for c in torch.randperm(len(self.groups), generator=self.generator)[: self.classes_per_batch].tolist():
                group = self.groups[c]
                if self.replace:
                    picks = torch.randint(len(group), (self.images_per_class,), generator=self.generator)
                else:
                    picks = torch.randperm(len(group), generator=self.generator)[: self.images_per_class]
                batch.extend(group[picks].tolist())
            yield batch


class RankSlice(Sampler[list[int]]):
    """This rank's contiguous part of every global batch of batches (a batch sampler drawing identical batches
    on every rank)."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            local = len(batch) // self.world_size
            yield batch[self.rank * local: (self.rank + 1) * local]
