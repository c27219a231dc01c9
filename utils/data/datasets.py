"""The four real data sets: how each is fetched and how its official lists become split files (the facts of
each, its mirrors, checksums and counts, are its specification in utils/data/specs.py).

Archives are downloaded into the data set's folder and extracted there unchanged, so a copy extracted
by hand (into that folder or into the archive's own sub-folder) is used as it is. Split paths are
relative to the data set's folder; labels run from 0 within each split.
"""

from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
from scipy.io import loadmat
from scipy.io.matlab import MatReadError

from utils.data.download import download, extract, is_extracted
from utils.data.specs import DATASETS, INSHOP_PAGE
from utils.errors import InputError
from utils.files import atomic_write

Samples = list[tuple[str, int]]
Urls = str | Sequence[str]  # one URL, or mirrors of one file in the order to try them

# CUB and Cars: the first classes (by id) train, the rest test, as many as their specifications publish.
CUB_TRAIN_CLASSES = DATASETS["cub"].expected["train"][1]
CARS_TRAIN_CLASSES = DATASETS["cars"].expected["train"][1]


def relabel(*splits: list[tuple[str, Hashable]]) -> list[Samples]:
    """Number the classes found in the given splits 0, 1, ... in sorted order, one numbering for all."""
    classes = sorted({label for split in splits for _, label in split})
    index = {label: number for number, label in enumerate(classes)}
    return [[(path, index[label]) for path, label in split] for split in splits]


