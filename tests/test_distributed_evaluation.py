"""Each of 2 ranks embeds its shard of the test sets; the metrics equal a single-process evaluation of the same
weights."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.multiprocess import run_ranks
from utils.data.ingredient import MetricLoaders
from utils.evaluation import Evaluator

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


@pytest.mark.slow
def test_sharded_evaluation_equals_single_process(tmp_path):
    expected = evaluate_both()
    for rank_results in run_ranks(evaluate_both, (), tmp_path):
        for results, single in zip(rank_results, expected, strict=True):
            assert results.keys() == single.keys()
            assert results == pytest.approx(single, rel=1e-6, abs=1e-9)
    assert "cosine/R@1" in expected[0] and "utilization" in expected[1]
