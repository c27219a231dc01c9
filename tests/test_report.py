"""`python -m utils.report` on run folders written by the real experiments with -F (completed, interrupted and
resumed, failed, autoencoder runs), plus copies of them made to look like paper recipes, runs with comparability cards
and frozen-backbone evaluations, or many configurations."""

import csv
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from sacred.initialize import create_run

import autoencoder_experiment
from experiment import ex
from tests.conftest import digits_updates
from utils.reporting.report import LABEL_WIDTH, chart_labels, find_runs, main, read_run, t_quantile, tables
from utils.reporting.sacred_run import parent_record

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine a second thread waiting for a
    # busy core slows these runs down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def result_dir(digits_path, tmp_path_factory) -> Path:
    """Runs 1 and 2: the same configuration with seeds 1 and 2; run 3: another learning rate."""
    folder = tmp_path_factory.mktemp("results")
    for updates in (["seed=1"], ["seed=2"], ["seed=1", "lr=0.01"]):
        ex.run_commandline(
            [
                "experiment.py",
                "-F",
                str(folder),
                "with",
                *digits_updates(digits_path),
                "epochs=1",
                "evaluation.recalls=[1,2]",
                *updates,
            ]
        )
    return folder


def final(result_dir: Path, run: int | str, metric: str) -> float:
    return json.loads((result_dir / str(run) / "info.json").read_text())["metrics"][metric]


def printed(capsys, *args: str) -> dict[str, dict]:
    """The printed report: each table by its title's first word (the experiment kind, or "did") as {"title", "card",
    "rows": [{column: cell}]}, and "notes": the lines after the tables. Cells are split on two or more spaces."""
    main([*args])
    blocks = capsys.readouterr().out.strip().split("\n\n")
    found: dict[str, dict] = {"notes": {"lines": []}}
    for block in blocks:
        lines = block.splitlines()
        rule = next((i for i, line in enumerate(lines) if line.startswith("--")), None)
        if rule is None:
            found["notes"]["lines"] += lines
            continue
        header = re.split(r"\s{2,}", lines[rule - 1].strip())
        rows = [dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=True)) for line in lines[rule + 1 :]]
        card = next((line for line in lines[:rule] if line.startswith("card: ")), "")
        found[lines[0].split(":")[0].split()[0]] = {"title": lines[0], "card": card, "header": header, "rows": rows}
    return found


def by_runs(table: dict) -> dict[str, dict[str, str]]:
    return {row["runs"]: row for row in table["rows"]}


def interval_text(values: list[float], sign: str = "") -> str:
    """What the report prints for values: mean +- t * s / sqrt(n) with Student's t from a printed table."""
    t_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}
    half_width = t_975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):{sign}.4f} +- {half_width:.4f} (n={len(values)})"


def test_seeds_fold_into_mean_and_95_percent_interval(result_dir, capsys):
    report = printed(capsys, str(result_dir))
    table = report["metric_learning"]
    assert table["header"][:4] == ["runs", "seeds", "selection", "lr"] and "published R@1" not in table["header"]
    assert "cosine/R@1" in table["header"] and "NMI" in table["header"]
    rows = by_runs(table)
    assert set(rows) == {"1,2", "3"} and rows["1,2"]["seeds"] == "1,2"
    values = [final(result_dir, run, "cosine/R@1") for run in (1, 2)]
    assert rows["1,2"]["cosine/R@1"] == interval_text(values)
    assert rows["3"]["lr"] == "0.01" and rows["3"]["cosine/R@1"] == f"{final(result_dir, 3, 'cosine/R@1'):.4f} (n=1)"
    # Under the default protocol the best epoch is chosen on the test set: marked, with the legend saying so.
    assert rows["1,2"]["selection"] == rows["3"]["selection"] == "test*"
    assert any(line.startswith("* selected on the test set") for line in report["notes"]["lines"])
    assert table["card"].startswith("card: backbone=small_cnn, batch_size=")  # every run records its card
    # ... and its frozen backbone's evaluation, the baseline of its gain.
    backbone = json.loads((result_dir / "3" / "info.json").read_text())["backbone"]["cosine/R@1"]
    assert rows["3"]["gain cosine/R@1"] == f"{final(result_dir, 3, 'cosine/R@1') - backbone:+.4f} (n=1)"


@pytest.mark.parametrize(("df", "quantile"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)])
def test_t_quantiles_are_the_tables(df, quantile):
    assert t_quantile(df) == pytest.approx(quantile, abs=5e-4)


