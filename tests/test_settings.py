"""utils/settings.py: every rule of the table, the cross-key rules, and runs refused before anything is read."""

import math
import subprocess
import sys

import pytest
from sacred.utils import iterate_flattened

import autoencoder_experiment
import experiment
from tests.conftest import REPO, assert_input_error
from utils.errors import InputError
from utils.settings import CROSS_RULES, MISSING, RULES, check_settings, lookup, violations

RECALLS = "a non-empty list, each an integer >= 1, 1 among them"
JITTER = "a list of 4, each a number in [0, infinity), the last (hue) <= 0.5"
# Values of every family the issue names; each rule must refuse at least one and accept its defaults.
CANDIDATES = [
    -2,
    -1,
    0,
    1,
    2,
    3,
    8,
    70_000,
    2**32,
    0.5,
    1.5,
    -0.5,
    math.nan,
    math.inf,
    180.5,
    True,
    "abc",
    "",
    None,
    [],
    [0],
    [1, 2],
    [2, 1],
    [0.5, 1.0],
    [0.0, 1.0],
    [1.0, 2.0],
    [1, 2, 3, 4],
    [-1, 0, 0, 0],
    ["recall"],
    ["accuracy"],
    "recall",
]
NAMED = {
    experiment.ex: [
        [],
        ["dataset.cub"],
        ["dataset.sop", "metrix_recipe", "loss.contrastive", "metrix.feature"],
        ["dataset.inshop", "model.bninception"],
        ["dataset.cars", "loss.proxyanchor", "metrix.input"],
    ],
    autoencoder_experiment.ex: [[], ["dataset.cub_vae", "vae.vae"], ["dataset.inshop_vae", "vae.ae"]],
}


def configs() -> list[dict]:
    """The configs of both experiments, by default and under named configs (the seed command lines' ones)."""
    return [
        ex._create_run(named_configs=named, options={"--loglevel": "ERROR"}).config
        for ex, combinations in NAMED.items()
        for named in combinations
    ]


@pytest.fixture(scope="module")
def real_configs() -> list[dict]:
    return configs()


def test_every_setting_of_both_experiments_has_a_rule(real_configs):
    # So that a value of another type (sacred only warns that it "changed type") is refused for every key.
    keys = {key for config in real_configs for key, _ in iterate_flattened(config) if not key.endswith("__doc__")}
    assert keys - RULES.keys() == set()
    assert RULES.keys() - keys == set()  # and no rule for a setting that is gone


def test_the_default_and_named_configs_pass(real_configs):
    for config in real_configs:
        assert violations(config) == []


@pytest.mark.parametrize("key", list(RULES))
def test_each_rule_refuses_bad_values_with_the_key_value_and_range(key):
    check = RULES[key]
    refused = [value for value in CANDIDATES if not check.test(value)]
    assert refused, f"{key} accepts every candidate"
    for value in refused:
        config: dict = {}
        parts = key.split(".")
        leaf = config
        for part in parts[:-1]:
            leaf = leaf.setdefault(part, {})
        leaf[parts[-1]] = value
        with pytest.raises(InputError) as error:
            check_settings(config)
        assert str(error.value) == f"{key}={value!r} is invalid: expected {check.description}"