def _read_rows(path: Path, columns: int, skip: int = 0, numeric: tuple[int, ...] = ()) -> list[list[str]]:
    """Whitespace-separated rows of an annotation file; a malformed line names its file and number."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()[skip:], start=skip + 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns or not all(fields[i].isascii() and fields[i].isdigit() for i in numeric):
            raise InputError(
                f"{path}, line {number}: unexpected {line!r}; the file is damaged or not the "
                f"official one: restore it (delete the folder and run again)"
            )
        rows.append(fields)
    return rows


def _relative(path: Path, data_path: Path) -> str:
    return path.relative_to(data_path).as_posix()


def _split_by_class(samples: list[tuple[str, int]], train_classes: int) -> dict[str, Samples]:
    (train,) = relabel([sample for sample in samples if sample[1] <= train_classes])
    (test,) = relabel([sample for sample in samples if sample[1] > train_classes])
    return {"train.txt": train, "test.txt": test}


def _locate(data_path: Path, marker: str, folder: str) -> Path | None:
    """The folder holding marker: data_path itself or data_path/folder (where the archive puts it)."""
    return next((root for root in (data_path, data_path / folder) if (root / marker).is_file()), None)


def _obtain(urls: Urls, path: Path, md5: str | None, allow_download: bool, note: str = "") -> Path:
    if not allow_download and not path.is_file():
        first = urls if isinstance(urls, str) else urls[0]
        raise InputError(
            f"{path.name} not found and download=False: download {first} to {path}" + (f"; {note}" if note else "")
        )
    return download(urls, path, md5=md5, note=note)


def _fetch_and_extract(
    urls: Urls, archive: Path, md5: str | None, allow_download: bool, present: bool, note: str = ""
) -> None:
    """Extract archive (downloaded when missing) into its folder unless done; present: its files are there."""
    # Files there without the archive were extracted by hand, or the archive was deleted to save space.
    if present and (is_extracted(archive, archive.parent) or not archive.is_file()):
        return
    extract(_obtain(urls, archive, md5, allow_download, note), archive.parent, force=not present)


def _require(data_path: Path, marker: str, folder: str, archive: Path) -> Path:
    root = _locate(data_path, marker, folder)
    if root is None:
        raise InputError(
            f"{marker} is neither in {data_path} nor in {data_path / folder}, although {archive.name} "
            f"was extracted: is it the right archive? Delete it and run again"
        )
    return root


def prepare_cub(data_path: Path, urls: Urls, md5: str | None, allow_download: bool) -> dict[str, Samples]:
    """CUB-200-2011: first 100 classes train, last 100 test."""
    archive = data_path / "CUB_200_2011.tgz"
    present = _locate(data_path, "images.txt", "CUB_200_2011") is not None
    _fetch_and_extract(urls, archive, md5, allow_download, present)
    root = _require(data_path, "images.txt", "CUB_200_2011", archive)
    paths = dict(_read_rows(root / "images.txt", 2, numeric=(0,)))
    labels = {image: int(label) for image, label in _read_rows(root / "image_class_labels.txt", 2, numeric=(0, 1))}
    if paths.keys() != labels.keys():
        raise InputError(
            f"{root}: images.txt and image_class_labels.txt list different images: the data set is "
            f"damaged; delete it and run again"
        )
    samples = [(_relative(root / "images" / path, data_path), labels[image]) for image, path in paths.items()]
    return _split_by_class(samples, CUB_TRAIN_CLASSES)


def _read_cars_annotations(path: Path) -> list[tuple[str, int]]:
    """(relative_im_path, class) of every image in cars_annos.mat (a 1 x N struct array `annotations`)."""
    try:
        annotations = np.atleast_1d(loadmat(path, squeeze_me=True)["annotations"])
        return [
            (str(image), int(label))
            for image, label in zip(annotations["relative_im_path"], annotations["class"], strict=True)
        ]
    except (MatReadError, OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"{path} is not the Cars-196 annotation file ({type(error).__name__}: {error}): delete it and run again"
        ) from None


def prepare_cars(
    data_path: Path,
    images_urls: Urls,
    images_md5: str | None,
    annotations_urls: Urls,
    annotations_md5: str | None,
    allow_download: bool,
) -> dict[str, Samples]:
    """Cars-196 (car_ims.tgz and cars_annos.mat): first 98 classes train, last 98 test."""
    note = (
        f"the Stanford server is often offline: get car_ims.tgz and cars_annos.mat from a mirror of "
        f"Cars-196 and place both in {data_path}"
    )
    annotations = _obtain(annotations_urls, data_path / "cars_annos.mat", annotations_md5, allow_download, note)
    archive = data_path / "car_ims.tgz"
    _fetch_and_extract(images_urls, archive, images_md5, allow_download, (data_path / "car_ims").is_dir(), note)
    # The annotations' paths (car_ims/000001.jpg) are relative to the folder holding car_ims/.
    return _split_by_class(_read_cars_annotations(annotations), CARS_TRAIN_CLASSES)


def prepare_sop(data_path: Path, urls: Urls, md5: str | None, allow_download: bool) -> dict[str, Samples]:
    """Stanford Online Products: the official Ebay_train.txt / Ebay_test.txt split."""
    archive = data_path / "Stanford_Online_Products.zip"
    present = _locate(data_path, "Ebay_train.txt", "Stanford_Online_Products") is not None
    _fetch_and_extract(urls, archive, md5, allow_download, present)
    root = _require(data_path, "Ebay_train.txt", "Stanford_Online_Products", archive)

    def read(name: str) -> list[tuple[str, int]]:
        # Header `image_id class_id super_class_id path`; paths are relative to the list's folder.
        rows = _read_rows(root / name, 4, skip=1, numeric=(0, 1, 2))
        return [(_relative(root / path, data_path), int(label)) for _, label, _, path in rows]

    (train,) = relabel(read("Ebay_train.txt"))
    (test,) = relabel(read("Ebay_test.txt"))
    return {"train.txt": train, "test.txt": test}


def _inshop_missing(data_path: Path, missing: str) -> InputError:
    return InputError(
        f"{missing} not found in {data_path}: In-Shop cannot be downloaded automatically (it is on "
        f'Google Drive). Get the "In-shop Clothes Retrieval Benchmark" from {INSHOP_PAGE}: put '
        f"Eval/list_eval_partition.txt at {data_path / 'list_eval_partition.txt'} and Img/img.zip at "
        f"{data_path / 'img.zip'} (or unzip it there, giving {data_path / 'img'}), then run "
        f"`python prepare_data.py inshop`"
    )


def prepare_inshop(data_path: Path) -> dict[str, Samples]:
    """In-Shop from files placed by hand: train, and query / gallery sharing one item numbering."""
    partition = next(
        (
            path
            for path in (data_path / "list_eval_partition.txt", data_path / "Eval" / "list_eval_partition.txt")
            if path.is_file()
        ),
        None,
    )
    if partition is None:
        raise _inshop_missing(data_path, "list_eval_partition.txt")
    archive = next((path for path in (data_path / "img.zip", data_path / "Img" / "img.zip") if path.is_file()), None)
    present = (data_path / "img").is_dir()
    if archive is not None:
        extract(archive, data_path, force=not present)
    elif not present:
        raise _inshop_missing(data_path, "img/ (or img.zip)")
    # Line 1 is the image count, line 2 the header `image_name item_id evaluation_status`.
    by_status: dict[str, list[tuple[str, str]]] = {"train": [], "query": [], "gallery": []}
    for path, item, status in _read_rows(partition, 3, skip=2):
        if status not in by_status:
            raise InputError(f"{partition}: unknown evaluation_status {status!r} (expected train, query or gallery)")
        by_status[status].append((path, item))
    (train,) = relabel(by_status["train"])
    query, gallery = relabel(by_status["query"], by_status["gallery"])
    return {"train.txt": train, "test_query.txt": query, "test_gallery.txt": gallery}


def missing_images(data_path: Path, splits: dict[str, Samples]) -> list[str]:
    return [path for samples in splits.values() for path, _ in samples if not (data_path / path).is_file()]


def write_splits(data_path: Path, splits: dict[str, Samples]) -> None:
    """Write each split as `path,label` lines; via a temporary file, so a split file is never half-written."""
    for name, samples in splits.items():
        with atomic_write(data_path / name) as file:
            file.write("".join(f"{path},{label}\n" for path, label in samples))
