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

from experiment import ex
from tests.conftest import digits_updates
from utils.reporting.report import CE_R1, main, published_recipes, resolve_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = "python experiment.py with dataset.cub metrix_recipe loss.contrastive metrix.feature"


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


def fake_recipe_run(source: Path, target: Path, command: str, **changes: object) -> None:
    """A copy of a real run folder whose config.json is what command resolves to (seed and data path
    changed as a user's would be), with changes applied on top."""
    shutil.copytree(source, target)
    config = json.loads(json.dumps(resolve_config(command)))
    config.update(seed=7, **changes)
    config["dataset"]["data_path"] = "/elsewhere/CUB_200_2011"
    (target / "config.json").write_text(json.dumps(config))


def test_a_recipe_run_gets_the_published_r1(result_dir, tmp_path, capsys):
    fake_recipe_run(result_dir / "1", tmp_path / "recipes" / "1", RECIPE)
    fake_recipe_run(result_dir / "2", tmp_path / "recipes" / "2", RECIPE, epochs=5)  # not the recipe any more
    header, *rows = report(capsys, str(tmp_path / "recipes"))
    published = {row[0]: row[-1] for row in rows}
    assert published == {"1": "0.674 (Metrix paper)", "2": "-"}
    assert "epochs" in header


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


def test_published_figures_are_the_readme_and_design_ones():
    readme = (REPO / "README.md").read_text()
    table = dict(
        re.findall(
            r"^\| `main\.py [^`]*` \| `(python experiment\.py with [^`]*)` \| ([\d.]+) \|", readme, flags=re.MULTILINE
        )
    )
    metrix = {command: figure for command, (figure, paper) in published_recipes().items() if paper == "Metrix paper"}
    assert len(table) == 24 and {command: float(r1) for command, r1 in table.items()} == metrix
    assert all(f"python experiment.py with {updates}" in readme for updates in CE_R1)
    design = REPO.parent / "shared" / "DESIGN.md"
    if design.exists():
        assert "Cross-entropy (2048-d, CE paper): CUB 69.2, Cars 89.3, SOP 81.1, In-Shop 90.6 R@1" in " ".join(
            design.read_text().split()
        )
        assert list(CE_R1.values()) == [69.2, 89.3, 81.1, 90.6]
