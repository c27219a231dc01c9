"""The `dataset` ingredient: where the data lives, how it is sampled and transformed, and which training classes
are held out for validation (evaluation.protocol=validation)."""

import copy
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sacred import Ingredient
from torch.utils.data import DataLoader

from utils import distributed
from utils.data.device_augment import DeviceAugment, build_split_pipeline, load_for_crop, pack_crops
from utils.data.digits import prepare_digits
from utils.data.image_dataset import ImageDataset
from utils.data.images import load_image
from utils.data.manifest import check_prepared
from utils.data.samplers import EpochBatches, epoch_batches
from utils.data.specs import DATASETS, named_configs
from utils.data.transforms import build_transforms
from utils.errors import InputError
from utils.settings import (
    NON_NEGATIVE,
    SIZE,
    Check,
    CrossRule,
    boolean,
    choice,
    either,
    integer,
    items,
    number,
    optional,
    ordered_pair,
    register,
    text,
)

SAMPLERS = ("random", "random_id", "balanced")

data_ingredient = Ingredient("dataset")


@data_ingredient.config
def config():
    # The defaults are the embedded digits set; the named configs `dataset.<name>` (utils/data/specs.py) set the
    # real data sets.
    name = "digits"  # digits | cub | cars | sop | inshop
    data_path = "data/digits"  # the prepared folder (split files and images)
    train_file = "train.txt"  # split file of `relative/path,label` lines
    test_file = "test.txt"  # the queries; also the gallery unless gallery_file is set
    gallery_file = None  # In-Shop: queries are searched in a separate gallery

    batch_size = 32  # training images per step
    test_batch_size = 256  # images per step when embedding test images
    # The pair_sampler of a data set's specification (utils/data/specs.py) gives pairwise losses positives in a
    # batch: random on digits, CUB and Cars, whose classes hold dozens of images, balanced on SOP and In-Shop.
    pair_batches = False  # True: sampler defaults to the data set's pair_sampler
    # random | random_id | balanced
    sampler = DATASETS[name].pair_sampler if pair_batches and name in DATASETS else "random"
    images_per_class = 2  # random_id, balanced: images of each class in a batch
    num_iterations = None  # batches per epoch (None: as many as one pass over the training set)

    preload = True  # decode every image into RAM once
    num_workers = 0  # DataLoader worker processes
    pin_memory = False  # page-locked batches: asynchronous copies to the GPU
    persistent_workers = False  # keep the workers between epochs (with num_workers > 0)
    # Training batches: decode, crop and flip in the workers on uint8, colour jitter batched on the device
    # (utils/data/device_augment.py; same distribution, other random draws than the default pipeline).
    gpu_augment = False

    crop_size = 32  # side of the (random in training, central in test) square crop
    resize = None  # resize before cropping (test images too)
    scale = (0.5, 1.0)  # RandomResizedCrop area range
    ratio = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    color_jitter = None  # (brightness, contrast, saturation, hue)
    rotate = None  # random rotation range in degrees
    hflip = False  # random horizontal flips (mirrored digits are other symbols)

    # evaluation.protocol=validation holds training classes out to choose the epoch on (never the test set):
    validation_fraction = 0.25  # a fixed draw of this share of them (at least 2 classes)
    folds = None  # or the Reality Check: this many class-disjoint partitions of the sorted training classes...
    fold = 1  # ...and the one validated on (1..folds); the others train


for _name, _settings in named_configs().items():
    data_ingredient.add_named_config(_name, _settings)


def _shorter_side(resize: int | list[int]) -> int:
    return resize if isinstance(resize, int) else min(resize)


# torchvision's ColorJitter: any brightness, contrast and saturation factor >= 0; a hue shift of at most half the
# colour wheel.
_JITTER = items(NON_NEGATIVE, 4)
COLOR_JITTER = Check(lambda v: _JITTER.test(v) and v[3] <= 0.5, f"{_JITTER.description}, the last (hue) <= 0.5")


