"""Every paper recipe (utils/reporting/recipes.py) resolves to the configuration pinned in tests/recipes.json.

A changed default that would move a published number changes a resolved configuration, and this test fails
naming the command and the keys. The README's and docs/recipes.md's recipe tables must be the registry's
generated text, and every training command the README shows must resolve. After a deliberate change (a new
config key, a new default), regenerate the snapshot and review its diff:

    .venv/bin/python -m tests.test_recipes --update
"""

import argparse
import importlib
import json
import re
from pathlib import Path

import pytest
from sacred.arg_parser import get_config_updates
from sacred.initialize import create_run

from losses.registry import unused_settings
from models.backbones import resolve_weights
from utils.engine.checkpoint import flatten
from utils.reporting.recipes import DOCUMENTS, RECIPES, generated_part

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = REPO / "tests" / "recipes.json"
# Keys that depend on the machine, not on the recipe.
MACHINE_KEYS = ("output_dir", "dataset.num_workers")
# The two default-setting lines users start from, pinned beside the paper recipes.
STARTERS = ("experiment.py with dataset.cub", "autoencoder_experiment.py with dataset.cub_vae vae.ae")
# The papers' published R@1 (%), typed from the papers: CE (2048-d) per data set; Metrix (512-d) per loss and
# data set, without and with Metrix/feature; Hyp-ViT's sphere variant per data set.
CE_PAPER = {"cub": 69.2, "cars": 89.3, "sop": 81.1, "inshop": 90.6}
METRIX_PAPER = {
    "contrastive": {"cub": (64.7, 67.4), "cars": (81.6, 85.1), "sop": (74.9, 77.5), "inshop": (86.4, 89.1)},
    "multisimilarity": {"cub": (67.8, 71.4), "cars": (87.8, 89.6), "sop": (76.9, 81.0), "inshop": (90.1, 92.2)},
    "proxyanchor": {"cub": (69.5, 71.0), "cars": (87.6, 89.1), "sop": (79.1, 81.3), "inshop": (90.0, 91.9)},
}
# Hyp-ViT (Ermolov et al., CVPR 2022), its results table's Sph-DINO line (ViT-S/16 DINO, 384-d), per data set.
HYP_VIT_PAPER = {"cub": 78.7, "cars": 86.6, "sop": 82.2, "inshop": 90.1}


def short(command: str) -> str:
    """`<script> with <updates>`: without `python` and without -F, which only adds an observer."""
    return re.sub(r"^python (\S+) (-F \S+ )?", r"\1 ", command)


def pinned_commands() -> list[str]:
    return sorted({short(recipe.command) for recipe in RECIPES} | set(STARTERS))


def readme_training_commands() -> list[str]:
    """Every `python <experiment script> [-F dir] with ...` line the README shows that trains (not a command)."""
    readme = (REPO / "README.md").read_text()
    lines = re.findall(r"(python (?:autoencoder_)?experiment\.py (?:-F \S+ )?with [^`#\n\\]*)", readme)
    return sorted({short(line.strip()) for line in lines})


def resolve(command: str) -> dict:
    """The full sacred configuration of `<script> with <updates>`, flattened to dotted keys, without running it;
    tuples become lists, as in JSON. The settings of the pairwise losses it does not train with are left out: a
    loss added later adds its keys to every configuration and changes no recipe."""
    script, with_, *words = command.split()
    assert with_ == "with", command
    ex = importlib.import_module(script.removesuffix(".py")).ex
    updates, named_configs = get_config_updates(words)
    config = create_run(ex, ex.default_command, updates, named_configs).config
    flat = flatten(json.loads(json.dumps(config)))
    if script == "experiment.py":
        flat["resolved.weights"] = resolved_weights(config)
    left_out = {*MACHINE_KEYS, *unused_settings(flat)}
    return {key: value for key, value in flat.items() if key not in left_out and not key.endswith("__doc__")}


def resolved_weights(config: dict) -> str | None:
    """The ImageNet weights experiment.py loads (model.weights=None leaves them to the backbone registry): its
    main function's default arch is small_cnn on digits and resnet18 on the real data sets."""
    model = config["model"]
    arch = model["arch"] or ("small_cnn" if config["dataset"]["name"] == "digits" else "resnet18")
    return resolve_weights(arch, model["pretrained"], model["weights"])


def snapshot() -> dict:
    return json.loads(SNAPSHOT.read_text())


