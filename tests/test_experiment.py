"""The experiment end to end: DESIGN.md's seed command lines, the -F observer's files, the digits
default, determinism, and one clear line for every kind of bad input.

Runs are shrunk with overrides after the verbatim words (sacred's last update wins): one epoch on
the stand-ins of tests/conftest.py, 32 px crops, batches of 8. Most runs go through
`ex.run_commandline` in this process, because importing torch in a subprocess costs seconds per
run; the result-directory seed line and one bad input run as real subprocesses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from models.ingredient import get_model
from tests.conftest import REPO, Outcome, assert_input_error, digits_updates, weights_filename

pytestmark = pytest.mark.usefixtures("torch_home")

SHRINK = ["epochs=1", "dataset.resize=40", "dataset.crop_size=32", "dataset.batch_size=8", "dataset.test_batch_size=16",
          "dataset.num_workers=0", "dataset.recalls=[1,2]", "cpu=True"]

# DESIGN.md's seed command lines (prepare_data.py aside; -F result_dir has its own test).
SEED_LINES = [
    "with dataset.cub",
    "with dataset.cub model.resnet50 epochs=30 lr=0.02",
    "with dataset.cars model.resnet50 epochs=100 lr=0.05 model.norm_layer=batch",
    "with dataset.sop model.resnet50 epochs=100 lr=0.003 momentum=0.99 nesterov=True model.norm_layer=batch",
    "with dataset.inshop model.resnet50 epochs=100 lr=0.003 momentum=0.99 nesterov=True model.norm_layer=batch",
]


def data_path(path: Path) -> str:
    return f"dataset.data_path={path}"


def model_from_config(config: dict, num_classes: int) -> torch.nn.Module:
    """The model a run's config describes, with random weights (the sacred wrapper needs a run)."""
    return get_model.__wrapped__(num_classes=num_classes, **dict(config["model"], pretrained=False))


def recall_table(out: str) -> dict[tuple[int, str], dict[str, float]]:
    """{(epoch, distance): {"R@1": ...}} from the printed `Epoch   1 | cosine | R@1 0.5 ...` lines."""
    table = {}
    for line in out.splitlines():
        if line.startswith("Epoch ") and line.count("|") == 2:
            epoch, distance, cells = (part.strip() for part in line.split("|"))
            names, values = cells.split()[::2], cells.split()[1::2]
            table[int(epoch.split()[1]), distance] = {n: float(v) for n, v in zip(names, values, strict=True)}
    return table


def assert_clean_output(cout_file: Path, epochs: int) -> None:
    """cout.txt holds the recall tables and the last line, and nothing of the progress bars."""
    cout = cout_file.read_bytes().decode()  # read_text() would turn a carriage return into a line feed
    tables = {(epoch, distance) for epoch in range(epochs + 1) for distance in ("l2", "cosine")}
    assert set(recall_table(cout)) == tables
    lines = cout.splitlines()
    assert all(line.startswith("Epoch ") for line in lines[:-1]) and lines[-1].startswith("Best epoch")
    assert "\r" not in cout and all(line == line.rstrip() for line in lines)


@pytest.mark.parametrize("words", SEED_LINES, ids=lambda words: "_".join(words.split()[1:3]))
def test_seed_command_line(words, datasets, experiment):
    name = words.split()[1].removeprefix("dataset.")
    outcome = experiment(words, *SHRINK, data_path(datasets[name]))
    assert outcome.code == 0, outcome.err
    config, info = outcome.run.config, outcome.run.info
    assert config["dataset"]["name"] == name and config["epochs"] == 1
    assert config["model"]["arch"] == ("resnet50" if "resnet50" in words else "resnet18")
    assert config["model"]["pretrained"]  # the fake ImageNet weights of the torch_home fixture
    assert outcome.run.result == info["metrics"]["cosine/R@1"]
    assert set(info["metrics"]) == {f"{d}/R@{k}" for d in ("l2", "cosine") for k in (1, 2)}
    assert all(0 <= value <= 1 for value in info["metrics"].values())


@pytest.fixture(scope="module")
def result_dir(datasets, tmp_path_factory) -> Path:
    """`python experiment.py -F result_dir with dataset.cub`, shrunk, as a real subprocess."""
    cwd = tmp_path_factory.mktemp("observed")
    command = [sys.executable, str(REPO / "experiment.py"), "-F", "result_dir", "with", "dataset.cub", *SHRINK,
               data_path(datasets["cub"]), f"temp_dir={cwd}"]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr
    return cwd / "result_dir"


