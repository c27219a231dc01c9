"""The experiment end to end: the README's and the papers' command lines, the -F observer's files, the digits
default and determinism (bad input: test_bad_input.py).

Runs are shrunk with overrides after the verbatim words (sacred's last update wins): one epoch on
the stand-ins of tests/conftest.py, 32 px crops, batches of 8. Most runs go through
`ex.run_commandline` in this process, because importing torch in a subprocess costs seconds per
run; the result-directory seed line runs as a real subprocess.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.backbones import get_backbone
from models.metric_model import EmbeddingHead, MetricModel
from tests.conftest import REPO, SHRINK, digits_updates

pytestmark = pytest.mark.usefixtures("torch_home")

# the README's and the papers' command lines (prepare_data.py aside; -F result_dir has its own test).
SEED_LINES = [
    "with dataset.cub",
    "with dataset.cub model.resnet50 epochs=30 lr=0.02",
    "with dataset.cars model.resnet50 epochs=100 lr=0.05 model.norm_layer=batch",
    "with dataset.sop model.resnet50 epochs=100 lr=0.003 momentum=0.99 nesterov=True model.norm_layer=batch",
    "with dataset.inshop model.resnet50 epochs=100 lr=0.003 momentum=0.99 nesterov=True model.norm_layer=batch",
]


# The final evaluation of the best weights reports every metric (evaluation.final_metrics).
FINAL_KEYS = {f"{d}/{name}" for d in ("l2", "cosine") for name in ("R@1", "R@2", "MAP@R", "R-Precision")} | {
    "NMI",
    "utilization",
}


def data_path(path: Path) -> str:
    return f"dataset.data_path={path}"


def model_from_config(config: dict, info: dict) -> torch.nn.Module:
    """The model a run's config and info describe, with random weights (the sacred wrapper needs a run)."""
    options = config["model"]
    backbone = get_backbone(info["model"]["arch"], None)
    head = EmbeddingHead(
        backbone.out_channels,
        options["num_features"] or backbone.out_channels,
        options["pooling"] or "avg",  # None: a CNN's default
        options["norm_layer"],
        options["remap"],
        options["normalize"],
    )
    return MetricModel(backbone, head)


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
    """cout.txt holds the recall tables, the final evaluation and the last line, and nothing of the progress bars."""
    cout = cout_file.read_bytes().decode()  # read_text() would turn a carriage return into a line feed
    tables = {(epoch, distance) for epoch in range(epochs + 1) for distance in ("l2", "cosine")}
    assert set(recall_table(cout)) == tables
    lines = cout.splitlines()
    assert all(line.startswith(("Backbone ", "Epoch ", "Train ")) for line in lines[:-4]) and lines[-1].startswith(
        "Best epoch"
    )
    assert [line.split("|")[1].strip() for line in lines[-4:-1]] == ["l2", "cosine", "all"]
    assert "\r" not in cout and all(line == line.rstrip() for line in lines)


@pytest.mark.parametrize("words", SEED_LINES, ids=lambda words: "_".join(words.split()[1:3]))
def test_seed_command_line(words, datasets, experiment):
    name = words.split()[1].removeprefix("dataset.")
    outcome = experiment(words, *SHRINK, data_path(datasets[name]))
    assert outcome.code == 0, outcome.err
    config, info = outcome.run.config, outcome.run.info
    assert config["dataset"]["name"] == name and config["epochs"] == 1
    assert info["model"]["arch"] == ("resnet50" if "resnet50" in words else "resnet18")
    assert info["model"]["weights"] == "IMAGENET1K_V1"  # the fake ImageNet weights of the torch_home fixture
    assert outcome.run.result == info["metrics"]["cosine/R@1"]
    assert set(info["metrics"]) == FINAL_KEYS
    assert all(0 <= value <= 1 for key, value in info["metrics"].items() if key != "utilization")


@pytest.fixture(scope="module")
def result_dir(datasets, tmp_path_factory) -> Path:
    """`python experiment.py -F result_dir with dataset.cub`, shrunk, as a real subprocess."""
    cwd = tmp_path_factory.mktemp("observed")
    command = [
        sys.executable,
        str(REPO / "experiment.py"),
        "-F",
        "result_dir",
        "with",
        "dataset.cub",
        *SHRINK,
        data_path(datasets["cub"]),
        f"output_dir={cwd}",
    ]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr
    return cwd / "result_dir"


