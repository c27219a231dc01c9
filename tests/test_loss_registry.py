"""losses/registry.py: each pairwise loss registers itself in its own file, and the loss ingredient's config, comments,
named configs and rules come from the registry; a new loss is one new file."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiment import ex
from losses.contrastive import ContrastiveLoss
from losses.multi_similarity import MultiSimilarityLoss
from losses.proxy_anchor import ProxyAnchorLoss
from losses.registry import PAIRWISE, SHARED_KEYS, Setting, register_pairwise
from tests.conftest import REPO, digits_updates
from utils.reporting.recipes import published
from utils.reporting.report import differing_keys, group_runs, read_run
from utils.settings import NON_NEGATIVE, RULES

NEW_LOSS = '''"""A loss that exists only in a test: scale times the weighted mean distance of the positive pairs."""

from torch import Tensor

from utils.settings import POSITIVE

from .candidates import Candidates, WeightedLoss
from .functional import sphere_distance
from .registry import Setting, register_pairwise


class PositiveDistanceLoss(WeightedLoss):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def weighted(self, anchors: Tensor, anchor_labels: Tensor, candidates: Candidates) -> Tensor:
        w_pos, _ = candidates.pair_weights(anchor_labels)
        distance = sphere_distance(anchors, candidates.embeddings)
        return self.scale * (w_pos * distance).sum() / w_pos.sum().clamp_min(1)


@register_pairwise("positive_distance", pd_scale=Setting(1.0, "weight of the mean positive distance", POSITIVE))
def positive_distance(num_classes: int, embedding_size: int, pd_scale: float) -> PositiveDistanceLoss:
    print(f"positive_distance built with pd_scale={pd_scale}")
    return PositiveDistanceLoss(pd_scale)
'''


def registered_in_source() -> set[str]:
    """The names of the @register_pairwise("name", ...) decorators written in losses/*.py, read without importing."""
    names = set()
    for path in (REPO / "losses").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_pairwise":
                names.add(node.args[0].value)
    return names


def test_importing_losses_registers_every_loss_file():
    # In a fresh interpreter: importing the registry alone imports the whole package, hence every loss file.
    code = "import losses.registry as r; print(' '.join(r.PAIRWISE))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (
        set(done.stdout.split())
        == registered_in_source()
        == {"contrastive", "multisimilarity", "ntxent", "proxyanchor"}
    )


def loss_config(*named: str, **updates: object) -> dict:
    updates = {f"loss.{key}": value for key, value in updates.items()}
    run = ex._create_run(named_configs=list(named), config_updates=updates, options={"--loglevel": "ERROR"})
    return run.config["loss"]


def test_each_loss_has_a_named_config_and_its_settings_in_the_loss_config():
    keys = {key for entry in PAIRWISE.values() for key in entry.settings}
    for name, entry in PAIRWISE.items():
        config = loss_config(f"loss.{name}")
        assert (config["pairwise"], config["ce_weight"]) == (name, 0.0)
        assert set(config) - {"__doc__"} == {*SHARED_KEYS, *keys}
        assert {key: config[key] for key in entry.settings} == {key: s.default for key, s in entry.settings.items()}
        assert all(RULES[f"loss.{key}"] is setting.rule for key, setting in entry.settings.items())
    assert loss_config()["pairwise"] is None  # cross-entropy alone by default


def test_print_config_shows_each_loss_setting_with_its_comment(experiment):
    out = experiment("print_config with loss.multisimilarity").out
    lines = {line.split("=")[0].strip(): line for line in out.splitlines() if "=" in line}
    assert "# multisimilarity: positive scale" in lines["ms_alpha"] and "2.0" in lines["ms_alpha"]
    assert "# contrastive: negative margin" in lines["margin"]
    assert "# proxyanchor: the proxies' learning rate is lr times this" in lines["proxy_lr_multiplier"]


@pytest.mark.parametrize(
    ("name", "updates", "expected"),
    [
        ("contrastive", {"margin": 0.3}, ContrastiveLoss(0.3)),
        (
            "multisimilarity",
            {"ms_alpha": 3.0, "ms_beta": 40.0, "ms_base": 0.4, "ms_mining": True, "ms_epsilon": 0.2},
            MultiSimilarityLoss(alpha=3.0, beta=40.0, base=0.4, mining=True, epsilon=0.2),
        ),
        (
            "proxyanchor",
            {"pa_alpha": 16.0, "pa_delta": 0.2, "proxy_lr_multiplier": 10.0},
            ProxyAnchorLoss(7, 5, alpha=16.0, delta=0.2, lr_multiplier=10.0),
        ),
    ],
)
def test_each_setting_reaches_its_loss(name, updates, expected):
    loss = PAIRWISE[name].build(7, 5, loss_config(f"loss.{name}", **updates))
    assert type(loss) is type(expected) and repr(loss) == repr(expected)
    assert getattr(loss, "lr_multiplier", 1.0) == getattr(expected, "lr_multiplier", 1.0)


def test_a_name_or_setting_already_taken_is_refused():
    before = dict(PAIRWISE), dict(RULES)
    with pytest.raises(ValueError, match="'contrastive' is already registered"):
        register_pairwise("contrastive")(lambda num_classes, embedding_size: ContrastiveLoss())
    with pytest.raises(ValueError, match=r"settings already taken: margin \(of contrastive\)"):
        register_pairwise("other", margin=Setting(0.1, "a margin", NON_NEGATIVE))(lambda **settings: None)
    with pytest.raises(ValueError, match=r"pair_weight \(of the loss ingredient\)"):
        register_pairwise("other", pair_weight=Setting(0.1, "a weight", NON_NEGATIVE))(lambda **settings: None)
    assert (dict(PAIRWISE), dict(RULES)) == before


@pytest.fixture
def tree_with_a_new_loss(tmp_path) -> Path:
    """A copy of the code with one file added, losses/positive_distance.py, and nothing else changed."""
    tree = tmp_path / "code"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("losses", "models", "utils"):
        shutil.copytree(REPO / folder, tree / folder, ignore=ignore)
    shutil.copy(REPO / "experiment.py", tree)
    (tree / "losses" / "positive_distance.py").write_text(NEW_LOSS)
    return tree


def run_in(tree: Path, *words: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [sys.executable, "experiment.py", *words, f"output_dir={tree / 'runs'}"]
    return subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=600, env=env)


def test_a_new_loss_file_is_a_named_config_with_checked_settings_that_trains(tree_with_a_new_loss, digits_path):
    shown = run_in(tree_with_a_new_loss, "print_config", "with", "loss.positive_distance")
    assert shown.returncode == 0, shown.stderr
    assert "pairwise = 'positive_distance'" in shown.stdout
    assert "# positive_distance: weight of the mean positive distance" in shown.stdout

    refused = run_in(tree_with_a_new_loss, "with", "loss.positive_distance", "loss.pd_scale=0")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "utils.errors.InputError: loss.pd_scale=0 is invalid: expected a number in (0, infinity)"
    )

    trained = run_in(
        tree_with_a_new_loss,
        "with",
        "loss.positive_distance",
        "loss.pd_scale=0.25",
        *digits_updates(digits_path),
        "epochs=1",
        "dataset.num_iterations=1",
        "evaluation.recalls=[1]",
        "cpu=True",
    )
    assert trained.returncode == 0, trained.stderr
    assert "positive_distance built with pd_scale=0.25" in trained.stdout
    train_line = next(line for line in trained.stdout.splitlines() if line.startswith("Train"))
    assert "| positive_distance " in train_line and " loss " in train_line


def test_the_report_ignores_the_settings_of_losses_a_run_does_not_train_with(tmp_path):
    # Run 2 was made by a version without multi-similarity and proxy-anchor (its config lacks their keys), as a run
    # made before a loss was added is: it is still the same recipe as run 1, with the published R@1.
    command = "python experiment.py with dataset.cub metrix_recipe loss.contrastive metrix.feature"
    named_configs = ["dataset.cub", "metrix_recipe", "loss.contrastive", "metrix.feature"]
    config = {"loss": {"pairwise": "contrastive", "margin": 0.5, "ms_alpha": 2.0, "pa_delta": 0.1}, "lr": 1e-4}
    older = {"loss": {"pairwise": "contrastive", "margin": 0.5}, "lr": 1e-4}
    runs = []
    for run_id, run_config in (("1", config), ("2", older)):
        folder = tmp_path / run_id
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(run_config))
        run = {
            "status": "COMPLETED",
            "experiment": {"name": "metric_learning"},
            "result": 0.6,
            "meta": {"named_configs": named_configs, "config_updates": {}},
        }
        (folder / "run.json").write_text(json.dumps(run))
        runs.append(read_run(folder))
    groups = group_runs(runs)
    assert len(groups) == 1 and differing_keys(runs) == []
    recipe = published(command)
    assert groups[0].published == (recipe.published_r1, recipe.paper)
