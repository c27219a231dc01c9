"""Vision-transformer backbones (models/vit.py) with tiny ViTs: weights in every raw layout loaded through
model.weights_file and the Hugging Face cache, offline failures, token pooling, Metrix's feature mode against
materialised mixtures, freezing and depths, and experiment.py's train / evaluate / embed / resume with a ViT."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import safetensors.torch
import timm
import torch

import models.ingredient  # noqa: F401  (registers the model's settings rules)
from losses.criterion import Criterion
from losses.metrix import Metrix
from losses.multi_similarity import MultiSimilarityLoss
from models.backbones import get_backbone
from models.metric_model import EmbeddingHead, MetricModel
from models.vit import TokenLayout
from tests.conftest import REPO, assert_input_error, digits_updates
from utils.engine import sync_batchnorm
from utils.engine.speed import Precision, batch_mover, prepare_model
from utils.errors import InputError
from utils.settings import violations

# timm's defaults overridden: 32 px images in 8 px patches, 2 blocks of width 32.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny(arch: str, weights: str | None = None, weights_file: Path | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_backbone(arch, weights, weights_file=weights_file, **TINY)


def timm_state(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The timm model's random weights, jittered so that no two tensors are alike (LayerNorms start at 1 and 0)."""
    generator = torch.Generator().manual_seed(1)
    return {k: v + torch.randn(v.shape, generator=generator) for k, v in backbone.vit.state_dict().items()}


def dino_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dino_deitsmall16_pretrain.pth: the timm keys themselves, no classifier."""
    return dict(state)


def dinov2_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dinov2_vits14_pretrain.pth: timm's keys and an unused mask_token; with registers, register_tokens, and a
    position embedding for the class token too, which timm folds into its class token."""
    raw = {**state, "mask_token": torch.randn(1, state["cls_token"].shape[-1])}
    if "reg_token" in state:
        class_position = torch.randn_like(state["cls_token"][:, 0])
        raw["register_tokens"] = raw.pop("reg_token")
        raw["cls_token"] = state["cls_token"] - class_position
        raw["pos_embed"] = torch.cat([class_position[:, None], state["pos_embed"]], dim=1)
    return raw


def clip_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP's state dict (ViT-B-16.pt): the image tower under visual.*, beside the text tower's keys."""
    names = {
        "patch_embed.proj.weight": "conv1.weight",
        "norm_pre.weight": "ln_pre.weight",
        "norm_pre.bias": "ln_pre.bias",
        "norm.weight": "ln_post.weight",
        "norm.bias": "ln_post.bias",
    }
    block_names = {
        "norm1": "ln_1",
        "norm2": "ln_2",
        "attn.qkv.": "attn.in_proj_",
        "attn.proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    raw = {
        "visual.class_embedding": state["cls_token"][0, 0],
        "visual.positional_embedding": state["pos_embed"][0],
        "visual.proj": torch.randn(state["cls_token"].shape[-1], 8),  # to the joint space: dropped with the head
        "token_embedding.weight": torch.randn(10, 8),
        "logit_scale": torch.tensor(4.6),
    }
    for key, value in state.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            for timm_part, clip_part in block_names.items():
                rest = rest.replace(timm_part, clip_part)
            raw[f"visual.transformer.resblocks.{index}.{rest}"] = value
        elif key in names:
            raw[f"visual.{names[key]}"] = value
    return raw


LAYOUTS = {
    "dino": ("vit_s16_dino", "dino", dino_layout),
    "dinov2": ("vit_s14_dinov2", "lvd142m", dinov2_layout),
    "dinov2-registers": ("vit_b14_reg4_dinov2", "lvd142m", dinov2_layout),
    "clip": ("vit_b16_clip", "openai", clip_layout),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_raw_checkpoint_loads_as_timm_converts_it(layout, tmp_path):
    arch, weights, to_raw = LAYOUTS[layout]
    reference = tiny(arch)
    state = timm_state(reference)
    reference.vit.load_state_dict(state)
    path = tmp_path / "raw.pth"
    torch.save(to_raw(state), path)
    loaded = tiny(arch, weights, path)
    got = loaded.vit.state_dict()
    assert got.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(got[key], value, msg=key)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), reference(images))


def test_a_checkpoint_for_larger_images_has_its_position_embedding_resampled(tmp_path):
    """As DINOv2's 518 px checkpoints load into the 224 px registry entries: here an 8 x 8 grid into a 4 x 4 one."""
    torch.manual_seed(0)
    large = get_backbone("vit_s14_dinov2", None, **(TINY | {"img_size": 64}))
    state = timm_state(large)
    torch.save(dinov2_layout(state), tmp_path / "dinov2_64px.pth")
    loaded = tiny("vit_s14_dinov2", "lvd142m", tmp_path / "dinov2_64px.pth")
    grid = state["pos_embed"][:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    resampled = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True)
    expected = torch.cat([state["pos_embed"][:, :1], resampled.permute(0, 2, 3, 1).reshape(1, 16, -1)], dim=1)
    torch.testing.assert_close(loaded.vit.pos_embed.detach(), expected)
    torch.testing.assert_close(loaded.vit.blocks[1].mlp.fc2.weight.detach(), state["blocks.1.mlp.fc2.weight"])


