"""vit_recipe end to end on the digits, scaled down: timm's smallest ViT (6 blocks of width 64, patches of 16) from
random weights at 32 px (2 x 2 patches and the class token), batches of 5 classes x 2 images, two steps an epoch;
and a resumed ViT run ends where the uninterrupted one does."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import digits_updates

pytestmark = pytest.mark.usefixtures("torch_home")

# After the recipe's words (sacred's last update wins): the digits' small splits at their own 32 px.
SCALED_DOWN = [
    "model.arch=timm:test_vit",
    "model.pretrained=False",
    "dataset.batch_size=10",
    "dataset.resize=32",
    "dataset.crop_size=32",
    "dataset.hflip=False",
    "dataset.num_iterations=2",
    "evaluation.final_metrics=['recall','map_at_r']",
]


def recipe_run(experiment, digits_path: Path, words: str, *updates: str):
    outcome = experiment(f"{words} vit_recipe", *digits_updates(digits_path), *SCALED_DOWN, *updates)
    assert outcome.code == 0, outcome.err
    return outcome


def test_vit_recipe_trains_on_the_digits(digits_path, experiment, tmp_path):
    """The recipe's model, loss and optimiser train: the pairwise cross-entropy is logged every step, the frozen
    backbone is evaluated before training, the checkpoint holds AdamW's state at lr 1e-5."""
    observed = tmp_path / "runs"
    outcome = recipe_run(experiment, digits_path, f"-F {observed} with epochs=1")
    metrics = json.loads((observed / "1" / "metrics.json").read_text())
    info = json.loads((observed / "1" / "info.json").read_text())
    assert info["model"]["arch"] == "timm:test_vit"
    assert len(metrics["train.ntxent"]["values"]) == 2
    assert set(info["backbone"]) == set(info["metrics"])
    checkpoint = torch.load(info["checkpoint"], map_location="cpu", weights_only=True)
    groups = checkpoint["optimizer"]["param_groups"]
    assert {group["lr"] for group in groups} == {1e-5} and {group["weight_decay"] for group in groups} <= {0.0, 0.01}
    assert "Backbone  | cosine | R@1" in outcome.out


def test_resumed_vit_run_ends_as_the_uninterrupted_one(digits_path, experiment, tmp_path):
    """Two epochs in one run, or one epoch and a resume to two: the same final metrics and the same weights."""
    whole, first, resumed = tmp_path / "whole", tmp_path / "first", tmp_path / "resumed"
    recipe_run(experiment, digits_path, f"-F {whole} with epochs=2")
    recipe_run(experiment, digits_path, f"-F {first} with epochs=1")
    recipe_run(experiment, digits_path, f"-F {resumed} with resume={first / '1'} epochs=2")
    infos = [json.loads((run / "1" / "info.json").read_text()) for run in (whole, resumed)]
    assert infos[0]["metrics"] == infos[1]["metrics"] and infos[0]["best_epoch"] == infos[1]["best_epoch"]
    assert infos[0]["backbone"] == infos[1]["backbone"]
    weights = [torch.load(info["checkpoint"], map_location="cpu", weights_only=True)["model"] for info in infos]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