def test_result_dir_holds_config_run_metrics_and_output(result_dir):
    run_dir = result_dir / "1"
    assert {
        "config.json",
        "run.json",
        "metrics.json",
        "info.json",
        "cout.txt",
        "checkpoint.pt",
        "curves.png",
        "retrieval.png",
    } <= {path.name for path in run_dir.iterdir()}
    for picture in ("curves.png", "retrieval.png"):
        with Image.open(run_dir / picture) as image:
            assert image.format == "PNG" and min(image.size) > 500
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"]["name"] == "cub" and config["epochs"] == 1
    run = json.loads((run_dir / "run.json").read_text())
    info = json.loads((run_dir / "info.json").read_text())
    assert run["status"] == "COMPLETED"
    assert run["result"] == info["metrics"]["cosine/R@1"]
    assert info["best_epoch"] in (0, 1)
    assert info["checkpoint"] == str(run_dir.resolve() / "checkpoint.pt")

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
    outcome = experiment(
        f"-F {observed} -b 0.01 with dataset.cub model.small_cnn", *SHRINK, "epochs=2", data_path(datasets["cub"])
    )
    assert outcome.code == 0, outcome.err
    assert_clean_output(observed / "1" / "cout.txt", epochs=2)


def test_result_dir_checkpoint_loads_into_the_model(result_dir):
    run_dir = result_dir / "1"
    config = json.loads((run_dir / "config.json").read_text())
    info = json.loads((run_dir / "info.json").read_text())
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    model = model_from_config(config, info)
    model.load_state_dict(checkpoint["best"]["model"])  # strict: same keys and shapes
    assert checkpoint["best"]["epoch"] == info["best_epoch"] and checkpoint["config"] == config
    assert checkpoint["rebuild"] == {**info["model"], "num_classes": 4, "embedding_size": 512}
    assert not any(Path(tempfile.gettempdir()).glob("resnet18_cub_*"))  # no copy of the weights outside


def test_failed_run_keeps_what_was_written(dataset_copy, experiment, tmp_path):
    """A run that fails mid-training leaves a FAILED run with its output so far; earlier runs stay intact."""
    root = dataset_copy("cub")
    observed = tmp_path / "runs"
    # Without the frozen-backbone baseline, whose utilization would read the broken training image before epoch 0.
    words = f"-F {observed} with dataset.cub model.small_cnn baseline=False"
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
    assert outcome.run.info["model"]["arch"] == "small_cnn" and outcome.run.config["optimizer"] == "adam"


def test_thinned_evaluation_and_full_final_evaluation(digits_path, experiment, tmp_path):
    """eval_every=2 evaluates before training, at epoch 2 and at the last epoch, with the per-epoch metrics only;
    the best epoch's weights are then evaluated with every final metric, recalls unchanged."""
    observed = tmp_path / "runs"
    outcome = experiment(
        f"-F {observed} with epochs=3 eval_every=2 evaluation.metrics=['recall','map_at_r']",
        *digits_updates(digits_path),
    )
    assert outcome.code == 0, outcome.err
    metrics = json.loads((observed / "1" / "metrics.json").read_text())
    assert metrics["eval.cosine/R@1"]["steps"] == [0, 2, 3]
    assert metrics["eval.l2/MAP@R"]["steps"] == [0, 2, 3]
    assert not any(key.startswith("eval.") and ("R-Precision" in key or "NMI" in key) for key in metrics)
    assert len(metrics["train.loss"]["steps"]) == 3 * 3  # 50 small training images in batches of 16

    info = outcome.run.info
    assert info["best_epoch"] in (0, 2, 3)
    assert set(info["metrics"]) == {
        f"{d}/{name}" for d in ("l2", "cosine") for name in ("R@1", "R@2", "R@4", "R@8", "MAP@R", "R-Precision")
    } | {"NMI", "utilization"}
    position = metrics["eval.cosine/R@1"]["steps"].index(info["best_epoch"])
    for key in ("cosine/R@1", "l2/R@8", "cosine/MAP@R"):
        assert info["metrics"][key] == pytest.approx(metrics[f"eval.{key}"]["values"][position], abs=1e-12)
    assert 0 <= info["metrics"]["NMI"] <= 1 and info["metrics"]["utilization"] > 0
    assert "Best  " in outcome.out and "| all    | NMI" in outcome.out


def test_same_seed_same_run(digits_path, experiment, tmp_path):
    """Two CPU runs with one seed log identical losses and metrics and save identical weights."""
    observed = tmp_path / "runs"
    for _ in range(2):
        assert experiment(f"-F {observed} with epochs=1 seed=3", *digits_updates(digits_path)).code == 0
    runs = [observed / str(i) for i in (1, 2)]
    series = [
        {
            key: (value["steps"], value["values"])
            for key, value in json.loads((run / "metrics.json").read_text()).items()
        }
        for run in runs
    ]  # without the time stamps
    assert series[0] == series[1]
    infos = [json.loads((run / "info.json").read_text()) for run in runs]
    assert [info.pop("checkpoint") for info in infos] == [str(run / "checkpoint.pt") for run in runs]
    assert infos[0] == infos[1]
    weights = [torch.load(run / "checkpoint.pt", weights_only=True)["model"] for run in runs]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