def test_a_safetensors_file_in_timms_layout_loads_and_normalisation_is_the_backbones(tmp_path):
    reference = tiny("vit_b16_clip")
    state = timm_state(reference)
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    loaded = tiny("vit_b16_clip", "openai", tmp_path / "model.safetensors")
    assert all(torch.equal(loaded.vit.state_dict()[key], value) for key, value in state.items())
    # CLIP's own mean and std, not ImageNet's: a gray image at CLIP's mean normalises to 0.
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    assert loaded.normalize(mean.expand(1, 3, 4, 4)).abs().max() < 1e-6


def test_a_file_of_another_model_is_refused_naming_the_keys(tmp_path):
    torch.save(timm_state(tiny("vit_s16_dino")), tmp_path / "dino.pth")
    with pytest.raises(InputError, match=r"weight file .*dino.pth does not fit vit_small_patch14_reg4_dinov2"):
        tiny("vit_s14_reg4_dinov2", "lvd142m", tmp_path / "dino.pth")


def test_a_weight_file_without_pretrained_weights_to_replace_is_refused(tmp_path):
    torch.save(timm_state(tiny("vit_s16_dino")), tmp_path / "dino.pth")
    with pytest.raises(InputError, match=r"vit_s16_dino loads none here .*: unset model.weights_file"):
        tiny("vit_s16_dino", None, tmp_path / "dino.pth")


def test_a_file_that_is_not_tensors_is_refused(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match=r"broken.safetensors is not a state dict of tensors"):
        tiny("vit_s16_dino", "dino", tmp_path / "broken.safetensors")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp_path, where huggingface_hub looks (it reads HF_HOME once, on import)."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_offline_without_cached_weights_fails_fast_naming_the_file_and_the_fixes(empty_hub_cache):
    start = time.monotonic()
    with pytest.raises(InputError) as error:
        get_backbone("vit_l14_reg4_dinov2", "lvd142m")  # a 300M-parameter model: it is not even built
    assert time.monotonic() - start < 2
    message = str(error.value)
    assert message.startswith("no weights for vit_large_patch14_reg4_dinov2.lvd142m (HF_HUB_OFFLINE=1)")
    assert (
        f"timm/vit_large_patch14_reg4_dinov2.lvd142m/model.safetensors in the Hugging Face cache {empty_hub_cache}"
        in (message)
    )
    assert "`hf download timm/vit_large_patch14_reg4_dinov2.lvd142m model.safetensors`" in message
    assert "model.weights_file=PATH" in message and "\n" not in message


def test_weights_in_the_hugging_face_cache_load_offline(empty_hub_cache):
    reference = tiny("vit_s16_dino")
    state = timm_state(reference)
    # The cache's layout: the file under a snapshot, the snapshot named by refs/main.
    repo = empty_hub_cache / "models--timm--vit_small_patch16_224.dino"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    safetensors.torch.save_file(state, repo / "snapshots" / "0123abc" / "model.safetensors")
    loaded = tiny("vit_s16_dino", "dino")
    assert all(torch.equal(loaded.vit.state_dict()[key], value) for key, value in state.items())


