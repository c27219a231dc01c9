"""One specification per data set: where it lives, where it comes from, what a good copy holds, how it is read.

prepare_data.py takes the folder, mirrors, checksums and published split counts from here; the dataset
ingredient takes its named configs (`dataset.cub`, `dataset.cub_vae`, ...), and the evaluation its default
Recall@K, from the same entries. Adding a data set is one entry here plus, for a real one, its preparation in
utils/data/datasets.py.
"""

import os
from dataclasses import dataclass, field

Counts = dict[str, tuple[int, int | None]]  # split -> (images, classes); None: not published, not checked


@dataclass(frozen=True)
class Download:
    """One file of a data set: the mirrors to try in order and the one checksum they all share."""

    file: str
    mirrors: tuple[str, ...]
    md5: str


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # the key of dataset.name, prepare_data.py's argument and the named config `dataset.<name>`
    title: str
    folder: str  # under the repository: the default dataset.data_path and prepare_data's data_path
    split_rule: str  # how the published lists become train and test classes
    downloads: tuple[Download, ...]  # empty: generated, or placed by hand (see `source`)
    source: str  # where the files come from, in words
    expected: Counts  # the published (images, classes) of each split; prepare_data refuses a mismatch
    recalls: tuple[int, ...]  # the Recall@K its papers report: the evaluation's default
    # The sampler that gives a pairwise loss positives in a batch: random where classes hold dozens of images,
    # balanced (images_per_class of each class) where they hold a handful, as the Metrix paper's released code
    # samples; dataset.pair_batches=True picks it.
    pair_sampler: str
    settings: dict = field(default_factory=dict)  # the named config's training-image settings


# The CE paper's settings for the real data sets: 224 px crops of ImageNet-sized images.
_IMAGENET_SIZED = dict(
    batch_size=128, preload=False, num_workers=min(8, os.cpu_count() or 1), crop_size=224, scale=(0.16, 1.0), hflip=True
)
# Stanford moved both copies of Cars-196; ai.stanford.edu/~jkrause/car196/ has been reported dead since 2023.
_CARS_DIRECTORIES = (
    "http://ai.stanford.edu/~jkrause/car196/",
    "https://ai.stanford.edu/~jkrause/car196/",
    "http://imagenet.stanford.edu/internal/car196/",
)
INSHOP_PAGE = "http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"

