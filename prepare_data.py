"""Download, verify, extract and split the data sets: one sacred experiment per data set.

    python prepare_data.py                             prepare every data set it can, report on each
    python prepare_data.py cub                         one data set: cub, cars, sop, inshop or digits
    python prepare_data.py cub with data_path=/x       ... with sacred config updates
    python prepare_data.py cub print_config            ... or any other sacred command

Each data set ends up as split files of `relative/path,label` lines in its data_path: train.txt and
test.txt (In-Shop: train.txt, test_query.txt and test_gallery.txt). They are written only after every
listed image has decoded and the split counts matched the published ones (`expected`); manifest.json in
data_path records the outcome, and training refuses a folder it marks incomplete. The exit status is 1
when any requested data set is not ready.
"""

import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from sacred import Experiment
from sacred.utils import apply_backspaces_and_linefeeds

from utils.data import datasets, manifest
from utils.data.datasets import Samples
from utils.data.download import disk_full
from utils.data.images import read_split
from utils.errors import InputError

cub = Experiment("prepare_cub")
cars = Experiment("prepare_cars")
sop = Experiment("prepare_sop")
inshop = Experiment("prepare_inshop")
digits = Experiment("prepare_digits")
EXPERIMENTS = {"cub": cub, "cars": cars, "sop": sop, "inshop": inshop, "digits": digits}
for _experiment in EXPERIMENTS.values():
    _experiment.captured_out_filter = apply_backspaces_and_linefeeds  # keep tqdm's redraws out of cout.txt


# Mirrors are tried in order; one checksum covers them all. None of them could be reached from the machines this
# code was written on, so each is a plausible public address, not a verified one (see data/README.md).
CUB_URLS = [
    "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
    "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
    "http://www.vision.caltech.edu/visipedia-data/CUB-200-2011/CUB_200_2011.tgz",
]
# ai.stanford.edu/~jkrause/car196/ has been reported dead since 2023; imagenet.stanford.edu held a copy.
CARS_DIRECTORIES = [
    "http://ai.stanford.edu/~jkrause/car196/",
    "https://ai.stanford.edu/~jkrause/car196/",
    "http://imagenet.stanford.edu/internal/car196/",
]
SOP_URLS = [
    "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
    "http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
    "ftp://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
]
# The published (images, classes) of each split; a mismatch is refused. In-Shop's 3,985 test items are shared by
# query and gallery, whose per-file class counts are not published (None: not checked).
EXPECTED = {
    "cub": {"train": (5_864, 100), "test": (5_924, 100)},
    "cars": {"train": (8_054, 98), "test": (8_131, 98)},
    "sop": {"train": (59_551, 11_318), "test": (60_502, 11_316)},
    "inshop": {"train": (25_882, 3_997), "test_query": (14_218, None), "test_gallery": (12_612, None)},
    "digits": {"train": (901, 5), "test": (896, 5)},
}


@cub.config
def cub_config():
    data_path = "data/CUB_200_2011"  # the archive is downloaded and extracted here; the split files go here
    urls = CUB_URLS  # mirrors of the archive, tried in order
    md5 = "97eceeb196236b17998738112f37df78"  # None: accept the archive unchecked
    download = True  # False: use only what is already in data_path
    expected = EXPECTED["cub"]  # split -> (images, classes) to insist on; None: no check
    workers = os.cpu_count()  # threads decoding the images


@cars.config
def cars_config():
    data_path = "data/CARS_196"  # car_ims.tgz and cars_annos.mat are downloaded (or placed by hand) here
    images_urls = [directory + "car_ims.tgz" for directory in CARS_DIRECTORIES]  # mirrors, tried in order
    images_md5 = "d5c8f0aa497503f355e17dc7886c3f14"  # None: accept the archive unchecked
    annotations_urls = [directory + "cars_annos.mat" for directory in CARS_DIRECTORIES]
    annotations_md5 = "b407c6086d669747186bd1d764ff9dbc"  # None: accept the file unchecked
    download = True  # False: use only what is already in data_path
    expected = EXPECTED["cars"]  # split -> (images, classes) to insist on; None: no check
    workers = os.cpu_count()  # threads decoding the images


@sop.config
def sop_config():
    data_path = "data/Stanford_Online_Products"  # the archive is downloaded and extracted here
    urls = SOP_URLS  # mirrors of the archive, tried in order
    md5 = "7f73d41a2f44250d4779881525aea32e"  # None: accept the archive unchecked
    download = True  # False: use only what is already in data_path
    expected = EXPECTED["sop"]  # split -> (images, classes) to insist on; None: no check
    workers = os.cpu_count()  # threads decoding the images


@inshop.config
def inshop_config():
    data_path = "data/InShop"  # holds list_eval_partition.txt and img/ (or img.zip), placed by hand
    expected = EXPECTED["inshop"]  # split -> (images, classes) to insist on; None: no check
    workers = os.cpu_count()  # threads decoding the images


@digits.config
def digits_config():
    data_path = "data/digits"
    seed = 0  # of the random rendering
    expected = EXPECTED["digits"]  # split -> (images, classes) to insist on; None: no check
    workers = os.cpu_count()  # threads decoding the images


