"""Under torchrun every rank takes its own part of each global batch: no example twice within a step where the
single-process sampler has none, and class-balanced batches keep each class on one rank."""

from collections import Counter

import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from utils import distributed
from utils.data.samplers import ClassBatchSampler, EpochBatches
from utils.errors import InputError

LABELS = [i % 20 for i in range(200)]  # 20 classes of 10 images


def epoch(make_sampler, rank: int = 0, world: int = 1) -> list[list[int]]:
    """A rank's batches of epoch 1, from its own sampler whose generator EpochBatches seeds alike on every rank."""
    generator = torch.Generator()
    return list(EpochBatches(make_sampler(generator), generator, seed=7, rank=rank, world_size=world))


def parts(make_sampler, world: int) -> list[list[list[int]]]:
    """Every rank's batches."""
    return [epoch(make_sampler, rank, world) for rank in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_random_batches_split_without_overlap(world):
    def make(generator):
        return BatchSampler(RandomSampler(range(200), num_samples=160, generator=generator), 40, drop_last=True)

    global_batches = epoch(make)
    ranks = parts(make, world)
    for step, batch in enumerate(global_batches):
        local = [ranks[rank][step] for rank in range(world)]
        assert all(len(part) == 40 // world for part in local)
        assert sum(local, []) == batch  # the global batch, in order: nothing drawn twice or lost
        assert len(set(batch)) == len(batch)


@pytest.mark.parametrize("replace", [True, False])  # balanced, random_id
def test_class_batches_keep_classes_whole_on_a_rank(replace):
    def make(generator):
        return ClassBatchSampler(LABELS, 40, 5, num_batches=6, replace=replace, generator=generator)

    global_batches = epoch(make)
    ranks = parts(make, 2)
    for step, batch in enumerate(global_batches):
        assert ranks[0][step] + ranks[1][step] == batch
        classes = [Counter(LABELS[i] for i in ranks[rank][step]) for rank in range(2)]
        assert not classes[0].keys() & classes[1].keys()
        assert all(count == 5 for part in classes for count in part.values())
        if not replace:
            assert len(set(batch)) == len(batch)


def test_global_batch_must_split_into_whole_classes(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert distributed.check_batch(40) == distributed.check_batch(40, 5) == 10
    with pytest.raises(InputError, match=r"dataset\.batch_size=42 .* multiple of 4"):
        distributed.check_batch(42)
    with pytest.raises(InputError, match=r"dataset\.images_per_class=4: .* multiple of 16"):
        distributed.check_batch(40, 4)
