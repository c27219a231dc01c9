"""Download, verify, extract and split the data sets: one sacred experiment per data set.

    python prepare_data.py                             prepare every data set it can, report on each
    python prepare_data.py cub                         one data set: cub, cars, sop, inshop or digits
    python prepare_data.py cub with data_path=/x       ... with sacred config updates
    python prepare_data.py cub print_config            ... or any other sacred command

Each data set ends up as split files of `relative/path,label` lines in its data_path: train.txt and
test.txt (In-Shop: train.txt, test_query.txt and test_gallery.txt).
"""

import sys
import traceback
from pathlib import Path

from sacred import Experiment
from sacred.utils import apply_backspaces_and_linefeeds

from utils.data import datasets
from utils.data.datasets import Samples
from utils.errors import InputError

cub = Experiment("prepare_cub")
cars = Experiment("prepare_cars")
sop = Experiment("prepare_sop")
inshop = Experiment("prepare_inshop")
digits = Experiment("prepare_digits")
EXPERIMENTS = {"cub": cub, "cars": cars, "sop": sop, "inshop": inshop, "digits": digits}
for _experiment in EXPERIMENTS.values():
    _experiment.captured_out_filter = apply_backspaces_and_linefeeds  # keep tqdm's redraws out of cout.txt


@cub.config
def cub_config():
    data_path = "data/CUB_200_2011"  # the archive is downloaded and extracted here; the split files go here
    url = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
    md5 = "97eceeb196236b17998738112f37df78"  # None: accept the archive unchecked
    download = True  # False: use only what is already in data_path


@cars.config
def cars_config():
    data_path = "data/CARS_196"  # car_ims.tgz and cars_annos.mat are downloaded (or placed by hand) here
    images_url = "http://ai.stanford.edu/~jkrause/car196/car_ims.tgz"
    images_md5 = "d5c8f0aa497503f355e17dc7886c3f14"  # None: accept the archive unchecked
    annotations_url = "http://ai.stanford.edu/~jkrause/car196/cars_annos.mat"
    annotations_md5 = "b407c6086d669747186bd1d764ff9dbc"  # None: accept the file unchecked
    download = True  # False: use only what is already in data_path


@sop.config
def sop_config():
    data_path = "data/Stanford_Online_Products"  # the archive is downloaded and extracted here
    url = "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip"
    md5 = "7f73d41a2f44250d4779881525aea32e"  # None: accept the archive unchecked
    download = True  # False: use only what is already in data_path


@inshop.config
def inshop_config():
    data_path = "data/InShop"  # holds list_eval_partition.txt and img/ (or img.zip), placed by hand


@digits.config
def digits_config():
    data_path = "data/digits"
    seed = 0  # of the random rendering


def finish(name: str, data_path: Path, splits: dict[str, Samples]) -> str:
    """Check the images, write the split files and describe them, with a warning per unofficial count."""
    missing = datasets.missing_images(data_path, splits)
    if missing:
        total = sum(len(samples) for samples in splits.values())
        raise InputError(f"{len(missing):,} of the {total:,} images listed by the annotations are missing in "
                         f"{data_path} (first: {missing[0]}): restore them, or delete the extracted folder and run "
                         f"again to re-extract the archive")
    datasets.write_splits(data_path, splits)
    return describe(name, data_path, splits)


def describe(name: str, data_path: Path, splits: dict[str, Samples]) -> str:
    counts = {split: (len(samples), len({label for _, label in samples})) for split, samples in splits.items()}
    sizes = ", ".join(f"{split} {images:,} images / {classes:,} classes" for split, (images, classes) in counts.items())
    lines = [f"ready in {data_path}: {sizes}"]
    for split, (images, classes) in counts.items():
        official_images, official_classes = datasets.EXPECTED.get(name, {}).get(split, (images, None))
        if images != official_images or official_classes not in (None, classes):
            official = f"{official_images:,} images" + (f" / {official_classes:,} classes" if official_classes else "")
            lines.append(f"warning: {split} has {images:,} images / {classes:,} classes, the official split "
                         f"{official}: is the data complete and official?")
    return "\n".join(lines)


@cub.main
def prepare_cub(data_path: str, url: str, md5: str | None, download: bool) -> str:
    return finish("cub", Path(data_path), datasets.prepare_cub(Path(data_path), url, md5, download))


@cars.main
def prepare_cars(data_path: str, images_url: str, images_md5: str | None, annotations_url: str,
                 annotations_md5: str | None, download: bool) -> str:
    splits = datasets.prepare_cars(Path(data_path), images_url, images_md5, annotations_url, annotations_md5, download)
    return finish("cars", Path(data_path), splits)


@sop.main
def prepare_sop(data_path: str, url: str, md5: str | None, download: bool) -> str:
    return finish("sop", Path(data_path), datasets.prepare_sop(Path(data_path), url, md5, download))


@inshop.main
def prepare_inshop(data_path: str) -> str:
    return finish("inshop", Path(data_path), datasets.prepare_inshop(Path(data_path)))


@digits.main
def prepare_digits(data_path: str, seed: int) -> str:
    from utils.data.digits import prepare_digits as render  # scikit-learn loads slowly: only when asked for

    render(data_path, seed)
    splits = {split: [(path, int(label)) for path, _, label in
                      (line.rpartition(",") for line in (Path(data_path) / split).read_text().splitlines())]
              for split in ("train.txt", "test.txt")}
    return describe("digits", Path(data_path), splits)


def prepare_all(config_updates: dict[str, dict] | None = None) -> int:
    """Run every experiment, printing one report per data set; 1 only when one failed unexpectedly."""
    status = 0
    for name, experiment in EXPERIMENTS.items():
        try:
            # Quiet runs: the report below replaces sacred's start / result / failure lines.
            run = experiment.run(config_updates=(config_updates or {}).get(name),
                                 options={"--loglevel": "CRITICAL", "--capture": "no"})
            lines = run.result.splitlines()
        except InputError as error:
            lines = str(error).splitlines()
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
        print(f"unknown data set {name!r}: choose one of {', '.join(EXPERIMENTS)}, or give none to prepare all",
              file=sys.stderr)
        return 2
    # Sacred exits by itself (status 1) when the run fails.
    EXPERIMENTS[name].run_commandline([argv[0], *argv[2:]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
