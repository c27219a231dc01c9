"""One registry of backbones: each maps images in [0, 1] to its last feature map (a CNN's (N, C, H, W)) or its
final tokens (a ViT's (N, T, C), models/vit.py).

BACKBONES maps a name to its spec: a builder taking the name of the pretrained weights to load (or
None for a random initialisation), the weights that exist (the first is the default), the
input size it is meant for and, for a ViT, its timm name. The model ingredient's named configs, the error for an
unknown name and docs/models.md's table (`python -m models.backbones`) are derived from it: adding a backbone is
one entry here; any other timm ViT is `timm:<timm name>`. The input normalisation a network was trained with (CLIP's
is not ImageNet's) lives inside its backbone, so transforms and Metrix input mixing work on plain [0, 1] pixels for
every architecture.

Every backbone has parameter_depths() (parameter name -> depth: stem or embeddings 0, stage or block i i + 1, a
ViT's final norm last), which model.freeze_blocks and layer-wise learning-rate decay read.
"""

import hashlib
import os
import pickle
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import NamedTuple
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from models.bn_inception import BNInception, bn_inception
from models.vit import TIMM_PREFIX, ViTBackbone, build_vit, describe_tokens, patch_size, vit_info
from utils.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Backbone(nn.Sequential):
    """Normalisation followed by the convolutional body (a Sequential); out_channels of the last feature map, depths
    the depth of each of the body's children (its stem 0, its stages 1, 2, ...; by default each child its own)."""

    def __init__(
        self, normalize: nn.Module, body: nn.Sequential, out_channels: int, depths: list[int] | None = None
    ) -> None:
        super().__init__(normalize, body)
        self.out_channels = out_channels
        self.depths = depths or list(range(len(body)))

    def parameter_depths(self) -> dict[str, int]:
        return {name: self.depths[int(name.split(".")[1])] for name, _ in self.named_parameters()}


def checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


# The published files carry the first hex digits of their SHA-256 in their name (resnet50-0676ba61.pth), the
# convention torch.hub's check_hash reads.
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")
# For stand-in weights under a published name (the test suite's): the file is still read as tensors only.
SKIP_HASH = "DML_SKIP_WEIGHT_HASH"


def published_hash(url: str) -> str:
    return HASH_IN_NAME.search(os.path.basename(url)).group(1)


def verify_weights(path: Path, url: str) -> None:
    """Refuse the weight file at path unless its SHA-256 starts with the hash published in url's file name."""
    if os.environ.get(SKIP_HASH) == "1":
        return
    expected = published_hash(url)
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    if not digest.startswith(expected):
        raise InputError(
            f"weight file {path} is not the published one (its SHA-256 starts with {digest[: len(expected)]}, "
            f"expected {expected}): delete it and download {url} again, or train from scratch with "
            "model.pretrained=False"
        )


def cached_weights(url: str) -> Path:
    """The weight file of url in the torch cache, downloaded there when missing, its hash verified."""
    path = checkpoint_dir() / os.path.basename(url)
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Checks the hash too, and leaves nothing behind when it does not match.
            torch.hub.download_url_to_file(url, str(path), hash_prefix=published_hash(url))
    except (URLError, OSError, RuntimeError) as error:
        raise InputError(
            f"pretrained weights {path.name} are unavailable ({error}): download {url} into "
            f"{checkpoint_dir()} (its hash is checked), or train from scratch with model.pretrained=False"
        ) from None
    verify_weights(path, url)
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a verified weight file; weights_only: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise InputError(f"weight file {path} is not a state dict of tensors ({error}); delete it") from None