# None of the mirrors could be reached from the machines this code was written on: each is an address the data
# set was published at or mirrored on, not a verified one (data/README.md).
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="digits",
            title="digits (embedded)",
            folder="data/digits",
            split_rule="scikit-learn's digits rendered at 32 px; digits 0-4 train, 5-9 test",
            downloads=(),
            source="rendered on first use",
            expected={"train": (901, 5), "test": (896, 5)},
            recalls=(1, 2, 4, 8),
            pair_sampler="random",
            settings=dict(name="digits"),
        ),
        DatasetSpec(
            name="cub",
            title="CUB-200-2011",
            folder="data/CUB_200_2011",
            split_rule="first 100 classes train, last 100 test",
            downloads=(
                Download(
                    "CUB_200_2011.tgz",
                    (
                        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
                        "http://www.vision.caltech.edu/visipedia-data/CUB-200-2011/CUB_200_2011.tgz",
                    ),
                    "97eceeb196236b17998738112f37df78",
                ),
            ),
            source="downloaded",
            expected={"train": (5_864, 100), "test": (5_924, 100)},
            recalls=(1, 2, 4, 8, 16, 32),
            pair_sampler="random",
            settings=dict(
                _IMAGENET_SIZED,
                name="cub",
                data_path="data/CUB_200_2011",
                resize=256,
                color_jitter=(0.25, 0.25, 0.25, 0),
            ),
        ),
        DatasetSpec(
            name="cars",
            title="Cars-196",
            folder="data/CARS_196",
            split_rule="first 98 classes train, last 98 test",
            downloads=(
                Download(
                    "car_ims.tgz",
                    tuple(d + "car_ims.tgz" for d in _CARS_DIRECTORIES),
                    "d5c8f0aa497503f355e17dc7886c3f14",
                ),
                Download(
                    "cars_annos.mat",
                    tuple(d + "cars_annos.mat" for d in _CARS_DIRECTORIES),
                    "b407c6086d669747186bd1d764ff9dbc",
                ),
            ),
            source="downloaded, or car_ims.tgz and cars_annos.mat placed by hand",
            expected={"train": (8_054, 98), "test": (8_131, 98)},
            recalls=(1, 2, 4, 8, 16, 32),
            pair_sampler="random",
            settings=dict(
                _IMAGENET_SIZED,
                name="cars",
                data_path="data/CARS_196",
                resize=(256, 256),
                color_jitter=(0.3, 0.3, 0.3, 0.1),
                ratio=(1, 1),
            ),
        ),
        DatasetSpec(
            name="sop",
            title="Stanford Online Products",
            folder="data/Stanford_Online_Products",
            split_rule="Ebay_train.txt / Ebay_test.txt",
            downloads=(
                Download(
                    "Stanford_Online_Products.zip",
                    (
                        "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                        "http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                        "ftp://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                    ),
                    "7f73d41a2f44250d4779881525aea32e",
                ),
            ),
            source="downloaded",
            expected={"train": (59_551, 11_318), "test": (60_502, 11_316)},
            recalls=(1, 10, 100, 1000),
            pair_sampler="balanced",
            settings=dict(_IMAGENET_SIZED, name="sop", data_path="data/Stanford_Online_Products", resize=(256, 256)),
        ),
        DatasetSpec(
            name="inshop",
            title="In-Shop Clothes Retrieval",
            folder="data/InShop",
            split_rule="list_eval_partition.txt: train, query and gallery (one item numbering for query and gallery)",
            downloads=(),
            source=f"placed by hand (Google Drive, {INSHOP_PAGE}): list_eval_partition.txt and img/ or img.zip",
            # The 3,985 test items are shared by query and gallery, whose per-file class counts are not published.
            expected={"train": (25_882, 3_997), "test_query": (14_218, None), "test_gallery": (12_612, None)},
            recalls=(1, 10, 20, 30, 40, 50),
            pair_sampler="balanced",
            settings=dict(
                _IMAGENET_SIZED,
                name="inshop",
                data_path="data/InShop",
                test_file="test_query.txt",
                gallery_file="test_gallery.txt",
            ),
        ),
    )
}

# 64 px images with light augmentation: the `dataset.<name>_vae` named configs of the autoencoder baselines.
VAE_SETTINGS = dict(resize=(64, 64), crop_size=64, scale=(0.8, 1.0), color_jitter=None, batch_size=64)


def named_configs() -> dict[str, dict]:
    """`dataset.<name>` for every data set and `dataset.<name>_vae` for the real ones."""
    configs = {name: spec.settings for name, spec in DATASETS.items()}
    real = [name for name in DATASETS if name != "digits"]
    configs.update({f"{name}_vae": dict(DATASETS[name].settings, **VAE_SETTINGS) for name in real})
    return configs


def markdown_table() -> str:
    """The data sets as a markdown table (docs/data.md shows it)."""
    lines = ["| named config | folder | images train / test (classes) | split | recall Ks |", "|---|---|---|---|---|"]
    for name, spec in DATASETS.items():
        counts = " / ".join(
            f"{images:,}" + (f" ({classes:,})" if classes else "") for images, classes in spec.expected.values()
        )
        ks = " ".join(map(str, spec.recalls))
        lines.append(f"| `dataset.{name}` | {spec.folder} | {counts} | {spec.split_rule} | {ks} |")
    return "\n".join(lines) + "\n"


def mirrors_table() -> str:
    """Each file's mirrors and checksum as a markdown table (data/README.md shows it)."""
    lines = ["| data set | file | md5 | mirrors, in the order tried |", "|---|---|---|---|"]
    for spec in DATASETS.values():
        for download in spec.downloads:
            mirrors = "<br>".join(download.mirrors)
            lines.append(f"| {spec.title} | {download.file} | {download.md5} | {mirrors} |")
        if not spec.downloads and spec.name != "digits":
            lines.append(f"| {spec.title} | - | - | {spec.source} |")
    return "\n".join(lines) + "\n"
