"""A DDP step on 2 gloo processes, each given half of a global batch, has the single-process gradient of the
whole batch: every loss, with and without Metrix in every mode, with BatchNorm statistics frozen or, with
sync_bn (utils.engine.sync_batchnorm), BatchNorm in training mode over the global batch; and a tiny ViT in every
Metrix mode."""

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
from models.backbones import get_backbone, small_cnn
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
    # A lam per pair, drawn on every rank, rank 0's broadcast (Beta.sample's strided view): with cross-entropy's
    # mixed targets and positive-negative mixing (which trains every anchor) every lam shows in the loss.
    ("cross_entropy", "feature", {"lam": "per_pair", "strategy": "positive_negative"}, False),
    ("cross_entropy", "embed", {"lam": "per_pair", "strategy": "positive_negative"}, False),
    ("multisimilarity", "input", {"lam": "per_pair", "strategy": "positive_negative"}, False),
]
# A ViT with register tokens (16 px images in 8 px patches), its class token and patch mean pooled, in every mode.
CASES += [("multisimilarity", mode, {}, False, "vit") for mode in (None, "input", "feature", "embed")]


def build(
    loss: str, mode: str | None, options: dict, sync_bn: bool, backbone: str = "cnn"
) -> tuple[nn.Module, Criterion]:
    """The model and objective; with sync_bn its BatchNorm layers train on batch statistics (plain BatchNorm
    in the single process, GlobalBatchNorm under DDP)."""
    torch.manual_seed(0)
    if backbone == "vit":
        tiny = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)
        vit = get_backbone("vit_s14_reg4_dinov2", None, **tiny)
        model = MetricModel(vit, EmbeddingHead(32, EMBEDDING, "cls+mean", remap=True, layout=vit.layout)).train()
    else:
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


# Metrix's draws: with this seed the random strategy draws a positive-negative step, which mixes pairs for every
# anchor of the batch (an anchor-negative step mixes nothing here, where every class has a positive).
METRIX_SEED = 3


def single_process_step(case: tuple) -> tuple[float, dict[str, torch.Tensor]]:
    model, criterion = build(*case)
    images, labels = global_batch()
    torch.manual_seed(METRIX_SEED)
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
        # Rank 0 draws as the single process; the other ranks' own draws differ, as under torchrun once their
        # random streams part: whatever Metrix draws must come from rank 0.
        torch.manual_seed(METRIX_SEED + 1000 * distributed.rank())
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


def broadcast_views() -> dict[str, torch.Tensor]:
    """On every rank: broadcast_ into a strided view, a transposed view and an offset slice of tensors that hold
    the rank's number, returning the whole tensors."""
    own = float(distributed.rank())
    strided, square, offset = torch.full((10,), own), torch.full((3, 3), own), torch.full((6,), own)
    distributed.broadcast_(strided[::2].copy_(torch.arange(5.0) + 10 * own))
    distributed.broadcast_(square.t().copy_(torch.arange(9.0).view(3, 3) + 10 * own))
    distributed.broadcast_(offset[2:4])
    return {"strided": strided, "square": square, "offset": offset}


@pytest.mark.slow
def test_broadcast_into_a_view_writes_rank_0s_values_there_and_nothing_else(tmp_path):
    ranks = run_ranks(broadcast_views, (), tmp_path)
    for own, result in enumerate(ranks):
        strided = torch.full((10,), float(own))
        strided[::2] = torch.arange(5.0)
        assert torch.equal(result["strided"], strided)
        assert torch.equal(result["square"], torch.arange(9.0).view(3, 3).t())
        assert torch.equal(result["offset"], torch.tensor([own, own, 0, 0, own, own], dtype=torch.float))


def few_values_per_channel() -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 64) values 100 +- 0.01, 4 per channel (2 per rank), and a probe: a variance 10^8 times smaller than the
    squares, which E[x^2] - mean^2 in float32 would lose."""
    generator = torch.Generator().manual_seed(3)
    values = 100 + 0.01 * torch.randn(4, 64, generator=generator, dtype=torch.float64)
    return values, torch.randn(4, 64, generator=generator, dtype=torch.float64)


def batch_norm_step(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and input gradient of BatchNorm in training mode on this rank's rows of few_values_per_channel,
    GlobalBatchNorm under 2 ranks, torch's BatchNorm1d in one process."""
    values, probe = few_values_per_channel()
    rows = distributed.shard(len(values))
    layer = sync_batchnorm.convert(nn.BatchNorm1d(64)).to(dtype).train()
    leaf = values[rows].to(dtype).requires_grad_()
    output = layer(leaf)
    (output * probe[rows].to(dtype)).sum().backward()
    return output.detach().double(), leaf.grad.double()


@pytest.mark.slow
def test_global_batch_norm_is_as_accurate_as_one_process(tmp_path):
    """Against a float64 single-process oracle, the 2-rank float32 output and gradient are within a small factor
    of the error of torch's float32 BatchNorm on the whole batch."""
    oracle = batch_norm_step(torch.float64)
    single = batch_norm_step(torch.float32)
    ranks = run_ranks(batch_norm_step, (torch.float32,), tmp_path)
    merged = [torch.cat([rank[part] for rank in ranks]) for part in range(2)]
    for name, got, one_process, expected in zip(("output", "gradient"), merged, single, oracle, strict=True):
        error = (got - expected).abs().max().item()
        reference = (one_process - expected).abs().max().item()
        assert error <= 4 * reference + 1e-6 * expected.abs().max().item(), (name, error, reference)


def buffers_after_sharing() -> dict[str, torch.Tensor]:
    """A BatchNorm layer after a training forward on this rank's own values, before and after share_buffers."""
    layer = nn.BatchNorm1d(3).train()
    layer(torch.full((4, 3), float(distributed.rank() + 1)) + torch.arange(3.0))
    own = layer.running_mean.clone()
    distributed.share_buffers(layer)
    return {"own": own, "shared": layer.running_mean.clone(), "tracked": layer.num_batches_tracked.clone()}


@pytest.mark.slow
def test_every_rank_evaluates_with_rank_0s_batch_norm_statistics(tmp_path):
    # Each rank's training forward updates its own running statistics; the driver shares rank 0's before evaluating,
    # so that every shard of the test set is embedded with the statistics the checkpoint keeps.
    ranks = run_ranks(buffers_after_sharing, (), tmp_path)
    assert not torch.equal(ranks[0]["own"], ranks[1]["own"])
    for result in ranks:
        assert torch.equal(result["shared"], ranks[0]["own"]) and result["tracked"] == 1
