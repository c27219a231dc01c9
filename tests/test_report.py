"""`python -m utils.report` on run folders written by the real experiment with -F, plus a hand-made
run whose configuration is a paper recipe."""

import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from sacred.initialize import create_run

from experiment import ex
from tests.conftest import digits_updates
from utils.reporting.report import main, read_run

REPO = Path(__file__).resolve().parents[1]


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


def final(result_dir: Path, run: int, metric: str) -> float:
    return json.loads((result_dir / str(run) / "info.json").read_text())["metrics"][metric]


def report(capsys, *args: str) -> list[list[str]]:
    """The printed table's rows (header first), cells split on runs of two or more spaces."""
    main([*args])
    lines = capsys.readouterr().out.splitlines()
    return [re.split(r"\s{2,}", line.strip()) for line in lines if not line.startswith("--")]


def test_seeds_fold_into_mean_and_std(result_dir, capsys):
    header, *rows = report(capsys, str(result_dir))
    assert header[:4] == ["runs", "seeds", "status", "lr"] and header[-1] == "published R@1"
    assert "cosine/R@1" in header and "NMI" in header
    by_runs = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert set(by_runs) == {"1,2", "3"}
    assert by_runs["1,2"]["seeds"] == "1,2" and by_runs["1,2"]["status"] == "COMPLETED x2"
    values = [final(result_dir, run, "cosine/R@1") for run in (1, 2)]
    assert by_runs["1,2"]["cosine/R@1"] == (f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f} (n=2)")
    assert by_runs["3"]["lr"] == "0.01" and by_runs["3"]["cosine/R@1"] == f"{final(result_dir, 3, 'cosine/R@1'):.4f}"
    assert by_runs["3"]["published R@1"] == "-"


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
    header, *rows = report(capsys, str(tmp_path / "recipes"))
    published = {row[0]: row[-1] for row in rows}
    assert published == {"1": "0.674 (Metrix paper)", "2": "-", "3": "-", "4": "0.811 (CE paper)"}
    assert "epochs" in header
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
    report(capsys, str(result_dir), "--csv", str(tmp_path / "runs.csv"), "--chart", str(tmp_path / "chart.png"))
    with open(tmp_path / "runs.csv", newline="") as file:
        rows = {row["runs"]: row for row in csv.DictReader(file)}
    assert set(rows) == {"1 2", "3"}
    values = [final(result_dir, run, "l2/R@2") for run in (1, 2)]
    assert float(rows["1 2"]["l2/R@2 mean"]) == pytest.approx(statistics.mean(values))
    assert float(rows["1 2"]["l2/R@2 std"]) == pytest.approx(statistics.stdev(values))
    assert rows["1 2"]["l2/R@2 n"] == "2" and rows["3"]["cosine/R@1 std"] == ""
    with Image.open(tmp_path / "chart.png") as chart:
        assert chart.format == "PNG" and chart.size == (520, 480)  # 2 groups: 5.2 x 4.8 inches at 100 dpi
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