def interrupt_after_first_epoch(run_dir: Path) -> None:
    """SIGINT to this process once run_dir's first checkpoint is on disk (after epoch 1 of 3): the run stops as a
    preempted one does, INTERRUPTED with its checkpoint."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()


@pytest.fixture(scope="module")
def mixed_dir(digits_path, tmp_path_factory) -> Path:
    """1: seed 1, interrupted in epoch 2 of 3; 2: `resume=` run 1 alone, completed; 3: seed 2, completed; 4: failed
    before training (no such split file); 5: a copy of 3 (seed 2 twice); 6: an autoencoder run."""
    folder = tmp_path_factory.mktemp("mixed")
    words = ["experiment.py", "-F", str(folder), "with", *digits_updates(digits_path), "evaluation.recalls=[1,2]"]
    interrupt_after_first_epoch(folder / "1")
    with pytest.raises(SystemExit):
        ex.run_commandline([*words, "epochs=3", "seed=1"])
    ex.run_commandline(["experiment.py", "-F", str(folder), "with", f"resume={folder / '1'}"])
    ex.run_commandline([*words, "epochs=3", "seed=2"])
    with pytest.raises(SystemExit):
        ex.run_commandline([*words, "dataset.train_file=missing.txt"])
    shutil.copytree(folder / "3", folder / "5")
    autoencoder_experiment.ex.run_commandline(
        [
            "autoencoder_experiment.py",
            "-F",
            str(folder),
            "with",
            "vae.ae",
            "epochs=1",
            *digits_updates(digits_path),
            "vae.hidden_dims=[8,16]",
            "vae.latent_dim=8",
        ]
    )
    statuses = [json.loads((folder / str(run) / "run.json").read_text())["status"] for run in range(1, 7)]
    assert statuses == ["INTERRUPTED", "COMPLETED", "COMPLETED", "FAILED", "COMPLETED", "COMPLETED"]
    return folder


def test_a_resumed_run_records_its_parent(mixed_dir):
    info = {run: json.loads((mixed_dir / str(run) / "info.json").read_text()) for run in (1, 2, 3)}
    assert info[2]["parent"] == {"folder": str((mixed_dir / "1").resolve()), "id": "1"}
    assert "parent" not in info[1] and "parent" not in info[3]
    # resume= a checkpoint file names its folder; a folder outside -F has no run id.
    assert parent_record(str(mixed_dir / "1" / "checkpoint.pt")) == info[2]["parent"]
    assert parent_record(str(mixed_dir)) == {"folder": str(mixed_dir.resolve()), "id": None}


def test_a_resumed_chain_is_one_run_and_unfinished_runs_are_listed_apart(mixed_dir, capsys):
    report = printed(capsys, str(mixed_dir))
    rows = by_runs(report["metric_learning"])
    # The chain 1>2 is one sample, its result run 2's; run 5 repeats seed 2 and is flagged.
    assert set(rows) == {"1>2,3,5"} and rows["1>2,3,5"]["seeds"] == "1,2,2 !"
    values = [final(mixed_dir, run, "cosine/R@1") for run in (2, 3, 5)]
    assert rows["1>2,3,5"]["cosine/R@1"] == interval_text(values)
    assert any(line.startswith("! seed 2 counted twice: runs 3 and 5") for line in report["notes"]["lines"])
    assert "a>b: run b resumed run a, one run whose result is its last completed link" in report["notes"]["lines"]
    assert report["metric_learning"]["title"] == "metric_learning: 3 completed runs in 1 row(s)"
    unfinished = by_runs(report["did"])
    assert set(unfinished) == {"4"} and unfinished["4"]["status"] == "FAILED"
    assert report["did"]["title"] == "did not complete (not averaged): 1 run"


def test_each_experiment_kind_has_its_own_table(mixed_dir, capsys):
    report = printed(capsys, str(mixed_dir))
    learning, autoencoder = report["metric_learning"]["header"], report["autoencoder"]["header"]
    assert not [column for column in learning if column.startswith(("vae.", "epochs", "loss.", "model."))]
    assert not [column for column in autoencoder if column.startswith(("loss.", "metrix.", "model."))]
    assert "test/reconstruction" in autoencoder and "test/reconstruction" not in learning
    assert set(by_runs(report["autoencoder"])) == {"6"}


def test_the_chart_of_two_kinds_fits(mixed_dir, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "constrained_layout not applied because axes sizes collapsed"
        printed(capsys, str(mixed_dir), "--chart", str(tmp_path / "chart.png"))
    with Image.open(tmp_path / "chart.png") as chart:
        chart.verify()


def test_status_filter(mixed_dir, capsys):
    failed = printed(capsys, str(mixed_dir), "--status", "failed")
    assert set(failed) == {"did", "notes"} and set(by_runs(failed["did"])) == {"4"}
    completed = printed(capsys, str(mixed_dir), "--status", "COMPLETED")
    assert set(completed) == {"metric_learning", "autoencoder", "notes"}
    # Run 1 was interrupted, but its chain completed with run 2.
    main([str(mixed_dir), "--status", "INTERRUPTED"])
    assert capsys.readouterr().out == "no runs with status INTERRUPTED\n"
    with pytest.raises(SystemExit) as error:
        main([str(mixed_dir), "--status", "COMPLETED,done"])
    assert str(error.value.code) == (
        "error: --status COMPLETED,done: unknown status DONE; give some of "
        "COMPLETED,INTERRUPTED,FAILED,RUNNING,TIMEOUT,QUEUED"
    )


def test_a_chain_recorded_before_the_parent_record_is_found_by_resume(mixed_dir, tmp_path, capsys):
    # Folders copied elsewhere (the same -F folder name), run 2 without its parent record: its resume= names run 1.
    copy = tmp_path / mixed_dir.name
    for run in ("1", "2", "3"):
        shutil.copytree(mixed_dir / run, copy / run)
    info = json.loads((copy / "2" / "info.json").read_text())
    del info["parent"]
    (copy / "2" / "info.json").write_text(json.dumps(info))
    assert set(by_runs(printed(capsys, str(copy))["metric_learning"])) == {"1>2,3"}


CARD = {
    "split": "published",
    "selection": "test",
    "train_size": 100,
    "test_size": 50,
    "embedding_size": 128,
    "normalized": True,
    "backbone": "small_cnn",
    "weights": "none",
    "pooling": "avg",
    "bn_frozen": False,
    "batch_size": 16,
    "sampler": "random",
    "epochs_run": 1,
}


def with_card(source: Path, target: Path, seed: int, backbone: float | None = None, **changes: object) -> None:
    """A copy of a real run whose info.json holds a comparability card (and the frozen backbone's R@1)."""
    shutil.copytree(source, target)
    info = json.loads((target / "info.json").read_text())
    info["card"] = {**CARD, "seed": seed, **changes}
    info.pop("backbone", None)
    if backbone is not None:
        info["backbone"] = {"cosine/R@1": backbone, "l2/R@1": 0.0}
    (target / "info.json").write_text(json.dumps(info))


def test_cards_split_rows_mark_test_selection_and_show_the_gain(result_dir, tmp_path, capsys):
    with_card(result_dir / "1", tmp_path / "1", seed=1, backbone=0.1)
    with_card(result_dir / "2", tmp_path / "2", seed=2, backbone=0.15, epochs_run=2)
    with_card(result_dir / "1", tmp_path / "3", seed=1, weights="imagenet")  # the same settings, other weights
    with_card(result_dir / "3", tmp_path / "4", seed=1, selection="validation")
    table = printed(capsys, str(tmp_path))["metric_learning"]
    rows = by_runs(table)
    assert set(rows) == {"1,2", "3", "4"}
    assert table["card"].startswith("card: backbone=small_cnn, batch_size=16, bn_frozen=False, embedding_size=128")
    assert rows["1,2"]["card.weights"] == "none" and rows["3"]["card.weights"] == "imagenet"
    assert rows["1,2"]["card.epochs_run"] == "1,2"  # early stopping does not split seeds
    assert rows["1,2"]["selection"] == rows["3"]["selection"] == "test*" and rows["4"]["selection"] == "validation"
    gains = [final(result_dir, 1, "cosine/R@1") - 0.1, final(result_dir, 2, "cosine/R@1") - 0.15]
    assert rows["1,2"]["gain cosine/R@1"] == interval_text(gains, "+")
    assert rows["3"]["gain cosine/R@1"] == rows["4"]["gain cosine/R@1"] == "-"


def test_without_a_backbone_evaluation_there_is_no_gain_column(result_dir, tmp_path, capsys):
    for run in ("1", "2", "3"):  # runs with baseline=False, or from before the baseline
        shutil.copytree(result_dir / run, tmp_path / run)
        info = json.loads((tmp_path / run / "info.json").read_text())
        del info["backbone"]
        (tmp_path / run / "info.json").write_text(json.dumps(info))
    assert not [column for column in printed(capsys, str(tmp_path))["metric_learning"]["header"] if "gain" in column]


def test_chart_labels_are_unique_and_fit(result_dir, tmp_path, capsys):
    # Eight configurations differing in seven settings: labels of every differing setting, wrapped.
    settings = {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.01, "epochs": 3, "warm_epochs": 1, "eval_every": 2}
    for index in range(8):
        shutil.copytree(result_dir / "1", tmp_path / str(index))
        config = json.loads((tmp_path / str(index) / "config.json").read_text())
        config.update({key: value * (index + 1) for key, value in settings.items()})
        config["dataset"]["batch_size"] = 8 + index
        (tmp_path / str(index) / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        printed(capsys, str(tmp_path), "--chart", str(tmp_path / "chart.png"))
    labels = chart_labels(tables(find_runs([tmp_path]))[0].groups)
    assert len(set(labels)) == 8
    assert all(len(line) <= LABEL_WIDTH + 2 for label in labels for line in label.splitlines())
    assert "dataset.batch_size=8" in labels[0].replace("\n", " ") and "lr=0.1," in labels[0].replace("\n", " ")


def fake_recipe_run(source: Path, target: Path, named_configs: list[str], updates: dict) -> None:
    """A copy of a real run folder as if started with `python experiment.py -F ... with <named_configs> <updates>`:
    sacred's run.json records the named configs and the updates as given, config.json the resolved config."""
    shutil.copytree(source, target)
    run = json.loads((target / "run.json").read_text())
    run["meta"].update(named_configs=named_configs, config_updates=updates)
    (target / "run.json").write_text(json.dumps(run))
    config = create_run(ex, "main", json.loads(json.dumps(updates)), named_configs, log_level="ERROR").config
    (target / "config.json").write_text(json.dumps(config))


def test_a_run_records_its_command_line(result_dir):
    # What the report matches recipes on: sacred's record of the command line, in the real runs of the fixture.
    third, first = read_run(result_dir / "3"), read_run(result_dir / "1")
    assert {"epochs": 1, "evaluation.recalls": "[1, 2]", "lr": 0.01}.items() <= third.updates.items()
    assert "lr" not in first.updates and "seed" not in first.updates  # the seed does not define a recipe
    assert first.named_configs == third.named_configs == ()


def test_a_recipe_run_gets_the_published_r1(result_dir, tmp_path, capsys):
    recipe = ["dataset.cub", "metrix_recipe", "loss.contrastive", "metrix.feature"]
    elsewhere = {"seed": 7, "dataset": {"data_path": "/elsewhere/CUB_200_2011", "num_workers": 2}}
    fake_recipe_run(result_dir / "1", tmp_path / "recipes" / "1", recipe, elsewhere)
    # Not the recipe any more: another number of epochs, or the named configs in another order.
    fake_recipe_run(result_dir / "2", tmp_path / "recipes" / "2", recipe, {**elsewhere, "epochs": 5})
    fake_recipe_run(result_dir / "3", tmp_path / "recipes" / "3", [*recipe[1:], recipe[0]], elsewhere)
    # The CE paper's SOP line, as a user types it.
    sop = ["dataset.sop", "model.resnet50"]
    sgd = {"epochs": 100, "lr": 0.003, "momentum": 0.99, "nesterov": True, "model": {"norm_layer": "batch"}}
    fake_recipe_run(result_dir / "1", tmp_path / "recipes" / "4", sop, {**sgd, "seed": 3})
    # Run 5 resumed run 1 with nothing but resume=: the chain keeps the recipe of its first link.
    resumed = tmp_path / "recipes" / "5"
    shutil.copytree(tmp_path / "recipes" / "1", resumed)
    run = json.loads((resumed / "run.json").read_text())
    run["meta"].update(named_configs=[], config_updates={"resume": str(tmp_path / "recipes" / "1")})
    (resumed / "run.json").write_text(json.dumps(run))
    info = json.loads((resumed / "info.json").read_text())
    (resumed / "info.json").write_text(json.dumps(info | {"parent": parent_record(str(tmp_path / "recipes" / "1"))}))
    table = printed(capsys, str(tmp_path / "recipes"))["metric_learning"]
    published = {run: row["published R@1"] for run, row in by_runs(table).items()}
    assert published == {"1>5": "0.674 (Metrix paper)", "2": "-", "3": "-", "4": "0.811 (CE paper)"}
    assert "epochs" in table["header"]
    # The recipes come from their registry: the report never builds the experiment for them.
    check = (
        "import sys; from utils.reporting.report import main; main([sys.argv[1]]); "
        "print(sorted({'experiment'} & sys.modules.keys()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "recipes")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "[]", done.stderr


def test_csv_and_chart(result_dir, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a label that does not fit warns "constrained_layout not applied"
        printed(capsys, str(result_dir), "--csv", str(tmp_path / "runs.csv"), "--chart", str(tmp_path / "chart.png"))
    with open(tmp_path / "runs.csv", newline="") as file:
        rows = {row["runs"]: row for row in csv.DictReader(file)}
    assert set(rows) == {"1 2", "3"}
    values = [final(result_dir, run, "l2/R@2") for run in (1, 2)]
    assert float(rows["1 2"]["l2/R@2 mean"]) == pytest.approx(statistics.mean(values))
    assert float(rows["1 2"]["l2/R@2 std"]) == pytest.approx(statistics.stdev(values))
    assert float(rows["1 2"]["l2/R@2 ci95"]) == pytest.approx(12.706 * statistics.stdev(values) / 2**0.5, rel=1e-4)
    assert rows["1 2"]["l2/R@2 n"] == "2" and rows["3"]["cosine/R@1 std"] == rows["3"]["cosine/R@1 ci95"] == ""
    assert rows["1 2"]["card.selection"] == "test" and rows["3"]["experiment"] == "metric_learning"
    with Image.open(tmp_path / "chart.png") as chart:
        assert chart.format == "PNG"
        chart.verify()


def run_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "utils.report", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_a_folder_without_runs_is_one_clear_line(tmp_path):
    done = run_report(str(tmp_path))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path} holds no runs (no {tmp_path}/<id>/run.json); give the folder passed to `-F` when training"
    ]


def test_a_corrupt_run_json_is_one_clear_line(result_dir, tmp_path):
    shutil.copytree(result_dir / "1", tmp_path / "1")
    (tmp_path / "1" / "run.json").write_text('{"status": "COMPL')
    done = run_report(str(tmp_path))
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith(f"error: {tmp_path / '1' / 'run.json'} is not valid JSON")
    assert f"delete {tmp_path / '1'} or restore the file" in done.stderr


@pytest.mark.parametrize(
    ("file", "edit", "problem"),
    [
        ("run.json", lambda run: [run], "run.json holds a list, not a JSON object"),
        ("run.json", lambda run: run | {"status": 3}, "run.json: 'status' is a number, not a string"),
        ("run.json", lambda run: run | {"experiment": "metric_learning"}, "run.json: 'experiment' is a string"),
        ("run.json", lambda run: run | {"meta": []}, "run.json: 'meta' is a list, not an object"),
        ("run.json", lambda run: run | {"meta": {"named_configs": 5}}, "run.json: 'named_configs' is a number"),
        ("run.json", lambda run: run | {"meta": {"named_configs": [["a"]]}}, "'named_configs' holds something"),
        ("run.json", lambda run: run | {"meta": {"config_updates": "lr=1"}}, "run.json: 'config_updates' is a string"),
        ("info.json", lambda info: info | {"metrics": "cosine/R@1"}, "info.json: 'metrics' is a string, not an object"),
        (
            "info.json",
            lambda info: {"metrics": {"cosine/R@1": "0.5"}},
            "metrics: 'cosine/R@1' is a string, not a number",
        ),
        ("info.json", lambda info: None, "info.json holds null, not a JSON object"),
        ("info.json", lambda info: info | {"card": "test"}, "info.json: 'card' is a string, not an object"),
        (
            "info.json",
            lambda info: info | {"card": {"seed": [1]}},
            "card: 'seed' is a list, not a string or a number or true or false or null",
        ),
        ("info.json", lambda info: info | {"parent": {"folder": 1}}, "parent: 'folder' is a number, not a string"),
        ("info.json", lambda info: info | {"backbone": {"cosine/R@1": None}}, "backbone: 'cosine/R@1' is null"),
        ("config.json", lambda config: 3, "config.json holds a number, not a JSON object"),
    ],
)
def test_json_of_the_wrong_type_is_one_clear_line(result_dir, tmp_path, capsys, file, edit, problem):
    shutil.copytree(result_dir / "1", tmp_path / "1")
    path = tmp_path / "1" / file
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(SystemExit) as error:
        main([str(tmp_path)])
    line = str(error.value.code)
    assert line.startswith(f"error: {tmp_path / '1'}") and problem in line and "\n" not in line
    assert f"delete {tmp_path / '1'} or restore the file" in line
