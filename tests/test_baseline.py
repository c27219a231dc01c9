"""The frozen-backbone baseline: before training, the backbone's pooled features (no head) are evaluated with the
final metrics, as backbone.<metric> at epoch 0 in metrics.json and info.json's "backbone"; a resumed run keeps
the baseline it started from; baseline=False skips it."""

import json
from pathlib import Path

import pytest

from tests.conftest import digits_updates

pytestmark = pytest.mark.usefixtures("torch_home")


def run_files(directory: Path) -> tuple[dict, dict]:
    return json.loads((directory / "metrics.json").read_text()), json.loads((directory / "info.json").read_text())


def test_baseline_is_the_backbone_without_its_head(digits_path, experiment, tmp_path):
    """On the digits the small CNN's default head is its average pooling alone, so its epoch-0 evaluation is the
    baseline's; with a 8-d L2-normalised remap head on the same seed the backbone is the same, and so is the
    baseline, whatever the head."""
    plain, remapped = tmp_path / "plain", tmp_path / "remapped"
    assert experiment(f"-F {plain} with epochs=1", *digits_updates(digits_path)).code == 0
    outcome = experiment(
        f"-F {remapped} with epochs=1 model.num_features=8 model.normalize=True", *digits_updates(digits_path)
    )
    assert outcome.code == 0, outcome.err
    assert "Backbone  | cosine | R@1" in outcome.out

    metrics, info = run_files(plain / "1")
    assert set(info["backbone"]) == set(info["metrics"])  # every final metric: MAP@R, NMI, utilization, ...
    for key, value in info["backbone"].items():
        assert metrics[f"backbone.{key}"]["steps"] == [0] and metrics[f"backbone.{key}"]["values"] == [value]
    for key in ("cosine/R@1", "l2/R@1", "cosine/R@8"):
        assert info["backbone"][key] == pytest.approx(metrics[f"eval.{key}"]["values"][0], abs=1e-12)

    _, remapped_info = run_files(remapped / "1")
    assert remapped_info["backbone"] == pytest.approx(info["backbone"], abs=1e-12)


def test_resumed_run_keeps_its_baseline(digits_path, experiment, tmp_path):
    """Resuming does not evaluate the backbone again: the resumed run's info holds the first run's baseline, whatever
    baseline says then (a setting a resumed run may change)."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert experiment(f"-F {first} with epochs=1", *digits_updates(digits_path)).code == 0
    outcome = experiment(f"-F {second} with resume={first / '1'} epochs=2 baseline=False", *digits_updates(digits_path))
    assert outcome.code == 0, outcome.err
    assert "Backbone" not in outcome.out
    _, first_info = run_files(first / "1")
    metrics, info = run_files(second / "1")
    assert info["backbone"] == first_info["backbone"]
    assert not any(key.startswith("backbone.") for key in metrics)  # this run did not evaluate it


def test_baseline_false_skips_it(digits_path, experiment, tmp_path):
    observed = tmp_path / "runs"
    outcome = experiment(f"-F {observed} with epochs=1 baseline=False", *digits_updates(digits_path))
    assert outcome.code == 0, outcome.err
    metrics, info = run_files(observed / "1")
    assert "backbone" not in info and not any(key.startswith("backbone.") for key in metrics)
    assert "Backbone" not in outcome.out