@pytest.mark.parametrize(
    ("key", "value", "description"),
    [
        ("epochs", "abc", "an integer >= 0"),
        ("epochs", -2, "an integer >= 0"),
        ("epochs", 2.5, "an integer >= 0"),
        ("seed", -1, "an integer >= 0 and <= 4,294,967,295"),
        ("dataset.batch_size", 0, "an integer >= 1"),
        ("dataset.crop_size", -32, "an integer >= 1"),
        ("evaluation.recalls", [0], RECALLS),
        ("evaluation.recalls", "[1,2]", RECALLS),
        ("evaluation.recalls", [1, -4], RECALLS),
        ("evaluation.recalls", [2, 4], RECALLS),  # the best epoch is chosen by cosine R@1
        ("dataset.color_jitter", [0.4, 0.4, 0.4, 0.6], f"None or {JITTER}"),  # torchvision's hue is in [0, 0.5]
        ("dataset.ratio", [1e-300, 1e300], "[a, b] with 0.0001 < a <= b <= 10000"),
        ("vae.in_channels", 1, "3 (the images are read as RGB)"),
        ("metrix.alpha", 1e300, "a number in [0.1, 1e+38]"),  # beyond float32, where torch samples Beta
        ("metrix.alpha", 0.001, "a number in [0.1, 1e+38]"),  # a quarter of the draws would be 0.5
        (
            "evaluation.metrics",
            ["recall", "accuracy"],
            "a non-empty list, each one of recall, map_at_r, r_precision, nmi, utilization",
        ),
        ("label_smoothing", 2, "a number in [0, 1)"),
        ("label_smoothing", 1.0, "a number in [0, 1)"),
        ("grad_clip", -1, "None or a number in (0, infinity)"),
        ("grad_clip", 0, "None or a number in (0, infinity)"),
        ("lr", math.nan, "a number in (0, 1e+38]"),
        ("cpu", 1, "True or False"),
        ("model.num_features", 0, "None or an integer >= 1"),
        ("dataset.scale", [0.9, 0.1], "[a, b] with 0 < a <= b <= 1"),
        ("dataset.resize", [256], "None or an integer >= 1 or a list of 2, each an integer >= 1"),
        ("vae.hidden_dims", [], "None or a non-empty list, each an integer >= 1"),
    ],
)
def test_the_issues_examples(key, value, description):
    # Each was accepted once and then crashed the run with a traceback, or trained on nothing.
    assert RULES[key].description == description
    assert not RULES[key].test(value)


@pytest.mark.parametrize(
    ("config", "line"),
    [
        (
            {"dataset": {"crop_size": 300, "resize": 256}},
            "dataset.crop_size=300, dataset.resize=256 are inconsistent: expected dataset.crop_size <= dataset.resize "
            "(its shorter side)",
        ),
        ({"dataset": {"crop_size": 224, "resize": [256, 200]}}, "dataset.crop_size=224, dataset.resize=[256, 200]"),
        (
            {"dataset": {"sampler": "balanced", "images_per_class": 5, "batch_size": 4}},
            "expected dataset.images_per_class <= dataset.batch_size with a class sampler",
        ),
        ({"warm_epochs": 3, "epochs": 2}, "expected warm_epochs <= epochs"),
        ({"scheduler": "step", "lr_step": None}, "expected lr_step set (epochs between decays) when scheduler is step"),
        ({"nesterov": True, "momentum": 0.0}, "expected momentum > 0 when nesterov=True"),
        (
            {"model": {"norm_layer": "batch"}, "dataset": {"batch_size": 1}},
            "expected dataset.batch_size >= 2 with model.norm_layer='batch'",
        ),
        (
            {"loss": {"pairwise": "contrastive", "pair_weight": 1.0}, "dataset": {"batch_size": 1}},
            "expected dataset.batch_size >= 2 with a pairwise loss",
        ),
        (
            {
                "loss": {"pairwise": "multisimilarity", "pair_weight": 1.0},
                "dataset": {"sampler": "balanced", "images_per_class": 1, "batch_size": 8},
            },
            "expected dataset.images_per_class >= 2 with a pairwise loss and a class sampler",
        ),
        ({"metrix": {"mode": "embed"}, "dataset": {"batch_size": 1}}, "expected dataset.batch_size >= 2 with Metrix"),
        ({"dataset": {"folds": 4, "fold": 5}, "evaluation": {"protocol": "validation"}}, "expected dataset.fold <= "),
        (
            {"dataset": {"folds": 4, "fold": 1}, "evaluation": {"protocol": "test"}},
            "expected evaluation.protocol=validation with dataset.folds",
        ),
    ],
    ids=[
        "crop-resize",
        "crop-resize-pair",
        "images-per-class",
        "warm",
        "lr-step",
        "nesterov",
        "batch-norm-head",
        "pairwise-batch",
        "pairwise-positives",
        "metrix-batch",
        "fold-in-folds",
        "folds-validate",
    ],
)
def test_cross_key_rules(config, line):
    lines = violations(config)
    assert len(lines) == 1 and line in lines[0]


def test_every_cross_rule_is_tested_and_passes_when_consistent():
    consistent = {
        "dataset": {"crop_size": 224, "resize": 256, "sampler": "balanced", "images_per_class": 2, "batch_size": 2},
        "model": {"norm_layer": "batch"},
        "loss": {"pairwise": "contrastive", "pair_weight": 1.0},
        "metrix": {"mode": "feature"},
        "warm_epochs": 1,
        "epochs": 1,
        "scheduler": "step",
        "lr_step": 10,
        "nesterov": True,
        "momentum": 0.9,
        "evaluation": {"protocol": "validation"},
    }
    consistent["dataset"].update(folds=4, fold=4)
    assert violations(consistent) == []
    assert len(CROSS_RULES) == 11  # one parametrised case above per rule


