"""The ViT training side: layer-wise learning-rate decay and the warm-up length against hand-computed learning
rates and timm's own layer-decay groups, gradient-norm clipping against the step it leaves; bad settings in one
line."""

import math

import pytest
import timm
import torch
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.backbones import get_backbone
from models.metric_model import EmbeddingHead, MetricModel
from tests.conftest import assert_input_error
from utils.engine.training import build_optimizer, build_scheduler, optimizer_groups, train_one_epoch

pytestmark = pytest.mark.usefixtures("torch_home")


class TimmBlocks(nn.Module):
    """A tiny timm ViT as a backbone with block depths as timm groups them: embeddings 0, block i at i + 1, the last
    norm with the last block."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=depth, num_classes=0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)[:, 0, :, None, None]

    def parameter_depths(self) -> dict[str, int]:
        groups = group_parameters(self.vit, self.vit.group_matcher(coarse=False), reverse=True)
        return {f"vit.{name}": depth for name, depth in groups.items()}


def timm_model(depth: int = 3) -> MetricModel:
    torch.manual_seed(0)
    return MetricModel(TimmBlocks(depth), EmbeddingHead(192, 16, remap=True, normalize=True))


def vit_model(depth: int = 3) -> MetricModel:
    """The registry's ViT-S/16 DINO shrunk to depth blocks of width 24, random weights."""
    torch.manual_seed(0)
    backbone = get_backbone("vit_s16_dino", None, depth=depth, embed_dim=24, num_heads=2)
    head = EmbeddingHead(24, 16, pooling="cls", remap=True, normalize=True, layout=backbone.layout)
    return MetricModel(backbone, head)


def lr_of(groups: list[dict], lr: float) -> dict[int, float]:
    """id(parameter) -> the lr of its group."""
    return {id(p): group.get("lr", lr) for group in groups for p in group["params"]}


def test_layer_decay_learning_rates_by_hand():
    """lr 0.1, decay 0.5, 3 blocks (parameter_depths: embeddings 0, block i i + 1, the final norm 4): embeddings
    0.1 * 0.5**4, block i 0.1 * 0.5**(3 - i), the final norm, the head and the objective's parameters 0.1 (its
    classifier at its multiplier); biases skip weight decay."""
    model = vit_model()
    classifier = nn.Linear(16, 5)
    groups = optimizer_groups(
        model, [{"params": classifier.parameters(), "lr_multiplier": 10}], lr=0.1, no_bias_decay=True, layer_decay=0.5
    )
    lrs = lr_of(groups, 0.1)
    vit = model.backbone.vit
    assert lrs[id(vit.cls_token)] == pytest.approx(0.00625)
    assert lrs[id(vit.patch_embed.proj.weight)] == pytest.approx(0.00625)
    assert lrs[id(vit.blocks[0].attn.qkv.weight)] == pytest.approx(0.0125)
    assert lrs[id(vit.blocks[1].mlp.fc2.bias)] == pytest.approx(0.025)
    assert lrs[id(vit.blocks[2].norm1.weight)] == pytest.approx(0.05)
    assert lrs[id(vit.norm.weight)] == pytest.approx(0.1)
    assert lrs[id(model.head.remap.weight)] == pytest.approx(0.1)
    assert lrs[id(classifier.weight)] == pytest.approx(1.0)
    assert len(lrs) == len(list(model.parameters())) + 2  # every parameter exactly once
    no_decay = {id(p) for group in groups if group.get("weight_decay") == 0.0 for p in group["params"]}
    assert id(vit.blocks[1].mlp.fc2.bias) in no_decay and id(vit.blocks[1].mlp.fc2.weight) not in no_decay


def test_layer_decay_over_resnet_stages():
    """A ResNet's stem at depth 0 and its four stages at 1-4: lr 1, decay 0.5 gives the stem 1/16, layer1 1/8 and
    layer4 1."""
    torch.manual_seed(0)
    backbone = get_backbone("resnet18", None)
    model = MetricModel(backbone, EmbeddingHead(512, 8))
    lrs = lr_of(optimizer_groups(model, [], lr=1.0, no_bias_decay=False, layer_decay=0.5), 1.0)
    conv1, _, _, _, layer1, _, _, layer4 = model.backbone[1]  # torchvision's ResNet children, without avgpool, fc
    assert lrs[id(conv1.weight)] == pytest.approx(1 / 16)
    assert lrs[id(layer1[0].conv1.weight)] == pytest.approx(1 / 8)
    assert lrs[id(layer4[1].bn2.bias)] == pytest.approx(1.0)


