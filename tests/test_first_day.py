"""What a researcher meets on the first day: named configs that compose and say what they are, hints that lead to
commands that work, a best epoch 0 called what it is, embeddings that say how to search them, progress that suits
a log file, and a last line that says where the run went."""

import fcntl
import inspect
import itertools
import json
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, SHRINK, assert_input_error, command_line_runner, digits_updates
from tests.test_after_training import copy_digits

SCRIPTS = ("experiment.py", "autoencoder_experiment.py")
OWN_LOOP = "### Using the pieces in your own loop"
PYTHON = sys.executable


def python(*words: str, cwd: Path = REPO, env: dict | None = None, **options) -> subprocess.CompletedProcess:
    """A real process of this interpreter, its stdout and stderr merged as a log file would hold them."""
    return subprocess.run(
        [PYTHON, *words],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        **options,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_named_config_has_a_doc_line(script, capsys, tmp_path):
    ex = __import__(script.removesuffix(".py")).ex
    named = dict(ex.gather_named_configs())
    assert len(named) >= (20 if script == "experiment.py" else 2)
    undocumented = [name for name, config in named.items() if not (config.__doc__ or "").strip()]
    assert not undocumented
    outcome = command_line_runner(script, capsys, tmp_path)("print_named_configs with")
    for name, config in named.items():
        assert f"{name}\x1b[2m   # {config.__doc__.strip()}" in outcome.out  # one line each, beside its name


def test_metrix_recipe_adds_no_config_entry(experiment):
    # sacred adds a function config's docstring to the config as `__doc__` and warns "Added new config entry".
    outcome = experiment("print_config with dataset.cub metrix_recipe loss.contrastive")
    assert outcome.code == 0, outcome.err
    assert "__doc__" not in outcome.run.config and not outcome.run.config_modifications.added


def readme_blocks() -> list[str]:
    """The python code blocks of the README's own-loop section: the loop, then the search of `embed`'s output."""
    section = (REPO / "README.md").read_text().split(OWN_LOOP, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def suggested_settings(message: str) -> list[str]:
    """The settings the hint of a message (after its last colon) suggests: `with model.pretrained=False`,
    `add vae.vae`, `set dataset.rotate=None`."""
    hint = message.rsplit(": ", 1)[-1]
    return re.findall(r"\b(?:with|add|set) (\w+\.[\w.]+(?:=[^\s,;:)`]+)?|\w+=[^\s,;:)`]+)", hint)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """A torch cache that cannot hold a download (its folder would be inside a file): no ImageNet weights."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "a_file" / "torch_home"))


def test_the_missing_weights_hint_trains(digits_path, experiment, no_weights):
    failed = experiment("with model.resnet50", *SHRINK, *digits_updates(digits_path))
    hint = suggested_settings(assert_input_error(failed, "pretrained weights", "unavailable"))
    assert hint == ["model.pretrained=False"]
    # The named config composes with it: ResNet-50 with the CE paper's head, from scratch.
    outcome = experiment("with model.resnet50", *hint, *SHRINK, *digits_updates(digits_path))
    assert outcome.code == 0, outcome.err
    assert outcome.run.info["model"] == {"arch": "resnet50", "weights": None, "set_bn_eval": False}
    assert outcome.run.config["model"]["num_features"] == 2048


# A command that fails with a hint, and a fragment of its message: the hint appended, the command trains.
HINTED = [
    ("autoencoder_experiment.py", "with vae.ae vae.kl_weight=0.5", "needs a variational model"),
    ("experiment.py", "with model.small_cnn model.pretrained=True", "has no pretrained weights"),
    ("experiment.py", "with loss.ce_weight=0", "no loss to train with"),
    ("experiment.py", "with metrix.feature metrix.weight=0 metrix.anchor_negative_weight=0", "no loss would use"),
    ("experiment.py", "with dataset.rotate=10 dataset.gpu_augment=True", "not available with"),
]


@pytest.mark.parametrize(("script", "words", "fragment"), HINTED, ids=[words for _, words, _ in HINTED])
def test_a_hint_leads_to_a_command_that_trains(script, words, fragment, digits_path, capsys, tmp_path):
    run = command_line_runner(script, capsys, tmp_path)
    failed = run(words, *SHRINK, *digits_updates(digits_path))
    hint = suggested_settings(assert_input_error(failed, fragment))
    assert hint
    outcome = run(words, hint[0], *SHRINK, *digits_updates(digits_path))
    assert outcome.code == 0, outcome.err


@pytest.fixture(scope="module")
def finished(digits_path, tmp_path_factory) -> Path:
    """A one-epoch -F run of the digits default on the small splits."""
    from experiment import ex

    observed = tmp_path_factory.mktemp("first_day")
    ex.run_commandline(["experiment.py", "-F", str(observed), "with", "epochs=1", *digits_updates(digits_path)])
    return observed / "1"


def test_the_unreadable_image_hint_embeds(finished, experiment, digits_path, tmp_path):
    copy_digits(digits_path, tmp_path / "mine", ["0.jpg", "1.jpg"])
    (tmp_path / "mine" / "broken.jpg").write_bytes(b"not a jpeg")
    command = f"embed with checkpoint={finished} images={tmp_path / 'mine'} out={tmp_path / 'e.npz'}"
    hint = suggested_settings(assert_input_error(experiment(command), "broken.jpg"))
    assert hint == ["bad_images=skip"]
    outcome = experiment(command, *hint)
    assert outcome.code == 0, outcome.err
    assert [Path(name).name for name in np.load(tmp_path / "e.npz")["skipped"]] == ["broken.jpg"]


def test_the_readme_search_gives_the_runs_r1(finished, experiment, digits_path, tmp_path, monkeypatch, capsys):
    split = digits_path / "test_small.txt"
    outcome = experiment(f"embed with checkpoint={finished} images={split} out={tmp_path / 'embeddings.npz'}")
    assert outcome.code == 0, outcome.err
    assert "(not L2-normalised; the run was selected by cosine/R@1: search them by cosine distance)" in outcome.out
    saved = np.load(tmp_path / "embeddings.npz")
    norms = np.linalg.norm(saved["embeddings"], axis=1)
    assert not saved["normalized"] and not np.allclose(norms, 1)  # the default head does not normalise
    assert str(saved["selected_by"]) == "cosine/R@1" and str(saved["distance"]) == "cosine"
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_blocks()[1], "README.md", "exec"), {})
    searched = float(re.search(r"R@1 ([\d.]+)", capsys.readouterr().out).group(1))
    evaluated = json.loads((finished / "info.json").read_text())["metrics"]["cosine/R@1"]
    assert searched == pytest.approx(evaluated, abs=1.5 / len(saved["labels"]))  # a tie may break the other way


def test_a_best_epoch_0_says_so(digits_path, autoencoder_experiment):
    # Steps of 100 x a unit gradient wreck the untrained decoder's grey images: no epoch beats epoch 0.
    ruin = ["select_by=reconstruction", "optimizer=sgd", "lr=100", "grad_clip=1"]
    outcome = autoencoder_experiment("with vae.ae", *SHRINK, *digits_updates(digits_path), *ruin)
    assert outcome.code == 0, outcome.err
    assert outcome.run.info["best_epoch"] == 0 and outcome.run.info["best_epoch_untrained"]
    last = outcome.out.strip().splitlines()[-2:]
    assert last[0].startswith("Note: the untrained network (epoch 0) is the best")
    assert last[1].startswith("Best epoch 0 (the untrained network): test/reconstruction")


def test_a_log_file_gets_no_redraws_and_ends_with_the_runs_folder(digits_path, tmp_path):
    done = python("experiment.py", "-F", str(tmp_path / "runs"), "with", "epochs=1", *digits_updates(digits_path))
    assert done.returncode == 0, done.stdout
    assert "\r" not in done.stdout and "it/s" not in done.stdout  # short loops: no progress line at all
    assert done.stdout.splitlines()[-1] == f"Results in {tmp_path / 'runs' / '1'}"


def test_a_failed_run_ends_with_its_folder(tmp_path):
    missing = f"dataset.data_path={tmp_path / 'none'}"
    done = python("experiment.py", "-F", str(tmp_path / "runs"), "with", "dataset.cub", missing)
    assert done.returncode == 1
    lines = [line for line in done.stdout.splitlines() if line.strip()]  # sacred ends its error with a blank line
    assert lines[-2].startswith("utils.errors.InputError: ") and (tmp_path / "runs" / "1" / "run.json").is_file()
    assert lines[-1] == f"Records of the failed run in {tmp_path / 'runs' / '1'}"


BAR = "from utils.engine.training import progress\nfor _ in progress(range(3), 'Looping', total=3):\n    pass\n"


def test_without_a_terminal_a_bar_is_lines():
    done = python("-c", BAR, env={"TQDM_MININTERVAL": "0"})
    assert "\r" not in done.stdout
    assert done.stdout.splitlines()[-1].startswith("Looping: 100%|")


def on_a_terminal(env: dict) -> str:
    """What the bar writes to a 100-column terminal."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        [PYTHON, "-c", BAR], cwd=REPO, env={**os.environ, **env}, stdout=follower, stderr=follower
    )
    os.close(follower)
    written = b""
    while chunk := read_or_end(leader):
        written += chunk
    process.wait()
    os.close(leader)
    return written.decode()


def read_or_end(descriptor: int) -> bytes:
    try:
        return os.read(descriptor, 4096)
    except OSError:  # the terminal's other end closed
        return b""


def test_tqdm_disable_silences_the_bars():
    assert "Looping:" in on_a_terminal({})
    assert "Looping:" not in on_a_terminal({"TQDM_DISABLE": "1"})


def test_the_readme_loop_runs_outside_the_repository_and_shows_progress(tmp_path):
    (tmp_path / "loop.py").write_text(readme_blocks()[0])
    done = python(
        "loop.py",
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout
    losses = [float(value) for value in re.findall(r"epoch \d, batch \d+: loss ([\d.]+)", done.stdout)]
    assert len(losses) == 30  # a line per batch: 15 batches of the 901 digits, twice
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
    assert 0 <= float(re.search(r"cosine R@1 ([\d.]+)", done.stdout.splitlines()[-1]).group(1)) <= 1


def config_scopes(script: str) -> list:
    """The function configs of an experiment and of its ingredients."""
    from sacred.config.config_scope import ConfigScope

    from utils.reporting.sacred_run import all_ingredients

    ex = __import__(script.removesuffix(".py")).ex
    owners = [ex, *all_ingredients(ex)]
    return [config for owner in owners for config in owner.configurations if isinstance(config, ConfigScope)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_print_config_shows_whole_comments(script):
    # sacred's print_config shows a key's inline comment, else only the last line of the comment block above it.
    cut = []
    for scope in config_scopes(script):
        lines = inspect.getsource(scope._func).splitlines()
        for number, line in enumerate(lines):
            above = list(itertools.takewhile(lambda text: text.strip().startswith("#"), reversed(lines[:number])))
            if re.match(r"\s+\w+ = ", line) and "  # " not in line and len(above) >= 2:
                cut.append(f"{scope._func.__name__}: {line.strip()}")
    assert not cut
