"""A DDP step on 2 gloo processes, each given half of a global batch, has the single-process gradient of the
whole batch: every loss, with and without Metrix in every mode, with BatchNorm statistics frozen or, with
sync_bn (utils.engine.sync_batchnorm), BatchNorm in training mode over the global batch."""

import itertools

import pytest
import torch
from torch import nn

from losses.contrastive import ContrastiveLoss
from losses.criterion import Criterion
from losses.cross_entropy import CrossEntropyLoss
from losses.metrix import Metrix
from losses.multi_similarity import MultiSimilarityLoss
from losses.proxy_anchor import ProxyAnchorLoss
from models.backbones import small_cnn
from models.metric_model import EmbeddingHead, MetricModel
from tests.multiprocess import run_ranks
from utils import distributed
from utils.engine import sync_batchnorm

CLASSES, EMBEDDING = 4, 16
LOSSES = {
    "cross_entropy": lambda: CrossEntropyLoss(EMBEDDING, CLASSES),
    "contrastive": lambda: ContrastiveLoss(),
    "multisimilarity": lambda: MultiSimilarityLoss(),
    "proxyanchor": lambda: ProxyAnchorLoss(CLASSES, EMBEDDING),
}
# (loss, Metrix mode, Metrix options, sync_bn): every loss with every mode, the hardest-pair cap and the released
# input-mode selection once, and BatchNorm in training mode (backbone and head) over the global batch with each mode.
CASES = [(loss, mode, {}, False) for loss, mode in itertools.product(LOSSES, (None, "input", "feature", "embed"))]
CASES += [
    ("multisimilarity", "feature", {"max_pairs": 10}, False),
    ("contrastive", "input", {"selection": "hardest_negative"}, False),
    ("cross_entropy", None, {}, True),
    ("contrastive", "input", {}, True),
    ("multisimilarity", "feature", {}, True),
    ("proxyanchor", "embed", {}, True),
]


def build(loss: str, mode: str | None, options: dict, sync_bn: bool) -> tuple[nn.Module, Criterion]:
    """The model and objective; with sync_bn its BatchNorm layers train on batch statistics (plain BatchNorm
    in the single process, GlobalBatchNorm under DDP)."""
    torch.manual_seed(0)
    head = EmbeddingHead(256, EMBEDDING, norm_layer="batch" if sync_bn else None, remap=True)
    model = MetricModel(small_cnn(None), head, set_bn_eval=not sync_bn).train()
    if sync_bn and distributed.world_size() > 1:
        model = sync_batchnorm.convert(model)
    mixer = Metrix(mode, **options) if mode else None
    criterion = Criterion({loss: (1.0, LOSSES[loss]())}, mixer)
    for parameter in criterion.parameters():  # a zero classifier would pass no gradient to the embedding
        nn.init.normal_(parameter, std=0.5)
    return model, criterion


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Eight 16 px images; every class has one image on each rank, so positives are split across ranks."""
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return images, torch.arange(8) % CLASSES


def gradients(model: nn.Module, criterion: Criterion) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, and the BatchNorm running statistics after the step."""
    named = itertools.chain(model.named_parameters(prefix="model"), criterion.named_parameters(prefix="loss"))
    running = {
        name: buffer.clone()
        for name, buffer in model.named_buffers(prefix="model")
        if name.endswith(("running_mean", "running_var"))
    }
    return {name: p.grad.clone() for name, p in named if p.grad is not None} | running


def single_process_step(case: tuple) -> tuple[float, dict[str, torch.Tensor]]:
    model, criterion = build(*case)
    images, labels = global_batch()
    torch.manual_seed(2)  # Metrix's draws
    loss, _ = criterion(model, images, labels)
    loss.backward()
    return loss.item(), gradients(model, criterion)


def ddp_steps(cases: list[tuple]) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """On every rank: one DDP backward per case on this rank's half of the global batch."""
    results = []
    for case in cases:
        model, criterion = build(*case)
        objective = distributed.data_parallel(model, criterion, torch.device("cpu"))
        images, labels = global_batch()
        half = distributed.shard(len(labels))
        torch.manual_seed(2)
        loss, _ = objective(model, images[half], labels[half])
        loss.backward()
        results.append((loss.item(), gradients(model, criterion)))
    return results


@pytest.mark.slow
def test_ddp_gradient_equals_single_process_gradient(tmp_path):
    ranks = run_ranks(ddp_steps, (CASES,), tmp_path)
    for i, case in enumerate(CASES):
        expected_loss, expected = single_process_step(case)
        case_scale = max(value.abs().max().item() for name, value in expected.items() if "running" not in name)
        for rank_results in ranks:
            loss, grads = rank_results[i]
            assert loss == pytest.approx(expected_loss, rel=1e-5), case
            assert grads.keys() == expected.keys(), case
            for name, grad in grads.items():
                # Sums in another order: float32 rounding relative to the tensor's largest entry, or to the whole
                # gradient's where a tensor's gradient is nearly 0 by cancellation (a BatchNorm scale followed by
                # another BatchNorm).
                atol = max(1e-5 * expected[name].abs().max().item(), 1e-6 * case_scale)
                torch.testing.assert_close(
                    grad,
                    expected[name],
                    rtol=1e-4,
                    atol=atol,
                    msg=lambda m, case=case, name=name: f"{case} {name}: {m}",
                )
        assert any(grad.abs().sum() > 0 for name, grad in expected.items() if name.endswith("weight")), case