def test_layer_decay_matches_timm():
    """Given timm's own grouping (the final norm with the last block), the same learning-rate scale for every
    backbone parameter as timm's param_groups_layer_decay."""
    model = timm_model(depth=4)
    ours = lr_of(optimizer_groups(model, [], lr=1.0, no_bias_decay=True, layer_decay=0.65), 1.0)
    timms = {
        id(p): group["lr_scale"]
        for group in param_groups_layer_decay(model.backbone.vit, layer_decay=0.65)
        for p in group["params"]
    }
    assert set(timms) <= set(ours)
    assert all(ours[key] == pytest.approx(scale) for key, scale in timms.items())


def test_layer_decay_one_is_the_plain_groups():
    model = vit_model()
    assert optimizer_groups(model, [], 0.1, True, layer_decay=1.0) == optimizer_groups(model, [], 0.1, True)


def test_warmup_iterations_and_layer_decay_under_the_schedule():
    """warmcos with warmup_iterations=4 over 2 epochs of 5: every group's lr is its base lr times
    min((i + 1) / 4, (1 + cos(pi i / 10)) / 2) at iteration i, AdamW keeping the per-group ratios."""
    model = timm_model(depth=1)
    groups = optimizer_groups(model, [], lr=0.2, no_bias_decay=False, layer_decay=0.5)
    optimizer = build_optimizer(groups, "adamw", lr=0.2, momentum=0.0, nesterov=False, weight_decay=0.05)
    schedule = build_scheduler(optimizer, 5, 2, "warmcos", lr_step=None, lr_gamma=0.1, warmup_iterations=4)
    bases = [0.2 * 0.5, 0.2]  # embeddings; the block, its norm and the head
    assert sorted(group["initial_lr"] for group in optimizer.param_groups) == pytest.approx(bases)
    for i in range(10):
        factor = min((i + 1) / 4, (1 + math.cos(math.pi * i / 10)) / 2)
        assert sorted(group["lr"] for group in optimizer.param_groups) == pytest.approx([b * factor for b in bases])
        optimizer.step()
        schedule.step()


def test_layer_decay_needs_block_depths(autoencoder_experiment):
    """An autoencoder has no backbone of blocks to decay over: one line before training, naming the setting."""
    outcome = autoencoder_experiment("with vae.ae epochs=1 layer_decay=0.7")
    assert_input_error(outcome, "layer_decay=0.7 needs a backbone with block depths", "set layer_decay=1.0")
    assert "Epoch   0" not in outcome.out


@pytest.mark.parametrize(
    ("update", "fragment"),
    [
        ("layer_decay=0", "layer_decay=0 is invalid"),
        ("warmup_iterations=0", "warmup_iterations=0 is invalid"),
        ("grad_clip_norm=0", "grad_clip_norm=0 is invalid"),
    ],
)
def test_bad_warmup_or_layer_decay(experiment, update, fragment):
    assert_input_error(experiment(f"with {update}"), fragment)


@pytest.mark.parametrize("raw_scale", [100.0, 0.01])
def test_grad_clip_norm_scales_the_step_to_the_norm(raw_scale):
    """SGD at lr 1 moves the weights by minus the clipped gradient: a gradient of norm above 3 is scaled to norm 3 in
    its own direction, a smaller one passes unchanged."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    images, labels = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = raw_scale * (model(x) ** 2).sum()
        return loss, {"loss": loss.detach()}

    objective(model, images, labels)[0].backward()
    raw = torch.cat([p.grad.flatten() for p in model.parameters()])
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = build_scheduler(optimizer, 1, 1, "constant", lr_step=None, lr_gamma=0.1)
    train_one_epoch(model, objective, loader, optimizer, schedule, torch.device("cpu"), 1, grad_clip_norm=3.0)
    step = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    expected = raw * min(1.0, 3.0 / raw.norm().item())
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-6)
    assert (raw.norm() > 3) == (raw_scale == 100.0)
