"""The `evaluation` ingredient: which metrics are computed on which test images, with which k-NN backend.

Its settings' types and ranges are registered beside their defaults; check_evaluation adds what depends on the
machine, before any data is read.

evaluation.protocol says which images choose the best epoch: `test`, the papers' (every evaluated epoch is scored
on the test set, and the best one kept: how the papers we reproduce report) or `validation`, an honest one (every
evaluated epoch is scored on training classes held out of training, utils/data/ingredient.py, and the test set is
evaluated once, on the chosen weights). docs/evaluation.md describes both.

Under torchrun each rank embeds a contiguous shard of every test set (no padding, no duplicates), the shards are
gathered in order, and rank 0 computes the metrics once and shares them: the numbers are those of a
single-process evaluation of the same weights.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from sacred import Ingredient
from torch.utils.data import DataLoader, Subset

from utils import distributed
from utils.data.ingredient import DATASETS, MetricLoaders, data_ingredient
from utils.engine.training import progress
from utils.errors import InputError
from utils.evaluation.knn import BACKENDS, resolve_backend
from utils.evaluation.metrics import METRICS, evaluate_embeddings
from utils.reporting.plots import draw_dataset_retrieval
from utils.settings import Check, choice, integer, items, register

evaluation_ingredient = Ingredient("evaluation", ingredients=[data_ingredient])

PROTOCOLS = ("test", "validation")

Embed = Callable[[torch.Tensor], torch.Tensor]


@evaluation_ingredient.config
def config(dataset):
    recalls = list(DATASETS[dataset["name"]].recalls) if dataset["name"] in DATASETS else [1]  # its papers' Ks
    # Metrics: recall | map_at_r | r_precision | nmi | utilization (nearest training embedding).
    metrics = ["recall"]  # after every evaluated epoch (and before training)
    final_metrics = ["recall", "map_at_r", "r_precision", "nmi", "utilization"]  # of the best epoch's weights
    backend = "auto"  # auto | faiss | faiss-gpu | torch (exact k-NN, all give the same numbers)
    protocol = "test"  # the images that choose the best epoch: test (the papers') | validation (held-out classes)


METRIC_LIST = items(choice(METRICS))
RECALL_KS = items(integer(1))
register(
    {
        # The best epoch and the run's result are its cosine R@1.
        "evaluation.recalls": Check(lambda v: RECALL_KS.test(v) and 1 in v, f"{RECALL_KS.description}, 1 among them"),
        "evaluation.metrics": METRIC_LIST,
        "evaluation.final_metrics": METRIC_LIST,
        "evaluation.backend": choice(BACKENDS),
        "evaluation.protocol": choice(PROTOCOLS),
    }
)

# The metric that may choose the best epoch -> its key in the results (cosine, as the papers report).
SELECTION_KEYS = {"recall": "cosine/R@1", "map_at_r": "cosine/MAP@R", "r_precision": "cosine/R-Precision"}


def shard_loader(loader: DataLoader) -> DataLoader:
    """The loader over this rank's contiguous shard of its (unshuffled) data set."""
    if distributed.world_size() == 1:
        return loader
    shard = distributed.shard(len(loader.dataset))
    return DataLoader(
        Subset(loader.dataset, range(shard.start, shard.stop)),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


@torch.no_grad()
def extract_embeddings(
    embed: Embed, loader: DataLoader, device: torch.device, desc: str = "Extracting features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and labels of a whole loader, in loader order, on the device (every rank embeds its shard).
    A rank that fails (a corrupt image) fails every rank with its message, before the gather would wait for it."""
    embeddings, labels = [], []
    failure = None
    try:
        for images, batch_labels in progress(shard_loader(loader), desc):
            embeddings.append(embed(images.to(device, non_blocking=True)))
            labels.append(batch_labels)
    except Exception as error:  # any failure: the other ranks must hear of it, whatever it is
        failure = error
    distributed.raise_if_any(failure)
    sizes = distributed.split_sizes(len(loader.dataset))
    return (distributed.gather(torch.cat(embeddings), sizes), distributed.gather(torch.cat(labels).to(device), sizes))


class Evaluator:
    """Embeds the test images (and for utilization the training images) and computes the metrics; the test
    embeddings of the last call stay in `last` (query, gallery or None), for pictures."""

    def __init__(
        self,
        loaders: MetricLoaders,
        device: torch.device,
        recalls: Sequence[int],
        metrics: Sequence[str],
        final_metrics: Sequence[str],
        backend: str,
    ) -> None:
        self.loaders, self.device = loaders, device
        self.recalls, self.metrics, self.final_metrics, self.backend = list(recalls), metrics, final_metrics, backend
        self.last: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __call__(self, embed: Embed, metrics: Sequence[str]) -> dict[str, float]:
        loaders, device = self.loaders, self.device
        query, query_labels = extract_embeddings(embed, loaders.query, device, "Extracting query features")
        gallery = gallery_labels = reference = None
        if loaders.gallery is not None:
            gallery, gallery_labels = extract_embeddings(embed, loaders.gallery, device, "Extracting gallery features")
        self.last = query, gallery
        if "utilization" in metrics:
            reference, _ = extract_embeddings(embed, loaders.reference, device, "Extracting training features")
        results = None
        if distributed.is_main():
            results = evaluate_embeddings(
                query,
                query_labels,
                gallery,
                gallery_labels,
                ks=self.recalls,
                metrics=metrics,
                backend=self.backend,
                reference=reference,
            )
        results = distributed.broadcast_object(results)
        # Every query of the prepared data sets has a positive; the count is only news when it is not zero.
        if results.get("queries_without_positive") == 0:
            del results["queries_without_positive"]
        return results


@evaluation_ingredient.capture
def check_evaluation(device: torch.device, metrics: list[str], final_metrics: list[str], backend: str) -> None:
    """What the settings rules cannot know: recall is always computed, and a GPU backend needs
    a GPU and a faiss built for it."""
    for key, names in (("metrics", metrics), ("final_metrics", final_metrics)):
        if "recall" not in names:
            raise InputError(
                f"evaluation.{key}={list(names)} lacks 'recall': the best epoch and the run's result are its cosine R@1"
            )
    try:
        resolve_backend(backend, on_cuda=device.type == "cuda")
    except ValueError as error:
        raise InputError(f"evaluation.backend={backend!r}: {error}") from None


@evaluation_ingredient.capture
def get_evaluator(
    loaders: MetricLoaders,
    device: torch.device,
    recalls: list[int],
    metrics: list[str],
    final_metrics: list[str],
    backend: str,
) -> Evaluator:
    # A query is never its own neighbour, so a self-searched set offers one candidate less.
    query, gallery = loaders.query.dataset, loaders.gallery.dataset if loaders.gallery is not None else None
    candidates = len(gallery) if gallery is not None else len(query) - 1
    if max(recalls) > candidates:
        raise InputError(
            f"evaluation.recalls asks for R@{max(recalls)} but the gallery offers only {candidates} "
            f"neighbours per query: lower evaluation.recalls"
        )
    return Evaluator(loaders, device, recalls, list(metrics), list(final_metrics), backend)


def validation_evaluator(test: Evaluator, metrics: Sequence[str]) -> Evaluator:
    """The evaluation of the validation images (self-searched, with test's Ks and backend) with these metrics."""
    loaders = test.loaders
    if loaders.validation is None:
        raise ValueError("no validation images: get_loaders(hold_out=True) holds them out")
    images = len(loaders.validation.dataset)
    if max(test.recalls) >= images:
        raise InputError(
            f"evaluation.recalls asks for R@{max(test.recalls)} but the validation split offers only {images - 1} "
            f"neighbours per query: lower evaluation.recalls or raise dataset.validation_fraction"
        )
    return Evaluator(
        loaders._replace(query=loaders.validation, gallery=None), test.device, test.recalls, metrics, [], test.backend
    )


def draw_retrieval(evaluator: Evaluator, path: Path, seed: int) -> None:
    """The retrieval grid of the last evaluation's embeddings: seeded test queries and their nearest neighbours."""
    query, gallery = evaluator.last
    loaders = evaluator.loaders
    draw_dataset_retrieval(
        loaders.query.dataset,
        query.cpu(),
        path,
        loaders.gallery.dataset if loaders.gallery is not None else None,
        gallery.cpu() if gallery is not None else None,
        seed=seed,
    )