def imagenet_state_dict(arch: str, weights_name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights weights_name for arch, from the local torch cache or downloaded into it."""
    return load_weights(cached_weights(torchvision.models.get_model_weights(arch)[weights_name].url))


def resnet(arch: str) -> Callable[[str | None], Backbone]:
    """torchvision ResNet/ResNeXt/Wide-ResNet without its pooling and classifier."""

    def build(weights: str | None) -> Backbone:
        net = getattr(torchvision.models, arch)(weights=None)
        if weights is not None:
            net.load_state_dict(imagenet_state_dict(arch, weights))
        body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        # The stem (conv1, bn1, relu, maxpool) is depth 0, layer k depth k.
        return Backbone(Normalize(IMAGENET_MEAN, IMAGENET_STD), body, net.fc.in_features, [0, 0, 0, 0, 1, 2, 3, 4])

    return build


def cifar_resnet18(weights: None) -> Backbone:
    """ResNet-18 for 32 px images: a 3x3 stride-1 stem and no max-pooling (trained from scratch)."""
    net = torchvision.models.resnet18(weights=None)
    stem = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    body = nn.Sequential(stem, net.bn1, net.relu, net.layer1, net.layer2, net.layer3, net.layer4)
    return Backbone(Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), body, net.fc.in_features, [0, 0, 0, 1, 2, 3, 4])


BN_INCEPTION_URL = "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth"


def bninception(weights: str | None) -> BNInception:
    """BN-Inception (its Caffe input conversion is inside); weights from the torch cache or downloaded into it."""
    if weights is None:
        return bn_inception()
    path = cached_weights(BN_INCEPTION_URL)
    try:
        return bn_inception(path)
    except (pickle.UnpicklingError, RuntimeError, ValueError) as error:
        raise InputError(f"BN-Inception weights {path} cannot be loaded ({error}); delete the file") from None


def small_cnn(weights: None) -> Backbone:
    """Seven 3x3 conv-BN-ReLU layers for 32 px images: the CPU-friendly digits default."""
    layers, in_channels = [], 3
    for out_channels, stride in ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)):
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    # The first conv-BN-ReLU layer is the stem (depth 0), the others depths 1 to 6.
    depths = [index // 3 for index in range(len(layers))]
    return Backbone(Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), nn.Sequential(*layers), in_channels, depths)


def vit(timm_name: str) -> Callable[..., ViTBackbone]:
    """A timm ViT (name without weights tag) normalised as its pretrained config says."""
    info = vit_info(timm_name)

    def build(**options) -> ViTBackbone:
        return build_vit(timm_name, Normalize(info.mean, info.std), **options)

    return build


class BackboneSpec(NamedTuple):
    build: Callable[..., nn.Module]  # weights name or None (a ViT's: and its options) -> module with out_channels
    weights: tuple[str, ...]  # the pretrained weights that exist, the default first; () for none
    input_size: int  # the image size it is meant for
    timm_name: str | None = None  # a ViT's timm name, without weights tag


def vit_spec(timm_name: str, input_size: int | None = None) -> BackboneSpec:
    """A timm ViT ('vit_small_patch16_224.dino': its tag is the default weights); input_size replaces timm's
    default (DINOv2's 518 px), its position embedding resampled on load."""
    info = vit_info(timm_name)
    return BackboneSpec(vit(info.timm_name), info.weights, input_size or info.input_size, info.timm_name)


def torchvision_spec(arch: str) -> BackboneSpec:
    """The original ImageNet weights (IMAGENET1K_V1) first: both papers started from them, and torchvision's
    DEFAULT is a newer recipe (V2) for some networks."""
    names = sorted(weights.name for weights in torchvision.models.get_model_weights(arch))
    return BackboneSpec(resnet(arch), tuple(names), 224)


BACKBONES: dict[str, BackboneSpec] = {
    **{
        arch: torchvision_spec(arch)
        for arch in (
            "resnet18",
            "resnet34",
            "resnet50",
            "resnet101",
            "resnet152",
            "resnext50_32x4d",
            "resnext101_32x8d",
            "wide_resnet50_2",
            "wide_resnet101_2",
        )
    },
    "bninception": BackboneSpec(bninception, ("imagenet",), 224),
    "cifar_resnet18": BackboneSpec(cifar_resnet18, (), 32),
    "small_cnn": BackboneSpec(small_cnn, (), 32),
    # Self-supervised and CLIP ViTs, name_<size><patch>_<pretraining>; DINOv2 at 224 px as metric-learning papers
    # train it (timm's default is 518). OpenAI's CLIP towers use QuickGELU, timm's *_quickgelu_* models.
    "vit_s16_dino": vit_spec("vit_small_patch16_224.dino"),
    "vit_b16_dino": vit_spec("vit_base_patch16_224.dino"),
    **{
        f"vit_{size[0]}14{registers}_dinov2": vit_spec(f"vit_{size}_patch14{registers}_dinov2.lvd142m", 224)
        for registers in ("", "_reg4")
        for size in ("small", "base", "large")
    },
    "vit_b16_clip": vit_spec("vit_base_patch16_clip_quickgelu_224.openai"),
    "vit_l14_clip": vit_spec("vit_large_patch14_clip_quickgelu_224.openai"),
}


@cache
def backbone_spec(arch: str) -> BackboneSpec:
    """The registry's spec of arch, or the spec of the timm ViT that `timm:<timm name>` names."""
    if arch.startswith(TIMM_PREFIX):
        spec = vit_spec(arch.removeprefix(TIMM_PREFIX))
        patch_size(spec.timm_name)  # refuses a timm model that is not a ViT
        return spec
    if arch not in BACKBONES:
        raise InputError(
            f"unknown model.arch {arch!r}: choose one of {', '.join(BACKBONES)}, or {TIMM_PREFIX}<timm ViT name>"
        )
    return BACKBONES[arch]


def is_vit(arch: str | None) -> bool:
    """Whether arch (None: a data set's default, a CNN) is a ViT; False for an unknown name."""
    return arch is not None and arch_exists(arch) and backbone_spec(arch).timm_name is not None


def arch_exists(arch: str) -> bool:
    try:
        backbone_spec(arch)
    except InputError:
        return False
    return True


def resolve_weights(arch: str, pretrained: bool | None, weights: str | None) -> str | None:
    """The ImageNet weights to load: None for a random initialisation.

    pretrained=None loads the default weights when the backbone has some; weights picks others.
    """
    available = backbone_spec(arch).weights
    if pretrained is False:
        if weights is not None:
            raise InputError(f"model.weights={weights!r} with model.pretrained=False: drop one of them")
        return None
    if not available:
        if pretrained or weights is not None:
            raise InputError(f"{arch} has no pretrained weights: set model.pretrained=False (or leave it None)")
        return None
    if weights is not None and weights not in available:
        raise InputError(f"unknown model.weights {weights!r} for {arch}: choose one of {', '.join(available)}")
    return weights or available[0]


def get_backbone(
    arch: str, weights: str | None, *, weights_file: str | None = None, drop_path: float = 0.0, **architecture
) -> nn.Module:
    """The backbone of arch with the weights named (None: random). A ViT's options: a local weights_file read
    instead of the cache, timm's drop_path rate and architecture overrides of timm's (tests build tiny ViTs)."""
    spec = backbone_spec(arch)
    if spec.timm_name is None:
        if weights_file is not None or drop_path or architecture:
            raise InputError(f"model.weights_file and model.drop_path are for ViT backbones, not {arch}: unset them")
        return spec.build(weights)
    if weights is None and weights_file is not None:
        raise InputError(
            f"model.weights_file replaces pretrained weights, and {arch} loads none here (it has none, or "
            "model.pretrained=False): unset model.weights_file"
        )
    path = Path(weights_file) if weights_file is not None else None
    return spec.build(
        weights=weights, weights_file=path, drop_path=drop_path, input_size=spec.input_size, **architecture
    )


def registry_table() -> str:
    """docs/models.md's table of backbones, derived from the registry."""
    rows = [
        "| `model.arch` | timm model | pretrained weights (`model.weights`, default first) | input size | tokens |",
        "|---|---|---|---|---|",
    ]
    for name, spec in BACKBONES.items():
        timm_name = f"`{spec.timm_name}`" if spec.timm_name else "-"
        tokens = describe_tokens(spec.timm_name) if spec.timm_name else "- (a feature map)"
        weights = ", ".join(spec.weights) or "none (from scratch)"
        rows.append(f"| `{name}` | {timm_name} | {weights} | {spec.input_size} | {tokens} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(registry_table())
