"""Bad input stops the run with exit status 1 and one line that says what is wrong and what to do, before
training where possible. Runs go through `ex.run_commandline` in this process; one runs as a real subprocess."""

import os
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from tests.conftest import REPO, SHRINK, Outcome, assert_input_error, weights_filename

pytestmark = pytest.mark.usefixtures("torch_home")


def data_path(path: Path) -> str:
    return f"dataset.data_path={path}"


@pytest.fixture
def cub_run(datasets, experiment):
    """A shrunk small_cnn run on the CUB stand-in, with extra updates."""

    def run(*updates: str, root: Path | None = None) -> Outcome:
        return experiment("with dataset.cub model.small_cnn", *SHRINK, data_path(root or datasets["cub"]), *updates)

    return run


def test_unknown_dataset_name_in_a_subprocess(tmp_path):
    """The real command line: exit status 1, no traceback, one line naming the choices."""
    command = [sys.executable, str(REPO / "experiment.py"), "with", "dataset.name=foo", f"output_dir={tmp_path}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=os.environ)
    assert_input_error(
        Outcome(done.returncode, None, done.stdout, done.stderr),
        "dataset.name='foo' is invalid",
        "expected one of digits, cub, cars, sop, inshop",
    )


def test_unknown_named_config(experiment):
    # Sacred's own message names the unknown config and lists the dataset's named configs.
    assert_input_error(
        experiment("with dataset.foo"), '"foo"', "'cub'", "'inshop'", error="sacred.utils.NamedConfigNotFoundError"
    )


@pytest.mark.parametrize(
    ("update", "fragments"),
    [
        ("model.arch=foo", ("model.arch='foo' is invalid", "expected one of", "resnet50")),
        ("model.pooling=sum", ("model.pooling='sum' is invalid", "avg+max")),
        ("model.norm_layer=group", ("model.norm_layer='group' is invalid",)),
        ("scheduler=foo", ("scheduler='foo' is invalid", "expected one of", "warmcos")),
        ("dataset.sampler=foo", ("dataset.sampler='foo' is invalid", "expected one of", "balanced")),
        ("optimizer=foo", ("optimizer='foo' is invalid", "expected one of", "adamw")),
        ("cudnn_flag=fast", ("cudnn_flag='fast' is invalid", "deterministic")),
        ("loss.pairwise=triplet", ("loss.pairwise='triplet' is invalid", "multisimilarity")),
        ("metrix.mode=pixels", ("metrix.mode='pixels' is invalid", "feature")),
        ("metrix.feature metrix.strategy=all", ("metrix.strategy='all' is invalid", "positive_negative")),
        ("metrix.feature metrix.weight=0", ("no loss would use the mixed examples", "metrix.weight")),
        ("metrix.feature metrix.lam=per_anchor", ("metrix.lam='per_anchor' is invalid", "per_batch", "per_pair")),
        (
            "metrix.feature metrix.anchor_negative=all",
            ("metrix.anchor_negative='all' is invalid", "no_positive", "every_anchor"),
        ),
        (
            "metrix.embed metrix.anchor_negative_weight=-1",
            ("metrix.anchor_negative_weight=-1 is invalid", "a number in [0, infinity)"),
        ),
        ("loss.ce_weight=0", ("no loss to train with",)),
        ("scheduler=step", ("scheduler='step', lr_step=None are inconsistent", "lr_step set")),
        ("eval_every=0", ("eval_every=0 is invalid", "an integer >= 1")),
        ("lr=1e308", ("lr=1e+308 is invalid", "a number in (0, 1e+38]")),
        ("weight_decay=1e308", ("weight_decay=1e+308 is invalid", "a number in [0, 1e+38]")),
        ("dist_timeout=0", ("dist_timeout=0 is invalid", "a number in [1, 86400]")),
        ("evaluation.metrics=['recall','auc']", ("evaluation.metrics=['recall', 'auc'] is invalid", "map_at_r")),
        ("evaluation.metrics=[recall,nmi]", ("evaluation.metrics='[recall,nmi]' is invalid", "quote them")),
        ("evaluation.final_metrics=['nmi']", ("evaluation.final_metrics=['nmi'] lacks 'recall'",)),
        ("evaluation.backend=annoy", ("evaluation.backend='annoy' is invalid", "faiss-gpu", "torch")),
        (
            "evaluation.backend=faiss-gpu",
            ("evaluation.backend='faiss-gpu'", "needs a faiss build with GPU support", "use 'torch'"),
        ),
        ("evaluation.recalls=[1,32]", ("R@32", "only 15 neighbours", "lower evaluation.recalls")),
        (
            "dataset.sampler=random_id dataset.images_per_class=4 dataset.batch_size=4",
            ("single class of 4 images", "at least 8"),
        ),
        ("dataset.sampler=random_id dataset.images_per_class=5 dataset.batch_size=10", ("classes of 5 images",)),
        (
            "dataset.sampler=balanced dataset.images_per_class=2 dataset.batch_size=16",
            ("needs 8 classes", "has 4 such classes", "lower dataset.batch_size"),
        ),
        ("dataset.sampler=balanced dataset.images_per_class=3 dataset.batch_size=8", ("must be a multiple",)),
    ],
    ids=[
        "arch",
        "pooling",
        "norm_layer",
        "scheduler",
        "sampler",
        "optimizer",
        "cudnn_flag",
        "pairwise",
        "mode",
        "strategy",
        "metrix_weight",
        "metrix_lam",
        "anchor_negative",
        "anchor_negative_weight",
        "no_loss",
        "lr_step",
        "eval_every",
        "huge_lr",
        "huge_weight_decay",
        "dist_timeout",
        "metric",
        "unquoted",
        "no_recall",
        "backend",
        "faiss_gpu",
        "recall",
        "random_id",
        "random_id_size",
        "balanced",
        "multiple",
    ],
)
def test_bad_setting(update, fragments, cub_run):
    assert_input_error(cub_run(*update.split()), *fragments)


def test_recall_beyond_the_inshop_gallery(datasets, experiment):
    outcome = experiment(
        "with dataset.inshop model.small_cnn", *SHRINK, data_path(datasets["inshop"]), "evaluation.recalls=[1,10]"
    )
    assert_input_error(outcome, "R@10", "only 8 neighbours")


def test_missing_data_folder(cub_run, tmp_path):
    assert_input_error(
        cub_run(root=tmp_path / "nowhere"), f"{tmp_path / 'nowhere'} not found", "prepare_data.py", "dataset.data_path"
    )


def test_missing_split_file(cub_run, dataset_copy):
    root = dataset_copy("cub")
    (root / "test.txt").unlink()
    assert_input_error(cub_run(root=root), f"{root / 'test.txt'} not found", "prepare_data.py")


def test_unparsable_split_line(cub_run, dataset_copy):
    root = dataset_copy("cub")
    with open(root / "train.txt", "a") as split:
        split.write("images/a.jpg;3\n")
    assert_input_error(cub_run(root=root), f"{root / 'train.txt'}, line 17", "'relative/path,label'")


@pytest.mark.parametrize("workers", [0, 1])
def test_missing_image(workers, cub_run, dataset_copy):
    # Found when the split file is read, before any DataLoader worker starts.
    root = dataset_copy("cub")
    image = root / (root / "test.txt").read_text().split(",", 1)[0]
    image.unlink()
    assert_input_error(
        cub_run(f"dataset.num_workers={workers}", root=root), f"image {image}", "is missing", "prepare_data.py"
    )


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image(damage, workers, cub_run, dataset_copy):
    """Images are decoded lazily on the real data sets, so the error comes from inside the DataLoader."""
    root = dataset_copy("cub")
    image = root / (root / "train.txt").read_text().split(",", 1)[0]
    data = image.read_bytes()
    image.write_bytes(b"not a jpeg" if damage == "garbage" else data[: len(data) // 2])
    line = assert_input_error(
        cub_run(f"dataset.num_workers={workers}", root=root), f"image {image} cannot be read", "replace the file"
    )
    assert "DataLoader worker" not in line


@pytest.mark.parametrize("gpu_augment", [False, True])
def test_an_image_claiming_too_many_pixels(gpu_augment, cub_run, dataset_copy):
    """A JPEG under a kilobyte whose header claims 20,000 x 20,000 pixels: refused by name, nothing decoded."""
    from tests.test_image_limits import claiming_jpeg

    root = dataset_copy("cub")
    image = claiming_jpeg(root / (root / "train.txt").read_text().split(",", 1)[0], 20_000, 20_000)
    outcome = cub_run(f"dataset.gpu_augment={gpu_augment}", root=root)
    assert_input_error(outcome, f"image {image} claims 400,000,000 pixels", "replace the file")


def test_a_split_path_leaving_the_data_folder(cub_run, dataset_copy):
    root = dataset_copy("cub")
    with open(root / "train.txt", "a") as split:
        split.write("../../outside.jpg,3\n")
    assert_input_error(cub_run(root=root), f"{root / 'train.txt'}, line 17", "leads outside the data folder")


def test_a_planted_pickle_in_the_torch_cache(datasets, experiment, monkeypatch, tmp_path):
    """A pickle that would run code, under the default weights' name: the run stops before unpickling it."""
    from tests.test_weights import plant

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    plant(checkpoints / weights_filename("resnet18"), tmp_path / "code-ran")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DML_SKIP_WEIGHT_HASH")
    outcome = experiment("with dataset.cub", *SHRINK, data_path(datasets["cub"]))
    assert_input_error(outcome, f"weight file {checkpoints / weights_filename('resnet18')} is not the published one")
    assert not (tmp_path / "code-ran").exists()


def test_pretrained_weights_unavailable(datasets, experiment, monkeypatch, tmp_path):
    """An empty torch cache and no network: the message names the file and where to put it."""

    def offline(url, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    outcome = experiment("with dataset.cub", *SHRINK, data_path(datasets["cub"]))
    assert_input_error(
        outcome, weights_filename("resnet18"), str(tmp_path / "torch" / "hub" / "checkpoints"), "model.pretrained=False"
    )
