"""evaluation.protocol: the validation split held out of the training classes, the Reality Check's folds and their
combination, early stopping (and its counter across a resume), and every run's comparability card."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import assert_input_error, digits_updates
from utils.data.image_dataset import ImageDataset
from utils.data.images import read_split
from utils.data.ingredient import hold_out_validation, validation_classes
from utils.data.samplers import epoch_batches
from utils.engine.config import TrainingConfig
from utils.engine.driver import Task, fit
from utils.errors import InputError
from utils.evaluation.ingredient import Evaluator
from utils.evaluation.protocol import TEST_EMBEDDINGS, reality_check, save_test_embeddings
from utils.reporting.report import main as report_main

CARD_KEYS = {
    "split",
    "selection",
    "train_size",
    "test_size",
    "embedding_size",
    "normalized",
    "backbone",
    "weights",
    "pooling",
    "bn_frozen",
    "batch_size",
    "sampler",
    "epochs_run",
    "seed",
}

# ------------------------------------------------------------------------------------------ the split


def labelled_paths(root: Path, split_file: str) -> dict[str, int]:
    return {path: label for path, label in read_split(root / split_file)}


@pytest.mark.parametrize("folds, fold", [(None, 1), (2, 2)])
def test_the_validation_split_is_class_disjoint_and_the_same_whatever_the_seed(digits_path, folds, fold):
    train_file = labelled_paths(digits_path, "train_small.txt")
    test_file = labelled_paths(digits_path, "test_small.txt")
    draws = []
    for seed in (1, 2):  # the run's seed sets these generators: the split must not follow them
        np.random.seed(seed)
        torch.manual_seed(seed)
        trained, held_out = hold_out_validation(
            ImageDataset(digits_path, "train_small.txt"), fraction=0.4, folds=folds, fold=fold
        )
        draws.append(([p.name for p in trained.paths], trained.targets, [p.name for p in held_out.paths]))
    assert draws[0] == draws[1]
    root = str(digits_path) + "/"
    trained_classes = {train_file[str(p).removeprefix(root)] for p in trained.paths}
    held_classes = {train_file[str(p).removeprefix(root)] for p in held_out.paths}
    assert trained_classes.isdisjoint(held_classes) and trained_classes | held_classes == set(train_file.values())
    assert len(held_classes) == 2 and held_out.targets == [
        train_file[str(p).removeprefix(root)] for p in held_out.paths
    ]
    assert {str(p).removeprefix(root) for p in held_out.paths}.isdisjoint(test_file)
    # the classes trained on are renumbered 0..n-1 in order: the classifier and the proxies cover them only
    numbering = {c: i for i, c in enumerate(sorted(trained_classes))}
    assert trained.targets == [numbering[train_file[str(p).removeprefix(root)]] for p in trained.paths]


def test_folds_partition_the_training_classes():
    classes = [7, 3, 3, 11, 5, 0, 2, 9, 8, 1]  # nine classes, in no order, one repeated
    folds = [validation_classes(classes, 0.25, 4, fold) for fold in range(1, 5)]
    assert sorted(c for fold in folds for c in fold) == sorted(set(classes))
    assert all(len(fold) >= 2 for fold in folds)
    assert folds[0] == [0, 1, 2]  # contiguous partitions of the sorted classes, as the benchmarker's
    with pytest.raises(InputError, match=r"dataset.folds=5 needs at least 10 training classes .* lower dataset.folds"):
        validation_classes(classes, 0.25, 5, 1)


def test_a_validation_fraction_that_leaves_nothing_to_train_is_refused():
    with pytest.raises(InputError, match=r"dataset.validation_fraction=0.9 holds out 3 of the 3 training classes"):
        validation_classes([0, 1, 2], 0.9, None, 1)


# ------------------------------------------------------------------------------------------ runs


@pytest.fixture
def evaluations(monkeypatch) -> list[tuple[str, str]]:
    """Every evaluation of a run, in order: (its query split file, what it embedded with)."""
    calls = []
    evaluate = Evaluator.__call__

    def counted(self, embed, metrics):
        calls.append((self.loaders.query.dataset.split_file.name, type(embed).__name__))
        return evaluate(self, embed, metrics)

    monkeypatch.setattr(Evaluator, "__call__", counted)
    return calls


def fold_run(experiment, digits_path, run_dir: Path, fold: int, *extra: str):
    return experiment(
        f"-F {run_dir} with",
        *digits_updates(digits_path),
        "epochs=2",
        "cpu=True",
        "evaluation.protocol=validation",
        "dataset.folds=2",
        f"dataset.fold={fold}",
        "evaluation.recalls=[1,2]",
        *extra,
    )


def test_under_validation_the_test_set_is_evaluated_once_at_the_end(experiment, digits_path, tmp_path, evaluations):
    outcome = fold_run(experiment, digits_path, tmp_path / "fold2", 2)
    assert outcome.code == 0, outcome.err
    trained = [(split, model) for split, model in evaluations if model == "MetricModel"]
    assert trained == [("train_small.txt", "MetricModel")] * 3 + [("test_small.txt", "MetricModel")]
    run = tmp_path / "fold2" / "1"
    series = json.loads((run / "metrics.json").read_text())
    assert series and all(name.startswith(("val.", "train.")) for name in series)
    info = json.loads((run / "info.json").read_text())
    # the best epoch is the one of the highest validation MAP@R (ties: the later)
    maps = series["val.cosine/MAP@R"]["values"]
    assert info["best_epoch"] == max(range(len(maps)), key=lambda epoch: (maps[epoch], epoch))
    assert {"cosine/MAP@R", "cosine/R@1", "NMI"} <= info["metrics"].keys()
    card = info["card"]
    assert card.keys() == CARD_KEYS
    assert card["split"] == "fold 2/2" and card["selection"] == "validation" and card["epochs_run"] == 2
    assert (card["backbone"], card["embedding_size"], card["train_size"], card["seed"]) == (
        "small_cnn",
        256,
        32,
        json.loads((run / "config.json").read_text())["seed"],
    )
    saved = np.load(run / TEST_EMBEDDINGS)
    assert saved["query"].shape == (50, 256) and int(saved["fold"]) == 2
    assert np.allclose(np.linalg.norm(saved["query"], axis=1), 1, atol=1e-5)


def test_the_papers_protocol_keeps_choosing_on_the_test_set(experiment, digits_path, tmp_path, evaluations):
    outcome = experiment(f"-F {tmp_path} with", *digits_updates(digits_path), "epochs=1", "cpu=True")
    assert outcome.code == 0, outcome.err
    assert {split for split, _ in evaluations} == {"test_small.txt"}
    series = json.loads((tmp_path / "1" / "metrics.json").read_text())
    assert "eval.cosine/R@1" in series and not any(name.startswith("val.") for name in series)
    card = json.loads((tmp_path / "1" / "info.json").read_text())["card"]
    assert (card["split"], card["selection"], card["epochs_run"]) == ("test", "test", 1)


def test_the_reality_check_combines_fold_runs(experiment, digits_path, tmp_path, capsys):
    for fold in (1, 2):
        assert fold_run(experiment, digits_path, tmp_path / f"fold{fold}", fold, "epochs=1").code == 0
    report_main(["--reality-check", str(tmp_path / "fold1"), str(tmp_path / "fold2")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(" | ")[:3] == ["result", "P@1", "R@2"]
    assert [line.split(" | ")[0] for line in lines[1:]] == ["concatenated", "separated"]
    with pytest.raises(SystemExit, match=r"needs each fold of one split exactly once"):
        report_main(["--reality-check", str(tmp_path / "fold1")])


@pytest.mark.parametrize(
    "updates, fragments",
    [
        (["dataset.folds=2"], ["evaluation.protocol=validation with dataset.folds"]),
        (["evaluation.protocol=validation", "dataset.folds=4"], ["dataset.folds=4 needs at least 8 training classes"]),
        (["evaluation.protocol=validation", "dataset.folds=2", "dataset.fold=3"], ["dataset.fold <= dataset.folds"]),
    ],
)
def test_bad_folds_are_refused_before_training(experiment, digits_path, updates, fragments):
    outcome = experiment("with", *digits_updates(digits_path), "cpu=True", *updates)
    assert_input_error(outcome, *fragments)


def test_the_autoencoder_refuses_the_validation_protocol(autoencoder_experiment, digits_path):
    outcome = autoencoder_experiment("with", *digits_updates(digits_path), "cpu=True", "evaluation.protocol=validation")
    assert_input_error(outcome, "evaluation.protocol=validation is experiment.py's")


def test_the_autoencoder_run_carries_a_card(autoencoder_experiment, digits_path, tmp_path):
    outcome = autoencoder_experiment(f"-F {tmp_path} with", *digits_updates(digits_path), "epochs=1", "cpu=True")
    assert outcome.code == 0, outcome.err
    card = json.loads((tmp_path / "1" / "info.json").read_text())["card"]
    assert card.keys() == CARD_KEYS
    assert (card["split"], card["backbone"], card["embedding_size"], card["epochs_run"]) == ("test", "ae", 64, 1)


def test_resume_refuses_another_protocol(experiment, digits_path, tmp_path):
    assert experiment(f"-F {tmp_path} with", *digits_updates(digits_path), "epochs=1", "cpu=True").code == 0
    outcome = experiment(
        "with", f"resume={tmp_path / '1'}", "epochs=2", "evaluation.protocol=validation", f"output_dir={tmp_path}"
    )
    assert_input_error(outcome, "evaluation.protocol='validation' (checkpoint: 'test')")


# ------------------------------------------------------------------------------------------ early stopping


class SquaredError(nn.Module):
    """A regression objective as the driver calls one: (model, images, labels) -> (loss, logs)."""

    def forward(self, model, images, labels):
        loss = (model(images).squeeze(1) - labels.float()).pow(2).mean()
        return loss, {"loss": loss.detach()}

    def parameter_groups(self) -> list[dict]:
        return []


def training_config(directory: Path, **changes) -> TrainingConfig:
    settings = dict(
        epochs=6,
        optimizer="sgd",
        lr=0.01,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        no_bias_decay=True,
        scheduler="constant",
        lr_step=None,
        lr_gamma=0.1,
        grad_clip=None,
        nonfinite="stop",
        visdom_freq=20,
        eval_every=1,
        patience=2,
        cudnn_flag="deterministic",
        checkpoint_every=None,
        resume=None,
        seed=0,
        amp=None,
        channels_last=False,
        compile=False,
        sync_bn=False,
    )
    settings.update(changes)
    return TrainingConfig.from_settings(settings, {"name": "protocol_test", "mainfile": "test_protocol.py"})


def scripted_fit(directory: Path, scores: list[float], **changes):
    """fit on a tiny regression whose evaluated epochs score `scores` in turn; the final evaluation scores -1."""
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3), torch.randint(0, 2, (16,))
    loader = DataLoader(
        TensorDataset(images, labels), batch_sampler=epoch_batches(labels.tolist(), 8, "random", 1, 2, seed=0)
    )
    remaining = iter(scores)
    finals = []
    task = Task(
        nn.Linear(3, 1),
        SquaredError(),
        lambda metrics: {"score": next(remaining)},
        best_key="score",
        final_evaluate=lambda metrics: finals.append(1) or {"score": -1.0},
    )
    config = training_config(directory, **changes)
    outcome = fit(
        task, loader, metrics=[], final_metrics=[], device=torch.device("cpu"), config=config, directory=directory
    )
    return outcome, len(finals)


def test_patience_stops_after_that_many_evaluations_without_a_new_best(tmp_path):
    outcome, finals = scripted_fit(tmp_path, [0.5, 0.6, 0.4, 0.3, 0.9, 0.9, 0.9])
    assert (outcome.epochs_run, outcome.best_epoch, outcome.metrics, finals) == (3, 1, {"score": -1.0}, 1)


def test_resume_keeps_the_patience_counter(tmp_path):
    first, _ = scripted_fit(tmp_path, [0.5, 0.6, 0.4], epochs=2)  # one evaluation since the best
    assert (first.epochs_run, first.best_epoch) == (2, 1)
    # a counter started again would train epoch 4 and keep it (0.9)
    resumed, _ = scripted_fit(tmp_path, [0.3, 0.9, 0.9, 0.9], epochs=6, resume=str(tmp_path))
    assert (resumed.epochs_run, resumed.best_epoch) == (3, 1)


def test_a_checkpoint_without_the_counter_resumes_with_0(tmp_path):
    scripted_fit(tmp_path, [0.5, 0.6, 0.4], epochs=2)  # one evaluation since the best
    path = tmp_path / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["best"]["stale_evaluations"]  # as written before early stopping existed
    torch.save(checkpoint, path)
    resumed, _ = scripted_fit(tmp_path, [0.3, 0.2, 0.9, 0.9], epochs=6, resume=str(tmp_path))
    assert (resumed.epochs_run, resumed.best_epoch) == (4, 1)


# ------------------------------------------------------------------------------------------ the combination


def brute_force(query: np.ndarray, labels: np.ndarray, gallery: np.ndarray | None = None) -> dict[str, float]:
    """R@1, R-Precision and MAP@R by cosine similarity, one query at a time: searched in the gallery (labelled
    like the queries), or without one among the other queries."""
    unit = query / np.linalg.norm(query, axis=1, keepdims=True)
    searched = unit if gallery is None else gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    recall, r_precision, map_at_r = [], [], []
    for i in range(len(unit)):
        others = [j for j in range(len(searched)) if gallery is not None or j != i]
        ranked = sorted(others, key=lambda j: -float(unit[i] @ searched[j]))
        hits = [labels[j] == labels[i] for j in ranked]
        r = sum(hits)
        recall.append(float(hits[0]))
        r_precision.append(sum(hits[:r]) / r)
        map_at_r.append(sum(sum(hits[: k + 1]) / (k + 1) for k in range(r) if hits[k]) / r)
    return {"R@1": np.mean(recall), "R-Precision": np.mean(r_precision), "MAP@R": np.mean(map_at_r)}


def unit(embeddings: np.ndarray) -> np.ndarray:
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


@pytest.mark.parametrize("with_gallery", [False, True])  # In-Shop searches a separate gallery
def test_the_concatenated_and_separated_results_match_a_hand_computation(tmp_path, with_gallery):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 3)
    # unnormalised, of different scales
    folds = [rng.normal(size=(9, 4)) * (fold + 1) for fold in range(4)]
    galleries = [rng.normal(size=(9, 4)) * (fold + 1) if with_gallery else None for fold in range(4)]
    for fold, (embeddings, gallery) in enumerate(zip(folds, galleries, strict=True), 1):
        (tmp_path / str(fold)).mkdir()
        save_test_embeddings(
            tmp_path / str(fold),
            query=torch.from_numpy(embeddings),
            query_labels=labels.tolist(),
            gallery=None if gallery is None else torch.from_numpy(gallery),
            gallery_labels=None if gallery is None else labels.tolist(),
            fold=fold,
            folds=4,
            ks=[1],
        )
    results = reality_check([str(tmp_path / str(fold)) for fold in (3, 1, 4, 2)])  # any order
    joined = np.concatenate([unit(f) for f in folds], axis=1)
    joined_gallery = np.concatenate([unit(g) for g in galleries], axis=1) if with_gallery else None
    expected = brute_force(joined, labels, joined_gallery)
    each = [brute_force(f, labels, g) for f, g in zip(folds, galleries, strict=True)]
    for name in ("R@1", "R-Precision", "MAP@R"):
        assert results["concatenated"][f"cosine/{name}"] == pytest.approx(expected[name], abs=1e-6)
        assert results["separated"][f"cosine/{name}"] == pytest.approx(np.mean([e[name] for e in each]), abs=1e-6)


def save_fold(directory: Path, fold: int, labels: list[int]) -> None:
    directory.mkdir()
    embeddings = torch.randn(len(labels), 4)
    save_test_embeddings(
        directory, query=embeddings, query_labels=labels, gallery=None, gallery_labels=None, fold=fold, folds=2, ks=[1]
    )


def test_the_reality_check_refuses_what_it_cannot_combine(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty: no test_embeddings.npz there; point --reality-check at the run"):
        report_main(["--reality-check", str(tmp_path / "empty")])
    save_fold(tmp_path / "a", 1, [0, 0, 1, 1])
    save_fold(tmp_path / "b", 2, [0, 1, 0, 1])
    with pytest.raises(SystemExit, match=r"hold different test images \(query_labels\)"):
        report_main(["--reality-check", str(tmp_path / "a"), str(tmp_path / "b")])
    save_fold(tmp_path / "c", 1, [0, 0, 1, 1])
    with pytest.raises(SystemExit, match=r"each fold of one split exactly once, got: .*\(fold 1/2\), .*\(fold 1/2\)"):
        report_main(["--reality-check", str(tmp_path / "a"), str(tmp_path / "c")])
