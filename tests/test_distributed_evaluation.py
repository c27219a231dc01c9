"""Each of 2 ranks embeds its shard of the test sets; the metrics equal a single-process evaluation of the same
weights. (The same processes check that a failure on one rank ends every rank with its message.)"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.multiprocess import run_ranks
from utils import distributed
from utils.data.ingredient import MetricLoaders
from utils.evaluation.ingredient import Evaluator

METRICS = ["recall", "map_at_r", "r_precision", "nmi", "utilization"]


def loaders(with_gallery: bool) -> MetricLoaders:
    """37 queries (an odd count: uneven shards), 23 gallery images, 30 training images; batches of 8."""
    generator = torch.Generator().manual_seed(3)

    def loader(count: int) -> DataLoader:
        images = torch.rand(count, 3, 8, 8, generator=generator)
        return DataLoader(TensorDataset(images, torch.arange(count) % 5), batch_size=8)

    query, gallery, reference = loader(37), loader(23), loader(30)
    return MetricLoaders(None, query, gallery if with_gallery else None, reference, num_classes=5)


def evaluate(with_gallery: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 6)).eval()
    evaluator = Evaluator(loaders(with_gallery), torch.device("cpu"), [1, 2, 4], METRICS, METRICS, "faiss")
    return evaluator(model, METRICS)


def evaluate_both() -> list[dict[str, float]]:
    return [evaluate(False), evaluate(True)]


def evaluate_then_fail_on_rank_1() -> tuple[list[dict[str, float]], str]:
    """The evaluations, and the message each rank ends with when rank 1 alone finds bad input."""
    results = evaluate_both()
    try:
        distributed.raise_if_any(ValueError("dataset.batch_size=3 is odd") if distributed.rank() == 1 else None)
    except ValueError as error:
        return results, f"{type(error).__name__}: {error}"
    return results, "no error"


@pytest.mark.slow
def test_sharded_evaluation_equals_single_process(tmp_path):
    expected = evaluate_both()
    ranks = run_ranks(evaluate_then_fail_on_rank_1, (), tmp_path)
    assert [message for _, message in ranks] == [
        "InputError: rank 1 failed: ValueError: dataset.batch_size=3 is odd",
        "ValueError: dataset.batch_size=3 is odd",
    ]
    for rank_results, _ in ranks:
        for results, single in zip(rank_results, expected, strict=True):
            assert results.keys() == single.keys()
            assert results == pytest.approx(single, rel=1e-6, abs=1e-9)
    assert "cosine/R@1" in expected[0] and "utilization" in expected[1]