def test_absent_keys_are_skipped_and_every_violation_gets_a_line():
    assert violations({}) == [] and lookup({"a": 1}, "a.b") is MISSING
    lines = violations({"epochs": -2, "dataset": {"batch_size": 0, "crop_size": 0, "resize": 16}})
    # Rules are registered by the modules that own the keys: the lines follow the modules' import order.
    assert sorted(line.split("=")[0] for line in lines) == ["dataset.batch_size", "dataset.crop_size", "epochs"]


@pytest.mark.parametrize(
    ("updates", "fragments"),
    [
        (["epochs=abc"], ["epochs='abc' is invalid: expected an integer >= 0"]),
        (["seed=-1"], ["seed=-1 is invalid"]),
        (["dataset.crop_size=64", "dataset.resize=48"], ["dataset.crop_size=64, dataset.resize=48 are inconsistent"]),
        (["label_smoothing=2"], ["label_smoothing=2 is invalid: expected a number in [0, 1)"]),
        (["evaluation.recalls=[2,4]"], ["evaluation.recalls=[2, 4] is invalid", "1 among them"]),
        (["model.norm_layer=batch", "dataset.batch_size=1"], ["model.norm_layer='batch', dataset.batch_size=1 are"]),
        (["loss.contrastive", "dataset.batch_size=1"], ["dataset.batch_size >= 2 with a pairwise loss"]),
    ],
)
def test_the_command_line_refuses_before_reading_data(experiment, updates, fragments, tmp_path):
    # A data path that does not exist: the settings are refused first.
    outcome = experiment("with", f"dataset.data_path={tmp_path / 'absent'}", *updates)
    assert_input_error(outcome, *fragments)


def test_the_autoencoder_command_line_is_checked_too(autoencoder_experiment, tmp_path):
    outcome = autoencoder_experiment("with vae.vae", "vae.latent_dim=0", f"dataset.data_path={tmp_path / 'absent'}")
    assert_input_error(outcome, "vae.latent_dim=0 is invalid: expected an integer >= 1")


@pytest.mark.parametrize(
    ("updates", "fragments"),
    [
        (["dataset.rotate=200"], ["dataset.rotate=200 is invalid: expected None or a number in [0, 180]"]),
        (
            ["dataset.sampler=balanced", "dataset.images_per_class=64"],
            ["dataset.sampler='balanced', dataset.images_per_class=64, dataset.batch_size=32 are inconsistent"],
        ),
        (["model.dropout=1.0"], ["model.dropout=1.0 is invalid: expected a number in [0, 1)"]),
        (["loss.contrastive", "loss.margin=-1"], ["loss.margin=-1 is invalid: expected a number in [0, infinity)"]),
        (["loss.ms_base=2"], ["loss.ms_base=2 is invalid: expected a number in [-1, 1]"]),
        (["loss.pairwise=triplet"], ["loss.pairwise='triplet' is invalid: expected one of None, contrastive"]),
        (["metrix.feature", "metrix.alpha=0"], ["metrix.alpha=0 is invalid: expected a number in [0.1, 1e+38]"]),
        (["evaluation.backend=gpu"], ["evaluation.backend='gpu' is invalid: expected one of auto"]),
    ],
    ids=["dataset", "dataset-cross", "model", "loss", "loss-unused", "loss-pairwise", "metrix", "evaluation"],
)
def test_an_ingredient_setting_is_refused_before_reading_data(experiment, updates, fragments, tmp_path):
    # The rules live beside each ingredient's defaults; the hook still sees them all before the run starts. The
    # data path does not exist, and the model is built from the data (its class count): reading either first would
    # fail with another message.
    outcome = experiment("with", f"dataset.data_path={tmp_path / 'absent'}", *updates)
    assert_input_error(outcome, *fragments)


def test_the_settings_module_imports_no_ingredient():
    # A module that registers rules imports utils.settings, so utils.settings importing it back would be a cycle.
    code = "import sys, utils.settings; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ours = [name for name in done.stdout.split() if name.split(".")[0] in ("losses", "models", "utils")]
    assert [name for name in ours if name.startswith(("losses", "models")) or name.endswith("ingredient")] == []