# The valid values of the config's settings, checked before anything runs (utils/settings.py); after DATASETS,
# which dataset.name's rule names.
register(
    {
        "dataset.name": choice(DATASETS),
        "dataset.data_path": text(),
        "dataset.train_file": text(),
        "dataset.test_file": text(),
        "dataset.gallery_file": optional(text()),
        "dataset.batch_size": SIZE,
        "dataset.test_batch_size": SIZE,
        "dataset.pair_batches": boolean(),
        "dataset.sampler": choice(SAMPLERS),
        "dataset.images_per_class": SIZE,
        "dataset.num_iterations": optional(SIZE),
        "dataset.preload": boolean(),
        "dataset.num_workers": integer(0),
        "dataset.pin_memory": boolean(),
        "dataset.persistent_workers": boolean(),
        "dataset.gpu_augment": boolean(),
        "dataset.crop_size": SIZE,
        # One side (the shorter one, as torchvision resizes) or [height, width].
        "dataset.resize": optional(either(SIZE, items(SIZE, 2))),
        "dataset.scale": ordered_pair(0, 1),
        # RandomResizedCrop draws the log of the ratio in float32; a crop 10,000 times wider than high fits no image.
        "dataset.ratio": ordered_pair(1e-4, 1e4),
        "dataset.color_jitter": optional(COLOR_JITTER),
        "dataset.rotate": optional(number(0, 180)),
        "dataset.hflip": boolean(),
        "dataset.validation_fraction": number(0, 1, low_open=True, high_open=True),
        "dataset.folds": optional(integer(2)),
        "dataset.fold": integer(1),
    },
    cross_rules=[
        CrossRule(
            ("dataset.crop_size", "dataset.resize"),
            lambda crop, resize: resize is None or crop <= _shorter_side(resize),
            "dataset.crop_size <= dataset.resize (its shorter side)",
        ),
        CrossRule(
            ("dataset.sampler", "dataset.images_per_class", "dataset.batch_size"),
            lambda sampler, per_class, batch: sampler == "random" or per_class <= batch,
            "dataset.images_per_class <= dataset.batch_size with a class sampler",
        ),
        CrossRule(
            ("dataset.fold", "dataset.folds"),
            lambda fold, folds: folds is None or fold <= folds,
            "dataset.fold <= dataset.folds (the folds count from 1)",
        ),
        CrossRule(
            ("dataset.folds", "evaluation.protocol"),
            lambda folds, protocol: folds is None or protocol == "validation",
            "evaluation.protocol=validation with dataset.folds (a fold is a validation split)",
        ),
    ],
)


class MetricLoaders(NamedTuple):
    """The training batches and the test images."""

    train: DataLoader | None  # None when only evaluating
    query: DataLoader
    gallery: DataLoader | None
    reference: DataLoader  # the training images with the test transform, for utilization
    num_classes: int
    device_augment: DeviceAugment | None = None  # dataset.gpu_augment: the training batches' resampling and jitter
    validation: DataLoader | None = None  # the held-out training classes (evaluation.protocol=validation)


# The validation classes are drawn with this seed, not the run's: every seed of a sweep, and a resumed run,
# validates on the same classes.
SPLIT_SEED = 0


def validation_classes(classes: list[int], fraction: float, folds: int | None, fold: int) -> list[int]:
    """The training classes held out for validation: with folds, the fold-th of `folds` contiguous partitions of
    the sorted classes (as the Reality Check's benchmarker splits them); else a fixed draw of `fraction` of them,
    at least 2 (retrieval among one class scores 1.0 on every metric). At least one class is left to train."""
    ordered = sorted(set(classes))
    if folds is not None:
        if len(ordered) < 2 * folds:
            raise InputError(
                f"dataset.folds={folds} needs at least {2 * folds} training classes (2 per fold) but the training "
                f"split holds {len(ordered)}: lower dataset.folds"
            )
        return [int(c) for c in np.array_split(ordered, folds)[fold - 1]]
    count = max(2, round(fraction * len(ordered)))
    if count >= len(ordered):
        raise InputError(
            f"dataset.validation_fraction={fraction} holds out {count} of the {len(ordered)} training classes and "
            f"leaves none to train on: lower it, or use evaluation.protocol=test"
        )
    drawn = np.random.default_rng(SPLIT_SEED).permutation(ordered)[:count]
    return sorted(int(c) for c in drawn)


def class_subset(dataset: ImageDataset, classes: set[int], relabel: bool) -> ImageDataset:
    """The images of these classes (preloaded ones shared); relabel: their labels renumbered 0..n-1 in order, so
    that a classifier or proxies cover only the classes trained on."""
    keep = [i for i, label in enumerate(dataset.targets) if label in classes]
    numbering = {c: i for i, c in enumerate(sorted(classes))} if relabel else {c: c for c in classes}
    subset = copy.copy(dataset)
    subset.paths = [dataset.paths[i] for i in keep]
    subset.targets = [numbering[dataset.targets[i]] for i in keep]
    if dataset.images is not None:
        subset.images = [dataset.images[i] for i in keep]
    return subset


