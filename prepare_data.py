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
from utils.data.specs import DATASETS
from utils.errors import InputError

cub = Experiment("prepare_cub")
cars = Experiment("prepare_cars")
sop = Experiment("prepare_sop")
inshop = Experiment("prepare_inshop")
digits = Experiment("prepare_digits")
EXPERIMENTS = {"cub": cub, "cars": cars, "sop": sop, "inshop": inshop, "digits": digits}
for _experiment in EXPERIMENTS.values():
    _experiment.captured_out_filter = apply_backspaces_and_linefeeds  # keep tqdm's redraws out of cout.txt


# The facts of each data set (folder, mirrors tried in order under one checksum, published split counts) are its
# specification in utils/data/specs.py; the configs below only expose them as settings.
CUB, CARS, SOP, INSHOP, DIGITS = (DATASETS[name] for name in ("cub", "cars", "sop", "inshop", "digits"))


@cub.config
def cub_config():
    data_path = CUB.folder  # the archive is downloaded and extracted here; the split files go here
    urls = list(CUB.downloads[0].mirrors)  # mirrors of the archive, tried in order
    md5 = CUB.downloads[0].md5  # None: accept the archive unchecked
    download = True  # False: use only what is already in data_path
    expected = CUB.expected  # split -> (images, classes) to insist on; None: no check
    workers = os.cpu_count()  # threads decoding the images


@cars.config
def cars_config():
    data_path = CARS.folder  # car_ims.tgz and cars_annos.mat are downloaded (or placed by hand) here
    images_urls = list(CARS.downloads[0].mirrors)  # mirrors, tried in order
    images_md5 = CARS.downloads[0].md5  # None: accept the archive unchecked
    annotations_urls = list(CARS.downloads[1].mirrors)
    annotations_md5 = CARS.downloads[1].md5  # None: accept the file unchecked
    download = True  # False: use only what is already in data_path
    expected = CARS.expected  # split -> (images, classes) to insist on; None: no check
    workers = os.cpu_count()  # threads decoding the images


@sop.config
def sop_config():
    data_path = SOP.folder  # the archive is downloaded and extracted here
    urls = list(SOP.downloads[0].mirrors)  # mirrors of the archive, tried in order
    md5 = SOP.downloads[0].md5  # None: accept the archive unchecked
    download = True  # False: use only what is already in data_path
    expected = SOP.expected  # split -> (images, classes) to insist on; None: no check
    workers = os.cpu_count()  # threads decoding the images


@inshop.config
def inshop_config():
    data_path = INSHOP.folder  # holds list_eval_partition.txt and img/ (or img.zip), placed by hand
    expected = INSHOP.expected  # split -> (images, classes) to insist on; None: no check
    workers = os.cpu_count()  # threads decoding the images


@digits.config
def digits_config():
    data_path = DIGITS.folder
    seed = 0  # of the random rendering
    expected = DIGITS.expected  # split -> (images, classes) to insist on; None: no check
    workers = os.cpu_count()  # threads decoding the images


@contextmanager
def preparing(name: str, data_path: Path) -> Iterator[dict | None]:
    """Hold data_path's lock and mark it incomplete until the body returns; on failure, leave no folder that was not
    there before. A second run on a folder being prepared is refused before it writes anything.

    Gives the previous manifest, whose record of verified split files spares decoding them again.
    """
    with manifest.exclusive(data_path):
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
