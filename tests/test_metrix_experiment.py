"""Every loss x Metrix mode trains on digits; every Metrix-paper equivalent of the README runs on a stand-in."""

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, SHRINK, Outcome, assert_input_error, digits_updates

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
    # Input mode mixes one pair per anchor and positive (the released selection); the others all pairs, capped.
    metrix = {None: "", "input": "metrix.input"}.get(mode, f"metrix.{mode} metrix.max_pairs=100")
    words = (
        f"with loss.{loss} {metrix} epochs=1 dataset.num_iterations=30 scheduler=constant "
        f"dataset.sampler=balanced dataset.images_per_class=4 dataset.batch_size=20 cpu=True "
        f"dataset.data_path={digits_path} evaluation.final_metrics=['recall']"
    )
    metrics = observed_metrics(experiment, words, tmp_path / "runs")
    losses = metrics["train.loss"]["values"]
    assert len(losses) == 30
    assert sum(losses[-10:]) < sum(losses[:10])
    if mode:
        assert f"train.mixed_{loss}" in metrics
        assert all(value >= 0 for value in metrics[f"train.mixed_{loss}"]["values"])


def test_input_mode_follows_the_released_selection_unless_told(experiment, digits_path):
    outcome = experiment("print_config with metrix.input")
    assert re.search(r"selection = 'hardest_negative'", outcome.out), outcome.out
    outcome = experiment("print_config with metrix.input metrix.selection=all metrix.max_pairs=100")
    assert outcome.code == 0 and re.search(r"selection = 'all'", outcome.out), outcome.err
    outcome = experiment("with metrix.input metrix.max_pairs=100 epochs=1", *digits_updates(digits_path))
    assert_input_error(outcome, "metrix.max_pairs=100", "metrix.selection='all'")


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