def test_result_dir_holds_config_run_metrics_and_output(result_dir):
    run_dir = result_dir / "1"
    assert {"config.json", "run.json", "metrics.json", "info.json", "cout.txt", "checkpoint.pt"} <= {
        path.name for path in run_dir.iterdir()}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"]["name"] == "cub" and config["epochs"] == 1
    run = json.loads((run_dir / "run.json").read_text())
    info = json.loads((run_dir / "info.json").read_text())
    assert run["status"] == "COMPLETED"
    assert run["result"] == info["metrics"]["cosine/R@1"]
    assert info["best_epoch"] in (0, 1)
    assert "checkpoint.pt" in run["artifacts"]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"train.loss", "train.cross_entropy", "train.accuracy"} <= set(metrics)
    assert len(metrics["train.loss"]["values"]) == 2  # 16 training images in batches of 8
    for key in ("l2/R@1", "l2/R@2", "cosine/R@1", "cosine/R@2"):
        assert metrics[f"eval.{key}"]["steps"] == [0, 1]
    assert metrics["eval.cosine/R@1"]["values"][info["best_epoch"]] == run["result"]

    assert_clean_output(run_dir / "cout.txt", epochs=1)


def test_output_is_clean_despite_heartbeats(datasets, experiment, tmp_path):
    """Sacred's file observer appends what the output grew by at every heartbeat (-b seconds): a
    progress bar redrawing its line then would leave fragments in cout.txt, so bars stay out of it."""
    observed = tmp_path / "runs"
    outcome = experiment(f"-F {observed} -b 0.01 with dataset.cub model.small_cnn", *SHRINK, "epochs=2",
                         data_path(datasets["cub"]))
    assert outcome.code == 0, outcome.err
    assert_clean_output(observed / "1" / "cout.txt", epochs=2)


def test_result_dir_checkpoint_loads_into_the_model(result_dir):
    run_dir = result_dir / "1"
    config = json.loads((run_dir / "config.json").read_text())
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    model = model_from_config(config, num_classes=4)
    model.load_state_dict(state)  # strict: same keys and shapes
    assert all(not value.is_cuda for value in state.values())
    saved = (run_dir / "cout.txt").read_text().rsplit("weights saved to ", 1)[1].strip()
    assert Path(saved).read_bytes() == (run_dir / "checkpoint.pt").read_bytes()  # the copy outside the observer


def test_failed_run_keeps_what_was_written(dataset_copy, experiment, tmp_path):
    """A run that fails mid-training leaves a FAILED run with its output so far; earlier runs stay intact."""
    root = dataset_copy("cub")
    observed = tmp_path / "runs"
    words = f"-F {observed} with dataset.cub model.small_cnn"
    assert experiment(words, *SHRINK, data_path(root)).code == 0
    first = {path.name: path.read_bytes() for path in (observed / "1").iterdir()}

    first_train_image = root / (root / "train.txt").read_text().split(",", 1)[0]
    first_train_image.write_bytes(b"not a jpeg")
    assert experiment(words, *SHRINK, data_path(root)).code == 1

    assert {path.name: path.read_bytes() for path in (observed / "1").iterdir()} == first
    run = json.loads((observed / "2" / "run.json").read_text())
    assert run["status"] == "FAILED" and "cannot be read" in "".join(run["fail_trace"])
    metrics = json.loads((observed / "2" / "metrics.json").read_text())
    assert metrics["eval.cosine/R@1"]["steps"] == [0]  # the evaluation before training
    assert "Epoch   0 | cosine" in (observed / "2" / "cout.txt").read_text()  # printed before the failure


def test_digits_default_prints_recall_table(digits_path, experiment):
    outcome = experiment("with epochs=1", *digits_updates(digits_path))
    assert outcome.code == 0, outcome.err
    table = recall_table(outcome.out)
    assert set(table) == {(epoch, distance) for epoch in (0, 1) for distance in ("l2", "cosine")}
    assert all(set(row) == {"R@1", "R@2", "R@4", "R@8"} for row in table.values())
    info = outcome.run.info
    best = table[info["best_epoch"], "cosine"]
    assert outcome.run.result == info["metrics"]["cosine/R@1"]
    assert best["R@1"] == pytest.approx(outcome.run.result, abs=5e-5)  # printed with 4 decimals
    assert max(row["R@1"] for (_, distance), row in table.items() if distance == "cosine") == best["R@1"]
    assert outcome.run.config["model"]["arch"] == "small_cnn" and outcome.run.config["optimizer"] == "adam"