def test_the_registry_holds_every_published_figure() -> None:
    figures = {short(recipe.command): recipe.published_r1 for recipe in RECIPES}
    expected = {
        f"experiment.py with dataset.{dataset} model.resnet50 {sgd}": CE_PAPER[dataset]
        for dataset, sgd in (
            ("cub", "epochs=30 lr=0.02"),
            ("cars", "epochs=100 lr=0.05 model.norm_layer=batch"),
            ("sop", "epochs=100 lr=0.003 momentum=0.99 nesterov=True model.norm_layer=batch"),
            ("inshop", "epochs=100 lr=0.003 momentum=0.99 nesterov=True model.norm_layer=batch"),
        )
    }
    for loss, by_dataset in METRIX_PAPER.items():
        for dataset, (baseline, mixed) in by_dataset.items():
            expected[f"experiment.py with dataset.{dataset} metrix_recipe loss.{loss}"] = baseline
            expected[f"experiment.py with dataset.{dataset} metrix_recipe loss.{loss} metrix.feature"] = mixed
    vit = {command: r1 for command, r1 in figures.items() if " vit_recipe " in command}
    assert {re.search(r"dataset\.(\w+) vit_recipe", command)[1]: r1 for command, r1 in vit.items()} == HYP_VIT_PAPER
    assert {command: r1 for command, r1 in figures.items() if command not in vit} == expected


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_the_documents_show_the_registry(path: Path) -> None:
    assert generated_part(path.read_text()) == DOCUMENTS[path](), (
        f"{path.name}'s recipe text is not the registry's: run `python -m utils.reporting.recipes --write`"
    )


def test_the_snapshot_has_exactly_the_pinned_commands() -> None:
    assert sorted(snapshot()) == pinned_commands()


def test_the_readme_shows_the_starters_and_every_recipe() -> None:
    assert set(STARTERS) <= set(readme_training_commands())
    assert {short(recipe.command) for recipe in RECIPES} <= set(readme_training_commands())


@pytest.mark.parametrize("command", pinned_commands())
def test_recipe_resolves_to_its_snapshot(command: str) -> None:
    expected = snapshot().get(command, {})
    resolved = resolve(command)
    changed = {
        key: (expected.get(key, "<absent>"), resolved.get(key, "<absent>"))
        for key in sorted(expected.keys() | resolved.keys())
        if expected.get(key) != resolved.get(key)
    }
    assert not changed, (
        f"{command}: (snapshot, now) {changed}; if deliberate, run "
        f"`.venv/bin/python -m tests.test_recipes --update` and review the diff"
    )


@pytest.mark.parametrize("command", sorted(set(readme_training_commands()) - set(pinned_commands())))
def test_every_readme_training_command_resolves(command: str) -> None:
    assert resolve(command)["seed"] is not None


@pytest.mark.parametrize("dataset, sampler", [("sop", "balanced"), ("inshop", "balanced"), ("cub", "random")])
def test_the_metrix_recipe_samples_as_the_released_code_on_each_data_set(dataset: str, sampler: str, experiment):
    # The released main.py draws balanced batches on SOP and In-Shop and random ones on CUB and Cars.
    printed = printed_config(experiment, f"dataset.{dataset} metrix_recipe loss.contrastive")
    assert re.search(rf"^\s*sampler = '{sampler}'", printed, flags=re.M), printed
    assert re.search(r"^\s*images_per_class = 5\b", printed, flags=re.M)
    # An explicit sampler still wins.
    printed = printed_config(experiment, f"dataset.{dataset} metrix_recipe dataset.sampler=random_id")
    assert re.search(r"^\s*sampler = 'random_id'", printed, flags=re.M), printed


def printed_config(experiment, words: str) -> str:
    """`python experiment.py print_config with <words>`, without sacred's colours."""
    outcome = experiment(f"print_config with {words}")
    assert outcome.code == 0, outcome.err
    return re.sub(r"\x1b\[[0-9;]*m", "", outcome.out)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write tests/recipes.json from the recipe registry.")
    parser.add_argument("--update", action="store_true", required=True, help="regenerate the snapshot")
    parser.parse_args()
    commands = pinned_commands()
    SNAPSHOT.write_text(
        json.dumps({command: resolve(command) for command in commands}, indent=1, sort_keys=True) + "\n"
    )
    print(f"wrote {len(commands)} configurations to {SNAPSHOT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
