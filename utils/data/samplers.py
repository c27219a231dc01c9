"""Batch samplers that put several images of the same class in every batch.

Pairwise losses need positives in the batch; a plain random sampler rarely gives them on data
sets with many small classes (SOP, In-Shop).
"""

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler

from utils.errors import InputError


class ClassBatchSampler(Sampler[list[int]]):
    """Batches of batch_size // images_per_class distinct classes, images_per_class images each.

    replace=False (`random_id`, the CE paper's identity sampler): only classes with at least
    images_per_class images are drawn, their images without replacement.
    replace=True (`balanced`, Metrix's sampler): any class, its images drawn with replacement.
    Classes are drawn afresh for every batch; an epoch has num_batches batches. The draws come from
    generator (torch's global one when None).
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        images_per_class: int,
        num_batches: int,
        replace: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        self.generator = generator
        if images_per_class < 1 or batch_size % images_per_class:
            raise InputError(
                f"dataset.batch_size={batch_size} must be a multiple of dataset.images_per_class={images_per_class}"
            )
        self.classes_per_batch = batch_size // images_per_class
        self.images_per_class = images_per_class
        self.num_batches = num_batches
        self.replace = replace
        labels = torch.as_tensor(labels)
        groups = [torch.nonzero(labels == c).squeeze(1) for c in labels.unique()]
        self.groups = [g for g in groups if replace or len(g) >= images_per_class]
        if self.classes_per_batch < 2:
            raise InputError(
                f"dataset.batch_size={batch_size} holds a single class of {images_per_class} images: "
                f"raise it to at least {2 * images_per_class} so that batches contain negatives"
            )
        if self.classes_per_batch > len(self.groups):
            raise InputError(
                f"dataset.batch_size={batch_size} needs {self.classes_per_batch} classes of "
                f"{images_per_class} images per batch, but the training set has {len(self.groups)} such "
                f"classes: lower dataset.batch_size or dataset.images_per_class"
            )

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


class EpochBatches(Sampler[list[int]]):
    """The batches of an epoch drawn from generators seeded by (seed, epoch), whatever ran before: an epoch can be
    replayed, and a stopped one resumed after its first `start` batches (set_epoch) with the same batches.

    batches draws from `generator`; the DataLoader draws its workers' seeds from `worker_seeds`. Under torchrun
    every rank draws the same global batches and keeps its contiguous part of each (`rank` of `world_size`): the
    parts never overlap, and a class-balanced batch, whose classes come in contiguous runs of images_per_class,
    keeps each class on one rank when the part is a whole number of classes (utils.distributed.check_batch).
    """

    def __init__(
        self,
        batches: BatchSampler | ClassBatchSampler,
        generator: torch.Generator,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.batches, self.generator, self.seed = batches, generator, seed
        self.rank, self.world_size = rank, world_size
        self.worker_seeds = torch.Generator()
        self.set_epoch(1)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        stream = (self.seed * 1_000_003 + self.epoch) * 2  # one for the batches, one for the workers' seeds
        self.generator.manual_seed(stream)
        self.worker_seeds.manual_seed(stream + 1 + (self.rank << 48))  # each rank's workers their own draws
        for batch in itertools.islice(iter(self.batches), self.start, None):
            part = len(batch) // self.world_size
            yield batch[self.rank * part : (self.rank + 1) * part]


def epoch_batches(
    labels: Sequence[int],
    batch_size: int,
    sampler: str,
    images_per_class: int,
    num_batches: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> EpochBatches:
    """random: batches of distinct images drawn at random; random_id and balanced: ClassBatchSampler's."""
    generator = torch.Generator()
    if sampler == "random":
        images = RandomSampler(range(len(labels)), num_samples=num_batches * batch_size, generator=generator)
        batches = BatchSampler(images, batch_size, drop_last=True)
    else:
        batches = ClassBatchSampler(
            labels, batch_size, images_per_class, num_batches, replace=sampler == "balanced", generator=generator
        )
    return EpochBatches(batches, generator, seed, rank, world_size)
