"""Every paper recipe of the README resolves to the configuration pinned in tests/recipes.json.

A changed default that would move a published number changes a resolved configuration, and this test fails
naming the command and the keys. The commands are parsed from README.md (the seed command lines and the Metrix
table), so the README and the snapshot cannot drift apart. After a deliberate change (a new config key, a new
default), regenerate the snapshot and review its diff:

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

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = REPO / "tests" / "recipes.json"
# Keys that depend on the machine, not on the recipe.
MACHINE_KEYS = ("output_dir", "dataset.num_workers")


def readme_commands() -> list[str]:
    """`<script> with <updates>` of every seed command line and every Metrix-paper equivalent in the README."""
    readme = (REPO / "README.md").read_text()
    seeds = readme.split("## The seed command lines", 1)[1].split("\n\n", 2)[1]
    commands = [line.split("#")[0].strip() for line in seeds.splitlines()]
    commands += re.findall(r"^\| `[^`]*` \| `(python experiment\.py with [^`]*)` \|", readme, flags=re.MULTILINE)
    # -F only adds an observer: the configuration is that of the same command without it.
    return [re.sub(r"^python (\S+) (-F \S+ )?", r"\1 ", command) for command in commands]


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


def test_the_readme_lists_the_seed_commands_and_the_metrix_table() -> None:
    commands = readme_commands()
    assert len(commands) == 6 + 1 + 24  # the -F seed command resolves like the one above it
    assert len(set(commands)) == 6 + 24


def test_the_snapshot_has_exactly_the_readme_commands() -> None:
    assert sorted(snapshot()) == sorted(set(readme_commands()))


@pytest.mark.parametrize("command", sorted(set(readme_commands())))
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Write tests/recipes.json from the README's commands.")
    parser.add_argument("--update", action="store_true", required=True, help="regenerate the snapshot")
    parser.parse_args()
    commands = sorted(set(readme_commands()))
    SNAPSHOT.write_text(
        json.dumps({command: resolve(command) for command in commands}, indent=1, sort_keys=True) + "\n"
    )
    print(f"wrote {len(commands)} configurations to {SNAPSHOT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
