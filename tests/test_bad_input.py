"""Bad input stops the run with one clear line (what is wrong, how to fix it), before training where possible."""

import json
import shutil

import pytest

from tests.conftest import SHRINK

DIGITS_FAST = ["epochs=1", "cpu=True", "dataset.num_workers=0", "dataset.num_iterations=2"]


def run_experiment(argv: list[str], capsys) -> str:
    """Run experiment.py's command line in this process; return its one error line (exit status 1)."""
    from experiment import ex

    with pytest.raises(SystemExit) as exit_info:
        ex.run_commandline(["experiment.py", *argv])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # tqdm redraws its bar with carriage returns; a terminal shows only the error line.
    lines = [line for line in err.replace("\r", "\n").splitlines() if "Error" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def cub(standins, tmp_path):
    """A private copy of the CUB stand-in that a test may damage."""
    return shutil.copytree(standins["cub"], tmp_path / "cub")


@pytest.mark.parametrize("setting, fragments", [
    ("dataset.name=mnist", ["unknown dataset.name 'mnist'", "digits, cub, cars, sop, inshop"]),
    ("model.arch=resnet9", ["unknown model.arch 'resnet9'", "resnet50"]),
    ("scheduler=linear", ["unknown scheduler 'linear'", "warmcos"]),
    ("dataset.sampler=uniform", ["unknown dataset.sampler 'uniform'", "random_id", "balanced"]),
    ("optimizer=lbfgs", ["unknown optimizer 'lbfgs'", "adamw"]),
    ("model.pooling=sum", ["unknown model.pooling 'sum'", "avg+max"]),
    ("model.norm_layer=group", ["unknown model.norm_layer 'group'"]),
    ("cudnn_flag=fast", ["unknown cudnn_flag 'fast'"]),
    ("loss.pairwise=triplet", ["unknown loss.pairwise 'triplet'", "multisimilarity"]),
    ("metrix.mode=pixels", ["unknown metrix.mode 'pixels'", "feature"]),
    ("metrix.feature metrix.strategy=all", ["unknown metrix.strategy 'all'", "positive_negative"]),
    ("scheduler=step", ["needs lr_step"]),
    ("loss.ce_weight=0", ["no loss to train with"]),
])
def test_unknown_names_and_impossible_settings(setting, fragments, capsys):
    line = run_experiment(["with", *setting.split(), *DIGITS_FAST], capsys)
    assert line.startswith("utils.errors.InputError: ")
    for fragment in fragments:
        assert fragment in line


def test_unknown_named_config_is_reported(capsys):
    """Sacred's own one-line message names the missing config and lists the available ones."""
    line = run_experiment(["with", "dataset.mnist"], capsys)
    assert 'Named config not found: "mnist"' in line and "'cub'" in line and "'inshop'" in line


def test_metrix_on_with_nothing_to_use_it(capsys):
    line = run_experiment(["with", "metrix.feature", "metrix.weight=0", *DIGITS_FAST], capsys)
    assert "no loss would use the mixed examples" in line and "metrix.weight" in line


def test_missing_data_folder(tmp_path, capsys):
    line = run_experiment(["with", "dataset.cub", f"dataset.data_path={tmp_path / 'nowhere'}", *SHRINK], capsys)
    assert "not found" in line and "prepare_data.py" in line


def test_missing_split_file(cub, capsys):
    (cub / "test.txt").unlink()
    line = run_experiment(["with", "dataset.cub", f"dataset.data_path={cub}", *SHRINK], capsys)
    assert "test.txt" in line and "prepare_data.py" in line


def test_unparsable_split_line(cub, capsys):
    lines = (cub / "train.txt").read_text().splitlines()
    lines[2] = lines[2].replace(",", " ")
    (cub / "train.txt").write_text("\n".join(lines) + "\n")
    line = run_experiment(["with", "dataset.cub", f"dataset.data_path={cub}", *SHRINK], capsys)
    assert "train.txt, line 3" in line


def test_missing_image(cub, capsys):
    victim = cub / (cub / "test.txt").read_text().splitlines()[0].split(",")[0]
    victim.unlink()
    line = run_experiment(["with", "dataset.cub", f"dataset.data_path={cub}", *SHRINK], capsys)
    assert str(victim) in line and "missing" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image(cub, workers, capsys, torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    victim = cub / (cub / "test.txt").read_text().splitlines()[0].split(",")[0]
    victim.write_bytes(b"not a jpeg at all")
    line = run_experiment(["with", "dataset.cub", f"dataset.data_path={cub}", *SHRINK,
                           f"dataset.num_workers={workers}"], capsys)
    assert str(victim) in line and "cannot be read" in line


def test_recall_k_larger_than_gallery(cub, capsys):
    line = run_experiment(["with", "dataset.cub", f"dataset.data_path={cub}", *SHRINK, "dataset.recalls=[1,100]"],
                          capsys)
    assert "R@100" in line and "15 neighbours" in line


@pytest.mark.parametrize("settings, fragment", [
    (["dataset.sampler=random_id", "dataset.images_per_class=4", "dataset.batch_size=4"], "single class"),
    (["dataset.sampler=balanced", "dataset.images_per_class=3", "dataset.batch_size=8"], "multiple of"),
    (["dataset.sampler=random_id", "dataset.images_per_class=5", "dataset.batch_size=10"], "classes of 5 images"),
])
def test_batch_too_small_for_the_sampler(cub, settings, fragment, capsys):
    line = run_experiment(["with", "dataset.cub", f"dataset.data_path={cub}", *SHRINK, *settings], capsys)
    assert fragment in line


def test_pretrained_weights_unavailable(cub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    line = run_experiment(["with", "dataset.cub", f"dataset.data_path={cub}", *SHRINK], capsys)
    assert "resnet18-f37072fd.pth" in line and str(tmp_path / "empty_torch_home" / "hub" / "checkpoints") in line
    assert "model.pretrained=False" in line


def test_failed_run_keeps_earlier_results(tmp_path, capsys):
    """With -F, a failing run is recorded as FAILED next to the earlier run, which stays intact."""
    from experiment import ex

    result_dir = tmp_path / "result_dir"
    ex.run_commandline(["experiment.py", "-F", str(result_dir), "with", *DIGITS_FAST,
                        f"temp_dir={tmp_path}"])
    first = (result_dir / "1" / "run.json").read_text()
    with pytest.raises(SystemExit):
        ex.run_commandline(["experiment.py", "-F", str(result_dir), "with", "model.arch=resnet9", *DIGITS_FAST])
    assert (result_dir / "1" / "run.json").read_text() == first
    assert json.loads(first)["status"] == "COMPLETED"
    assert json.loads((result_dir / "2" / "run.json").read_text())["status"] == "FAILED"
    assert (result_dir / "1" / "checkpoint.pt").is_file()