# Not a captured function: sacred seeds each captured function of an ingredient in turn, so a new one would change
# the training sampler's seed, and every run's batches.
def hold_out_validation(
    train: ImageDataset, *, fraction: float, folds: int | None, fold: int
) -> tuple[ImageDataset, ImageDataset]:
    """The training images split into those trained on (relabelled) and the validation images (original labels)."""
    held_out = set(validation_classes(train.targets, fraction, folds, fold))
    trained = set(train.targets) - held_out
    return class_subset(train, trained, relabel=True), class_subset(train, held_out, relabel=False)


@data_ingredient.capture
def get_datasets(
    name: str,
    data_path: str,
    train_file: str,
    test_file: str,
    gallery_file: str | None,
    preload: bool,
    crop_size: int,
    resize,
    scale,
    ratio,
    color_jitter,
    rotate,
    hflip: bool,
    gpu_augment: bool,
) -> tuple[ImageDataset, ImageDataset, ImageDataset | None, DeviceAugment | None]:
    """The training, query and gallery images, and with gpu_augment the resampling and jitter left to the device."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset.name {name!r}: choose one of {', '.join(DATASETS)}")
    root = Path(data_path)
    if name == "digits" and not (root / train_file).is_file():
        prepare_digits(root)
    if not root.is_dir():
        raise InputError(
            f"data folder {root} not found: run `python prepare_data.py` "
            f"or point dataset.data_path at the prepared data"
        )
    check_prepared(root)
    train_transform, test_transform = build_transforms(crop_size, resize, scale, ratio, color_jitter, rotate, hflip)
    device_augment, decode = None, load_image
    if gpu_augment:
        train_transform, device_augment = build_split_pipeline(
            crop_size, resize, scale, ratio, color_jitter, rotate, hflip
        )
        decode = load_for_crop
    train = ImageDataset(root, train_file, train_transform, preload, decode=decode)
    if gpu_augment:
        train_transform.share_grey_levels(train.paths)
    query = ImageDataset(root, test_file, test_transform, preload, min_classes=2)
    gallery = ImageDataset(root, gallery_file, test_transform, preload) if gallery_file else None
    return train, query, gallery, device_augment


@data_ingredient.capture
def get_train_sampler(
    labels: list[int], batch_size: int, sampler: str, images_per_class: int, num_iterations: int | None, _seed: int
) -> EpochBatches:
    """The training batches; batch_size is the global batch, and under torchrun each rank gets its part of every
    global batch. _seed is sacred's seed for this function, derived from the run's seed (the same on every rank)."""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown dataset.sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if batch_size > len(labels):
        raise InputError(f"dataset.batch_size={batch_size} exceeds the {len(labels)} training images: lower it")
    num_batches = num_iterations or len(labels) // batch_size
    distributed.check_batch(batch_size, images_per_class if sampler != "random" else None)
    return epoch_batches(
        labels, batch_size, sampler, images_per_class, num_batches, _seed, distributed.rank(), distributed.world_size()
    )


@data_ingredient.capture
def get_loaders(
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool,
    validation_fraction: float,
    folds: int | None,
    fold: int,
    hold_out: bool = False,
) -> MetricLoaders:
    """hold_out: also the validation images, held out of the training ones (evaluation.protocol=validation)."""
    train, query, gallery, device_augment = get_datasets()
    validation = None
    if hold_out:
        train, validation = hold_out_validation(train, fraction=validation_fraction, folds=folds, fold=fold)
    batches = get_train_sampler(train.targets)
    # gpu_augment's crops differ in size until the device resamples them: pack_crops collates them.
    train_loader = DataLoader(
        train,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=None if device_augment is None else pack_crops,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=batches.worker_seeds,
    )
    return test_loaders(train, query, gallery, validation=validation)._replace(
        train=train_loader, device_augment=device_augment
    )


@data_ingredient.capture
def test_loaders(
    train: ImageDataset,
    query: ImageDataset,
    gallery: ImageDataset | None,
    test_batch_size: int,
    num_workers: int,
    pin_memory: bool,
    validation: ImageDataset | None = None,
) -> MetricLoaders:
    """The test images (and the training images under the test transform, for utilization, and the validation
    images under it); no training batches."""

    def test_loader(dataset: ImageDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=test_batch_size, num_workers=num_workers, pin_memory=pin_memory)

    return MetricLoaders(
        None,
        test_loader(query),
        test_loader(gallery) if gallery else None,
        test_loader(train.with_transform(query.transform)),
        num_classes=max(train.targets) + 1,
        validation=test_loader(validation.with_transform(query.transform)) if validation is not None else None,
    )