def test_the_experiment_stops_before_training_when_weights_are_missing(empty_hub_cache, digits_path, experiment):
    outcome = experiment("with model.arch=vit_s16_dino epochs=1", *digits_updates(digits_path))
    assert_input_error(outcome, "no weights for vit_small_patch16_224.dino (HF_HUB_OFFLINE=1)", "model.weights_file")
    assert "Train " not in outcome.out


def materialised(tokens: torch.Tensor, first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    weight = lam.view(-1, 1, 1) if lam.dim() else lam
    return weight * tokens[first] + (1 - weight) * tokens[second]


@pytest.mark.parametrize("pooling", ["cls", "mean", "cls+mean"])
@pytest.mark.parametrize("lam_kind", ["per_batch", "per_pair"])
def test_feature_mode_pools_mixtures_of_tokens_as_the_materialised_mixtures(pooling, lam_kind):
    """Values and gradients of the head on pooled mixtures against the head on materialised token mixtures, with
    register tokens that the mean must leave out."""
    torch.manual_seed(0)
    count, tokens_per_image, channels = 5, 1 + 4 + 9, 6
    layout = TokenLayout(class_token=True, prefix_tokens=5)
    head = EmbeddingHead(channels, 3, pooling=pooling, norm_layer="batch", remap=True, normalize=True, layout=layout)
    tokens = torch.randn(count, tokens_per_image, channels, dtype=torch.float64)
    head = head.double()
    first, second = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 0, 3, 2, 0, 4])
    lam = torch.rand(()) if lam_kind == "per_batch" else torch.rand(len(first))
    lam = lam.double()
    probe = torch.randn(len(first), 3, dtype=torch.float64)

    def value_and_gradient(pooled_of):
        leaf = tokens.clone().requires_grad_()
        value = head.embed(pooled_of(leaf))
        (value * probe).sum().backward()
        return value, leaf.grad

    got = value_and_gradient(lambda x: head.pool_mixtures(x, first, second, lam))
    want = value_and_gradient(lambda x: head.pool(materialised(x, first, second, lam)))
    torch.testing.assert_close(got, want)
    # The oracle of the pooling itself: the class token and the mean over the patch tokens only.
    expected = {"cls": tokens[:, 0], "mean": tokens[:, 5:].mean(1)}
    assert torch.allclose(head.pool(tokens), sum(expected[part] for part in pooling.split("+")))


def test_a_cnn_pooling_is_refused_for_a_vit_and_a_token_pooling_for_a_cnn():
    with pytest.raises(InputError, match="model.pooling 'avg' does not pool a ViT's tokens: choose cls"):
        EmbeddingHead(8, 8, pooling="avg", layout=TokenLayout(True, 1))
    with pytest.raises(InputError, match="model.pooling 'cls' does not pool a CNN's feature map: choose avg"):
        EmbeddingHead(8, 8, pooling="cls")
    with pytest.raises(InputError, match="needs a class token"):
        EmbeddingHead(8, 8, pooling="cls", layout=TokenLayout(False, 0))


