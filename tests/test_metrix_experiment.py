"""Every loss x Metrix mode trains on digits; every Metrix-paper equivalent of the README runs on a stand-in."""

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, SHRINK, Outcome

LOSSES = ("cross_entropy", "contrastive", "multisimilarity", "proxyanchor")
MODES = (None, "input", "feature", "embed")


def observed_metrics(experiment: Callable[..., Outcome], words: str, observed: Path) -> dict:
    """Run experiment.py in-process with -F; return the run's metrics.json."""
    outcome = experiment(f"-F {observed} {words}")
    assert outcome.code == 0, outcome.err
    return json.loads((observed / str(outcome.run._id) / "metrics.json").read_text())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_and_mode_train_on_digits(loss, mode, digits_path, experiment, tmp_path):
    metrix = f"metrix.{mode} metrix.max_pairs=100" if mode else ""
    words = (f"with loss.{loss} {metrix} epochs=1 dataset.num_iterations=30 scheduler=constant "
             f"dataset.sampler=balanced dataset.images_per_class=4 dataset.batch_size=20 cpu=True "
             f"dataset.data_path={digits_path} evaluation.final_metrics=['recall']")
    metrics = observed_metrics(experiment, words, tmp_path / "runs")
    losses = metrics["train.loss"]["values"]
    assert len(losses) == 30
    assert sum(losses[-10:]) < sum(losses[:10])
    if mode:
        assert f"train.mixed_{loss}" in metrics
        assert all(value >= 0 for value in metrics[f"train.mixed_{loss}"]["values"])


def readme_equivalents() -> list[tuple[str, str]]:
    """(dataset, sacred arguments) of every Metrix-paper row of the README's table."""
    row = r"\| `python experiment.py with (dataset\.(\w+) metrix_recipe [^`]*)` \|"
    rows = re.findall(row, (REPO / "README.md").read_text())
    return [(dataset, arguments) for arguments, dataset in rows]


def test_readme_lists_every_paper_run():
    assert len(readme_equivalents()) == 4 * 3 * 2


@pytest.mark.parametrize("dataset, arguments", readme_equivalents())
def test_metrix_paper_equivalent_runs_on_a_standin(dataset, arguments, datasets, torch_home, experiment, tmp_path):
    shrink = " ".join([*SHRINK, "dataset.images_per_class=2", "dataset.num_iterations=1"])
    words = f"with {arguments} dataset.data_path={datasets[dataset]} {shrink}"
    metrics = observed_metrics(experiment, words, tmp_path / "runs")
    assert metrics["eval.cosine/R@1"]["steps"] == [0, 1]
    assert ("train.mixed_" + arguments.split()[2].removeprefix("loss.") in metrics) == ("metrix." in arguments)