def test_same_seed_same_run(digits_path, experiment, tmp_path):
    """Two CPU runs with one seed log identical losses and metrics and save identical weights."""
    observed = tmp_path / "runs"
    for _ in range(2):
        assert experiment(f"-F {observed} with epochs=1 seed=3", *digits_updates(digits_path)).code == 0
    runs = [observed / str(i) for i in (1, 2)]
    series = [{key: (value["steps"], value["values"]) for key, value in json.loads((run / "metrics.json").read_text())
               .items()} for run in runs]  # without the time stamps
    assert series[0] == series[1]
    infos = [json.loads((run / "info.json").read_text()) for run in runs]
    assert infos[0] == infos[1]
    weights = [torch.load(run / "checkpoint.pt", weights_only=True) for run in runs]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


# ---- bad input: exit status 1 and one line that says what is wrong and what to do ----


@pytest.fixture
def cub_run(datasets, experiment):
    """A shrunk small_cnn run on the CUB stand-in, with extra updates."""

    def run(*updates: str, root: Path | None = None) -> Outcome:
        return experiment("with dataset.cub model.small_cnn", *SHRINK, data_path(root or datasets["cub"]), *updates)

    return run


def test_unknown_dataset_name_in_a_subprocess(tmp_path):
    """The real command line: exit status 1, no traceback, one line naming the choices."""
    command = [sys.executable, str(REPO / "experiment.py"), "with", "dataset.name=foo", f"temp_dir={tmp_path}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=os.environ)
    assert_input_error(Outcome(done.returncode, None, done.stdout, done.stderr), "dataset.name 'foo'",
                       "choose one of digits, cub, cars, sop, inshop")


def test_unknown_named_config(experiment):
    # Sacred's own message names the unknown config and lists the dataset's named configs.
    assert_input_error(experiment("with dataset.foo"), '"foo"', "'cub'", "'inshop'",
                       error="sacred.utils.NamedConfigNotFoundError")


@pytest.mark.parametrize(("update", "fragments"), [
    ("model.arch=foo", ("model.arch 'foo'", "choose one of", "resnet50")),
    ("scheduler=foo", ("scheduler 'foo'", "choose one of", "warmcos")),
    ("dataset.sampler=foo", ("dataset.sampler 'foo'", "choose one of", "balanced")),
    ("optimizer=foo", ("optimizer 'foo'", "choose one of", "adamw")),
    ("scheduler=step", ("scheduler='step' needs lr_step", "lr_step=10")),
    ("dataset.recalls=[1,32]", ("R@32", "only 15 neighbours", "lower dataset.recalls")),
    ("dataset.sampler=random_id dataset.images_per_class=4 dataset.batch_size=4",
     ("single class of 4 images", "at least 8")),
    ("dataset.sampler=balanced dataset.images_per_class=2 dataset.batch_size=16",
     ("needs 8 classes", "has 4 such classes", "lower dataset.batch_size")),
    ("dataset.sampler=balanced dataset.images_per_class=3 dataset.batch_size=8", ("must be a multiple",)),
], ids=["arch", "scheduler", "sampler", "optimizer", "lr_step", "recall", "random_id", "balanced", "multiple"])
def test_bad_setting(update, fragments, cub_run):
    assert_input_error(cub_run(*update.split()), *fragments)


def test_recall_beyond_the_inshop_gallery(datasets, experiment):
    outcome = experiment("with dataset.inshop model.small_cnn", *SHRINK, data_path(datasets["inshop"]),
                         "dataset.recalls=[1,10]")
    assert_input_error(outcome, "R@10", "only 8 neighbours")


def test_missing_data_folder(cub_run, tmp_path):
    assert_input_error(cub_run(root=tmp_path / "nowhere"), f"{tmp_path / 'nowhere'} not found", "prepare_data.py",
                       "dataset.data_path")


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
    assert_input_error(cub_run(f"dataset.num_workers={workers}", root=root), f"image {image}", "is missing",
                       "prepare_data.py")


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image(damage, workers, cub_run, dataset_copy):
    """Images are decoded lazily on the real data sets, so the error comes from inside the DataLoader."""
    root = dataset_copy("cub")
    image = root / (root / "train.txt").read_text().split(",", 1)[0]
    data = image.read_bytes()
    image.write_bytes(b"not a jpeg" if damage == "garbage" else data[: len(data) // 2])
    line = assert_input_error(cub_run(f"dataset.num_workers={workers}", root=root), f"image {image} cannot be read",
                              "replace the file")
    assert "DataLoader worker" not in line


def test_pretrained_weights_unavailable(datasets, experiment, monkeypatch, tmp_path):
    """An empty torch cache and no network: the message names the file and where to put it."""
    def offline(url, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    outcome = experiment("with dataset.cub", *SHRINK, data_path(datasets["cub"]))
    assert_input_error(outcome, weights_filename("resnet18"), str(tmp_path / "torch" / "hub" / "checkpoints"),
                       "model.pretrained=False")
