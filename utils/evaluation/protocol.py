"""The honest protocol's records: every run's comparability card, and the Reality Check's combination of four fold
runs (Musgrave, Belongie and Lim, "A Metric Learning Reality Check", ECCV 2020).

A fold run (dataset.folds=4 dataset.fold=k) writes its test embeddings, L2-normalised, once at the end to
TEST_EMBEDDINGS in its run folder; `python -m utils.report --reality-check DIR...` reads the four of them, without
the data, into the paper's two results: "concatenated" (the four normalised embeddings of each image joined into
one) and "separated" (the mean of the four models' own results).
"""

import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from utils.errors import InputError
from utils.evaluation.ingredient import Evaluator
from utils.evaluation.metrics import RETRIEVAL_METRICS, evaluate_embeddings
from utils.files import atomic_write

TEST_EMBEDDINGS = "test_embeddings.npz"


MODEL_CARD_KEYS = ("embedding_size", "normalized", "backbone", "weights", "pooling", "bn_frozen")


def comparability_card(config: dict, model: dict, epochs_run: int) -> dict:
    """What decides whether two results may be compared (info.json's "card"): the run's config (data, protocol,
    seed), its model as the experiment describes it (MODEL_CARD_KEYS) and the epochs it trained."""
    dataset = config["dataset"]
    protocol = config["evaluation"]["protocol"]
    return {
        "split": f"fold {dataset['fold']}/{dataset['folds']}" if dataset["folds"] else protocol,
        "selection": protocol,
        "train_size": dataset["crop_size"],
        "test_size": dataset["crop_size"],
        **{key: model[key] for key in MODEL_CARD_KEYS},
        "batch_size": dataset["batch_size"],
        "sampler": dataset["sampler"],
        "epochs_run": epochs_run,
        "seed": config["seed"],
    }


def normalized(embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
    array = np.asarray(torch.as_tensor(embeddings).float().cpu())
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


def save_test_embeddings(
    directory: Path,
    *,
    query: torch.Tensor,
    query_labels: Sequence[int],
    gallery: torch.Tensor | None,
    gallery_labels: Sequence[int] | None,
    fold: int,
    folds: int,
    ks: Sequence[int],
) -> Path:
    """A fold run's normalised test embeddings and labels (gallery ones for In-Shop), for the combination."""
    arrays = {
        "query": normalized(query),
        "query_labels": np.asarray(query_labels),
        "fold": np.asarray(fold),
        "folds": np.asarray(folds),
        "ks": np.asarray(ks),
    }
    if gallery is not None:
        arrays.update(gallery=normalized(gallery), gallery_labels=np.asarray(gallery_labels))
    path = directory / TEST_EMBEDDINGS
    with atomic_write(path, "wb") as file:
        np.savez(file, **arrays)
    return path


def save_fold_embeddings(evaluator: Evaluator, directory: Path, *, fold: int, folds: int) -> Path:
    """The test embeddings of the evaluator's last evaluation (the final one of a fold run) and their labels (the
    test loaders are not shuffled: the data sets' order)."""
    query, gallery = evaluator.last
    loaders = evaluator.loaders
    return save_test_embeddings(
        directory,
        query=query,
        query_labels=loaders.query.dataset.targets,
        gallery=gallery,
        gallery_labels=loaders.gallery.dataset.targets if loaders.gallery is not None else None,
        fold=fold,
        folds=folds,
        ks=evaluator.recalls,
    )


def fold_files(directories: Sequence[str]) -> list[Path]:
    """The TEST_EMBEDDINGS files in (or under) the given run folders."""
    files = []
    for directory in map(Path, directories):
        found = [directory] if directory.is_file() else sorted(directory.rglob(TEST_EMBEDDINGS))
        if not found:
            raise InputError(
                f"{directory}: no {TEST_EMBEDDINGS} there; point --reality-check at the run folders of fold runs "
                f"(`python experiment.py -F DIR with dataset.cub reality_check dataset.fold=K`, K = 1..4)"
            )
        files.extend(found)
    return files


def load_folds(directories: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Every fold's arrays, in fold order; one line when they are not one fold each of the same test set."""
    runs = []
    for file in fold_files(directories):
        with np.load(file) as arrays:
            runs.append({"file": file, **{key: arrays[key] for key in arrays.files}})
    folds = {int(run["folds"]) for run in runs}
    found = sorted(int(run["fold"]) for run in runs)
    if len(folds) != 1 or found != list(range(1, folds.pop() + 1)):
        listing = ", ".join(f"{run['file']} (fold {int(run['fold'])}/{int(run['folds'])})" for run in runs)
        raise InputError(
            f"--reality-check needs each fold of one split exactly once, got: {listing}; give one run per fold"
        )
    first = runs[0]
    for run in runs[1:]:
        for key in ("query_labels", "gallery_labels"):
            if key in first and not np.array_equal(run.get(key), first[key]):
                raise InputError(
                    f"{run['file']} and {first['file']} hold different test images ({key}): "
                    f"the folds must be evaluated on the same test set"
                )
    return sorted(runs, key=lambda run: int(run["fold"]))


def reality_check(directories: Sequence[str]) -> dict[str, dict[str, float]]:
    """The paper's "concatenated" and "separated" cosine results (P@1 = R@1, R@K, R-Precision, MAP@R)."""
    runs = load_folds(directories)
    ks = [int(k) for k in runs[0]["ks"]]

    def evaluate(query: np.ndarray, gallery: np.ndarray | None) -> dict[str, float]:
        results = evaluate_embeddings(
            query,
            runs[0]["query_labels"],
            gallery,
            runs[0].get("gallery_labels"),
            ks=ks,
            metrics=RETRIEVAL_METRICS,
            distances=("cosine",),
        )
        return {key: value for key, value in results.items() if key.startswith("cosine/")}

    galleries = [run.get("gallery") for run in runs]
    joined_gallery = None if galleries[0] is None else np.concatenate(galleries, axis=1)
    concatenated = evaluate(np.concatenate([run["query"] for run in runs], axis=1), joined_gallery)
    each = [evaluate(run["query"], run.get("gallery")) for run in runs]
    separated = {key: statistics.mean(results[key] for results in each) for key in each[0]}
    return {"concatenated": concatenated, "separated": separated}


def format_reality_check(results: dict[str, dict[str, float]]) -> str:
    """The two results as a table: one row each, P@1 first."""
    keys = list(results["concatenated"])
    names = ["P@1" if key == "cosine/R@1" else key.removeprefix("cosine/") for key in keys]
    lines = [" | ".join(["result", *names])]
    for name, values in results.items():
        lines.append(" | ".join([name, *(f"{values[key]:.4f}" for key in keys)]))
    return "\n".join(lines)