@contextmanager
def preparing(name: str, data_path: Path) -> Iterator[dict | None]:
    """Mark data_path incomplete until the body returns; on failure, leave no folder that was not there before.

    Gives the previous manifest, whose record of verified split files spares decoding them again.
    """
    existed = data_path.exists()
    previous = manifest.read(data_path)
    manifest.mark_incomplete(data_path, name, "preparation started and did not finish")
    try:
        yield previous
    except BaseException as error:
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"failed: {str(error).splitlines()[0]}"
        with suppress(OSError):  # the disk may be full
            manifest.mark_incomplete(data_path, name, reason)
            if not existed and [path.name for path in data_path.iterdir()] == [manifest.MANIFEST]:
                shutil.rmtree(data_path)
        if isinstance(error, OSError) and (full := disk_full(error, f"preparing {data_path}")):
            raise full from None
        raise


def finish(
    name: str,
    data_path: Path,
    splits: dict[str, Samples],
    expected: manifest.Expected | None,
    workers: int | None,
    previous: dict | None,
) -> str:
    """Check the images and the counts, write the split files, mark the folder complete and describe it."""
    missing = datasets.missing_images(data_path, splits)
    if missing:
        total = sum(len(samples) for samples in splits.values())
        raise InputError(
            f"{len(missing):,} of the {total:,} images listed by the annotations are missing in "
            f"{data_path} (first: {missing[0]}): restore them, or delete the extracted folder and run "
            f"again to re-extract the archive"
        )
    manifest.check_counts(splits, expected)
    verified = manifest.verified_before(previous, splits)
    if not verified:
        manifest.verify_images(data_path, splits, workers)
    datasets.write_splits(data_path, splits)
    if verified:
        manifest.write(data_path, previous)  # the earlier verification vouches for these very split files
    else:
        manifest.mark_complete(data_path, name, splits)
    return describe(data_path, splits)


def describe(data_path: Path, splits: dict[str, Samples]) -> str:
    counts = {split: (len(samples), len({label for _, label in samples})) for split, samples in splits.items()}
    sizes = ", ".join(f"{split} {images:,} images / {classes:,} classes" for split, (images, classes) in counts.items())
    return f"ready in {data_path}: {sizes}; every image decodes"


@cub.main
def prepare_cub(
    data_path: str, urls: list[str], md5: str | None, download: bool, expected: dict | None, workers: int | None
) -> str:
    with preparing("cub", Path(data_path)) as previous:
        splits = datasets.prepare_cub(Path(data_path), urls, md5, download)
        return finish("cub", Path(data_path), splits, expected, workers, previous)


@cars.main
def prepare_cars(
    data_path: str,
    images_urls: list[str],
    images_md5: str | None,
    annotations_urls: list[str],
    annotations_md5: str | None,
    download: bool,
    expected: dict | None,
    workers: int | None,
) -> str:
    with preparing("cars", Path(data_path)) as previous:
        splits = datasets.prepare_cars(
            Path(data_path), images_urls, images_md5, annotations_urls, annotations_md5, download
        )
        return finish("cars", Path(data_path), splits, expected, workers, previous)


@sop.main
def prepare_sop(
    data_path: str, urls: list[str], md5: str | None, download: bool, expected: dict | None, workers: int | None
) -> str:
    with preparing("sop", Path(data_path)) as previous:
        splits = datasets.prepare_sop(Path(data_path), urls, md5, download)
        return finish("sop", Path(data_path), splits, expected, workers, previous)


@inshop.main
def prepare_inshop(data_path: str, expected: dict | None, workers: int | None) -> str:
    with preparing("inshop", Path(data_path)) as previous:
        return finish("inshop", Path(data_path), datasets.prepare_inshop(Path(data_path)), expected, workers, previous)


@digits.main
def prepare_digits(data_path: str, seed: int, expected: dict | None, workers: int | None) -> str:
    from utils.data.digits import prepare_digits as render  # scikit-learn loads slowly: only when asked for

    with preparing("digits", Path(data_path)) as previous:
        render(data_path, seed)
        splits = {split: read_split(Path(data_path) / split) for split in ("train.txt", "test.txt")}
        return finish("digits", Path(data_path), splits, expected, workers, previous)


def prepare_all(config_updates: dict[str, dict] | None = None) -> int:
    """Run every experiment, printing one report per data set; 1 when any data set is not ready."""
    status = 0
    for name, experiment in EXPERIMENTS.items():
        try:
            # Quiet runs: the report below replaces sacred's start / result / failure lines.
            run = experiment.run(
                config_updates=(config_updates or {}).get(name), options={"--loglevel": "CRITICAL", "--capture": "no"}
            )
            lines = run.result.splitlines()
        except InputError as error:
            lines, status = str(error).splitlines(), 1
        except Exception as error:  # a bug in one data set must not stop the others
            traceback.print_exc()
            lines, status = [f"failed unexpectedly ({type(error).__name__}: {error}); see the traceback above"], 1
        for line in lines:
            print(f"{name}: {line}", flush=True)
    return status


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        return prepare_all()
    name = argv[1]
    if name in ("-h", "--help"):
        print(__doc__)
        return 0
    if name not in EXPERIMENTS:
        print(
            f"unknown data set {name!r}: choose one of {', '.join(EXPERIMENTS)}, or give none to prepare all",
            file=sys.stderr,
        )
        return 2
    # Sacred exits by itself (status 1) when the run fails.
    EXPERIMENTS[name].run_commandline([argv[0], *argv[2:]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