@pytest.mark.parametrize("mode", ["input", "feature", "embed"])
def test_every_metrix_mode_trains_a_vit(mode):
    backbone = tiny("vit_s14_reg4_dinov2")
    model = MetricModel(backbone, EmbeddingHead(32, 16, pooling="cls+mean", remap=True, layout=backbone.layout))
    criterion = Criterion({"multisimilarity": (1.0, MultiSimilarityLoss())}, Metrix(mode, strategy="positive_negative"))
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 4
    loss, logs = criterion(model, images, labels)
    loss.backward()
    mixed = [value for name, value in logs.items() if name.startswith("mixed")]
    assert mixed and all(torch.isfinite(value).all() and value > 0 for value in mixed), logs
    assert backbone.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_depths_and_freezing_follow_the_blocks():
    backbone = tiny("vit_s14_reg4_dinov2")
    depths = backbone.parameter_depths()
    assert depths["vit.reg_token"] == depths["vit.patch_embed.proj.weight"] == 0
    assert depths["vit.blocks.0.attn.qkv.weight"] == 1 and depths["vit.blocks.1.mlp.fc2.bias"] == 2
    assert depths["vit.norm.weight"] == 3 and set(depths) == {name for name, _ in backbone.named_parameters()}
    model = MetricModel(backbone, EmbeddingHead(32, 16, pooling="cls", layout=backbone.layout), freeze_blocks=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "backbone.vit.blocks.1.attn.qkv.weight" in trainable and "backbone.vit.norm.weight" in trainable
    assert not trainable & {"backbone.vit.pos_embed", "backbone.vit.blocks.0.attn.qkv.weight"}
    model.train()
    assert not backbone.vit.blocks[0].training and backbone.vit.blocks[1].training
    everything = MetricModel(tiny("vit_s16_dino"), EmbeddingHead(32, 16, pooling="cls", layout=TokenLayout(True, 1)))
    assert all(p.requires_grad for p in everything.parameters())
    with pytest.raises(InputError, match=r"model.freeze_blocks=4 out of range for this backbone: choose -1"):
        MetricModel(
            tiny("vit_s16_dino"), EmbeddingHead(32, 16, pooling="cls", layout=TokenLayout(True, 1)), freeze_blocks=4
        )


def test_resnet_stages_are_depths_too():
    backbone = get_backbone("resnet18", None)
    depths = backbone.parameter_depths()
    assert depths["1.0.weight"] == 0 and depths["1.4.0.conv1.weight"] == 1 and depths["1.7.1.bn2.bias"] == 4
    model = MetricModel(backbone, EmbeddingHead(512, 512), freeze_blocks=-1)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert not any(module.training for module in model.backbone.modules())
    # Frozen stages keep their BatchNorm statistics, also once sync_bn has replaced the BatchNorm layers.
    model = sync_batchnorm.convert(
        MetricModel(get_backbone("resnet18", None), EmbeddingHead(512, 512), freeze_blocks=2)
    )
    model.train()
    stem_bn, layer2_bn, layer3_bn = model.backbone[1][1], model.backbone[1][5][0].bn1, model.backbone[1][6][0].bn1
    assert isinstance(stem_bn, sync_batchnorm.GlobalBatchNorm)
    assert not stem_bn.training and not layer2_bn.training and layer3_bn.training


def test_pooled_features_are_the_heads_pooling_without_norm_or_remap():
    backbone = tiny("vit_s14_reg4_dinov2")
    head = EmbeddingHead(32, 16, pooling="mean", norm_layer="layer", remap=True, layout=backbone.layout)
    model = MetricModel(backbone, head).eval()
    images = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(model.pooled_features(images), backbone(images)[:, 5:].mean(1))


# A tiny timm ViT (6 blocks of width 64, 16 px patches) through the command line: feature-mode Metrix, its
# weights from a file in timm's layout, the digits' small splits.
VIT_RUN = ["model.arch=timm:test_vit", "metrix.feature", "model.num_features=16", "cpu=True"]


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vit_weights") / "test_vit.safetensors"
    torch.manual_seed(0)
    safetensors.torch.save_file(timm.create_model("test_vit", num_classes=0).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def vit_finished(digits_path, vit_weights, tmp_path_factory) -> Path:
    from experiment import ex

    observed = tmp_path_factory.mktemp("vit_finished")
    # Device augmentation and channels-last as with any backbone.
    words = [
        *VIT_RUN,
        f"model.weights_file={vit_weights}",
        "epochs=1",
        "dataset.gpu_augment=True",
        "channels_last=True",
    ]
    ex.run_commandline(["experiment.py", "-F", str(observed), "with", *words, *digits_updates(digits_path)])
    return observed / "1"


def test_evaluate_and_embed_rebuild_the_vit_offline_without_its_weight_file(
    vit_finished, vit_weights, experiment, digits_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    hidden = vit_weights.rename(tmp_path / "elsewhere.safetensors")  # the run's weight file is gone
    try:
        outcome = experiment(f"evaluate with checkpoint={vit_finished}")
        assert outcome.code == 0, outcome.err
        recorded = json.loads((vit_finished / "info.json").read_text())
        assert outcome.run.info["metrics"] == recorded["metrics"]
        out = tmp_path / "test"
        outcome = experiment(f"embed with checkpoint={vit_finished} images={digits_path / 'test_small.txt'} out={out}")
        assert outcome.code == 0, outcome.err
        assert np.load(tmp_path / "test.npz")["embeddings"].shape[1] == 16
    finally:
        hidden.rename(vit_weights)


def start_run(observed: Path, words: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "experiment.py"), "-F", str(observed), "with", *words]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ)


@pytest.mark.slow
def test_a_killed_vit_run_resumes_to_the_uninterrupted_metrics(digits_path, vit_weights, experiment, tmp_path):
    words = [*VIT_RUN, f"model.weights_file={vit_weights}", "epochs=2", "dataset.num_iterations=30"]
    words += digits_updates(digits_path)
    alone = start_run(tmp_path / "alone", words, tmp_path / "alone.txt")
    assert alone.wait(timeout=600) == 0, (tmp_path / "alone.txt").read_text()
    killed = start_run(tmp_path / "runs", words, tmp_path / "killed.txt")
    checkpoint = tmp_path / "runs" / "1" / "checkpoint.pt"
    deadline = time.monotonic() + 600
    while not (checkpoint.exists() and torch.load(checkpoint, weights_only=True)["epoch"] == 2):  # epoch 1 done
        assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.txt").read_text()
        time.sleep(0.05)
    killed.kill()
    killed.wait(timeout=60)
    outcome = experiment(f"-F {tmp_path / 'runs'} with", *words, f"resume={tmp_path / 'runs' / '1'}")
    assert outcome.code == 0, outcome.err
    assert f"Resumed from {tmp_path / 'runs' / '1'}: epoch 2" in outcome.out
    metrics = [
        json.loads((run / "info.json").read_text())["metrics"]
        for run in (tmp_path / "alone" / "1", tmp_path / "runs" / "2")
    ]
    assert metrics[0] == metrics[1]


def vit_gradient(amp: str | None, channels_last: bool) -> tuple[float, torch.Tensor]:
    """One feature-mode Metrix step of a tiny ViT with the experiment's precision and memory-format helpers."""
    backbone = tiny("vit_s14_reg4_dinov2")
    model = MetricModel(backbone, EmbeddingHead(32, 16, pooling="cls+mean", remap=True, layout=backbone.layout))
    prepare_model(model.train(), channels_last, compile=False)
    criterion = Criterion({"multisimilarity": (1.0, MultiSimilarityLoss())}, Metrix("feature"))
    images = batch_mover(torch.device("cpu"), channels_last)(
        torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    )
    precision = Precision(amp, torch.device("cpu"))
    torch.manual_seed(2)
    with precision.autocast():
        loss, _ = criterion(model, images, torch.arange(8) % 4)
    precision.backward(loss)
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("amp, channels_last, tolerance", [("bf16", False, 0.03), (None, True, 1e-5)])
def test_a_vit_gradient_with_bf16_or_channels_last_is_close_to_float32s(amp, channels_last, tolerance):
    loss, grads = vit_gradient(amp, channels_last)
    reference_loss, reference = vit_gradient(None, False)
    assert loss == pytest.approx(reference_loss, rel=tolerance)
    assert 1 - torch.nn.functional.cosine_similarity(grads, reference, dim=0) < tolerance


@pytest.mark.parametrize("arch", ["timm:resnet50", "timm:vit_foo", "timm:vit_small_patch16_224.foo"])
def test_a_timm_name_that_is_no_vit_is_refused_before_anything_runs(arch):
    lines = violations({"model": {"arch": arch}})
    assert len(lines) == 1 and lines[0].startswith(f"model.arch={arch!r} is invalid: expected one of None, resnet18")
    assert "timm:<timm ViT name>" in lines[0]
    assert violations({"model": {"arch": "timm:vit_small_patch16_224.augreg_in21k", "pooling": "mean"}}) == []
